"""Gaussian diffusion terms as short pure functions (Ho et al. 2020; Nichol & Dhariwal 2021)."""

from __future__ import annotations

import math

import torch

from o2mcli.errors import O2MError


def extract(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather per-sample schedule values ``a[t]`` and shape them for broadcasting over ``ndim`` dims."""
    out = a.to(t.device)[t].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (improved DDPM, Eq. 8 terms)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF (Page 1977), as in improved DDPM."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantized to 256 bins under N(mean, e^{2 log_scale}) (Ho et al. Eq. 13)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return log_probs


class DiffusionTerms:
    """Schedule-derived constants of a DDPM (betas -> alphas_cumprod, posterior coefficients)."""

    def __init__(self, betas: torch.Tensor) -> None:
        b = betas.double()
        a = 1.0 - b
        abar = torch.cumprod(a, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.betas = b.float()
        self.alphas_cumprod = abar.float()
        self.posterior_variance = (b * (1.0 - abar_prev) / (1.0 - abar)).float()
        # Clipped: the posterior variance is 0 at t=0, so reuse t=1's (improved DDPM).
        pv = b * (1.0 - abar_prev) / (1.0 - abar)
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]])).float()
        self.posterior_mean_coef1 = (b * abar_prev.sqrt() / (1.0 - abar)).float()
        self.posterior_mean_coef2 = ((1.0 - abar_prev) * a.sqrt() / (1.0 - abar)).float()
        self.log_betas = torch.log(b).float()

    @property
    def T(self) -> int:
        """Number of training timesteps."""
        return int(self.betas.shape[0])


def q_sample(terms: DiffusionTerms, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. Eq. 4)."""
    abar = extract(terms.alphas_cumprod.to(x0.device), t, x0.ndim)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def predict_x0(terms: DiffusionTerms, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Ho et al. Eq. 4 inverted)."""
    abar = extract(terms.alphas_cumprod, t, x_t.ndim)
    return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()


def q_posterior_mean(terms: DiffusionTerms, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean of q(x_{t-1} | x_t, x0) (Ho et al. Eq. 7)."""
    return (extract(terms.posterior_mean_coef1, t, x_t.ndim) * x0
            + extract(terms.posterior_mean_coef2, t, x_t.ndim) * x_t)


def learned_log_variance(terms: DiffusionTerms, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log Sigma = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2 (improved DDPM Eq. 15)."""
    max_log = extract(terms.log_betas, t, v.ndim)
    min_log = extract(terms.posterior_log_variance_clipped, t, v.ndim)
    frac = (v + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def p_mean_logvar(terms: DiffusionTerms, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                  v: torch.Tensor, clip: float | None = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log-variance of p(x_{t-1} | x_t) from an eps prediction and a variance output v (x0 clipped to +-clip)."""
    x0 = clip_x0(predict_x0(terms, x_t, t, eps), clip)
    return q_posterior_mean(terms, x0, x_t, t), learned_log_variance(terms, v, t)


def clip_x0(x0: torch.Tensor, clip: float | None) -> torch.Tensor:
    """x0 clamped to [-clip, clip]; ``None`` leaves it as predicted (diffusers' ``clip_sample: false``)."""
    return x0 if clip is None else x0.clamp(-clip, clip)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def vlb_loss(terms: DiffusionTerms, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
             v: torch.Tensor) -> torch.Tensor:
    """Per-sample L_vlb in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)), decoder NLL at t=0 (improved DDPM).

    The caller passes ``eps.detach()`` so this term trains only the variance (improved DDPM, Sec. 3.1). The
    model's x0 is not clipped: improved DDPM's training loss calls ``_vb_terms_bpd(..., clip_denoised=False)``;
    clipping would make p's mean differ from q's for reasons the variance cannot fix, and shrink its gradient.
    """
    true_mean = q_posterior_mean(terms, x0, x_t, t)
    true_logvar = extract(terms.posterior_log_variance_clipped, t, x_t.ndim)
    mean, logvar = p_mean_logvar(terms, x_t, t, eps, v, clip=None)
    kl = mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")
UNSUPPORTED_VARIANCE = {
    "fixed_large_log": "diffusers' DDPMScheduler.step takes the square root of log(beta_t) for it (NaN noise)",
    "learned": "diffusers' DDPMScheduler.step takes the square root of the raw model output for it",
}


def check_variance_type(variance_type: str, where: str) -> None:
    """Refuse, by name, a ``variance_type`` whose reverse step o2m does not reproduce."""
    if variance_type in UNSUPPORTED_VARIANCE:
        raise O2MError(f"{where}: variance_type {variance_type!r} is not supported "
                       f"({UNSUPPORTED_VARIANCE[variance_type]}); supported: {', '.join(VARIANCE_TYPES)}")
    if variance_type not in VARIANCE_TYPES:
        raise O2MError(f"{where}: unknown variance_type {variance_type!r}; supported: {', '.join(VARIANCE_TYPES)}")


def fixed_log_variance(terms: DiffusionTerms, t: torch.Tensor, ndim: int, variance_type: str) -> torch.Tensor:
    """log Sigma_t of a fixed-variance DDPM: beta~_t (``fixed_small[_log]``) or beta_t (``fixed_large``) (Ho et al. Sec. 3.2).

    As diffusers' DDPMScheduler: beta~_t clamped at 1e-20 (no noise is added at t = 0 anyway).
    """
    if variance_type == "fixed_large":
        return extract(torch.cat([terms.posterior_variance[1:2], terms.betas[1:]]).log(), t, ndim)
    if variance_type in ("fixed_small", "fixed_small_log"):
        return extract(terms.posterior_variance.clamp(min=1e-20).log(), t, ndim)
    check_variance_type(variance_type, "scheduler config")
    raise O2MError(f"variance_type {variance_type!r} needs the model's variance output")


def reverse_step(terms: DiffusionTerms, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor | None,
                 noise: torch.Tensor, variance_type: str = "fixed_small", clip: float | None = 1.0) -> torch.Tensor:
    """One ancestral step x_{t-1} = mu(x_t, eps) + Sigma^{1/2} z, per-sample t, no noise where t = 0 (Ho et al. Alg. 2).

    Equal to diffusers' ``DDPMScheduler.step`` for each supported ``variance_type`` (learned_range: improved
    DDPM Eq. 15 from ``v``); ``clip`` is the config's ``clip_sample_range``, ``None`` when ``clip_sample`` is off.
    """
    x0 = clip_x0(predict_x0(terms, x_t, t, eps), clip)
    mean = q_posterior_mean(terms, x0, x_t, t)
    if variance_type == "learned_range":
        if v is None:
            raise O2MError("variance_type 'learned_range' needs a model with 2C output channels")
        logvar = learned_log_variance(terms, v, t)
    else:
        logvar = fixed_log_variance(terms, t, x_t.ndim, variance_type)
    nonzero = (t != 0).float().reshape(-1, *([1] * (x_t.ndim - 1)))
    return mean + nonzero * torch.exp(0.5 * logvar) * noise


def ddim_jump(terms: DiffusionTerms, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
              eps: torch.Tensor, clip: float | None = 1.0) -> torch.Tensor:
    """Deterministic DDIM move from t to t_next < t, per sample: sqrt(abar') x0 + sqrt(1 - abar') eps (Song et al. Eq. 12)."""
    abar_next = extract(terms.alphas_cumprod, t_next, x_t.ndim)
    x0 = clip_x0(predict_x0(terms, x_t, t, eps), clip)
    return abar_next.sqrt() * x0 + (1.0 - abar_next).sqrt() * eps


def reverse_kl(terms: DiffusionTerms, x_t: torch.Tensor, t: torch.Tensor, eps_teacher: torch.Tensor,
               v_teacher: torch.Tensor, eps_student: torch.Tensor, v_student: torch.Tensor,
               clip: float | None = 1.0) -> torch.Tensor:
    """Per-sample KL(p_T(x_{t-1}|x_t) || p_S(x_{t-1}|x_t)) in bits/dim (DKDM's L'_vlb).

    Both Gaussians take their variance from the learned interpolation (improved DDPM Eq. 15). As DKDM's
    official code: the teacher's mean comes from its x0 clipped like its reverse step (``clip``), the
    student's from its eps *unclipped*. Pass ``eps_student.detach()``: the term trains the variance only.
    """
    mean_t, logvar_t = p_mean_logvar(terms, x_t, t, eps_teacher, v_teacher, clip=clip)
    mean_s, logvar_s = p_mean_logvar(terms, x_t, t, eps_student, v_student, clip=None)
    return mean_flat(normal_kl(mean_t, logvar_t, mean_s, logvar_s)) / math.log(2.0)
