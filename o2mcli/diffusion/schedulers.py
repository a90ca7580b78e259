"""Samplers from diffusers, built from a model's scheduler config: the ``--scheduler`` names (``SAMPLERS``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from o2mcli.diffusion.gaussian import DiffusionTerms, check_variance_type
from o2mcli.models.parametrization import check_prediction_type
from o2mcli.errors import O2MError
from o2mcli.registry import Registry


def _ddpm(cfg: dict[str, Any]):
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2); learned variance as improved DDPM (Nichol & Dhariwal
    2021, Eq. 15)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(cfg)


def _ddim(cfg: dict[str, Any]):
    """Deterministic DDIM, eta 0 (Song et al. 2021, Eq. 12)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(cfg)


def _pndm(cfg: dict[str, Any]):
    """PLMS: the pseudo linear multistep method (Liu et al. 2022, Eq. 12), its Runge-Kutta warm-up skipped as Stable
    Diffusion's pipelines run it (``skip_prk_steps``); what BK-SDM evaluates with (25 steps)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(cfg, skip_prk_steps=True)


def _euler(cfg: dict[str, Any]):
    """Euler's method on the probability-flow ODE in sigma (Karras et al. 2022, Algorithm 1 without its second-order
    correction)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(cfg)


def _euler_ancestral(cfg: dict[str, Any]):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise up to sigma_up (k-diffusion's
    ``sample_euler_ancestral``; Karras et al. 2022, Sec. 4 on stochastic sampling)."""
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler.from_config(cfg)


def _unipc(cfg: dict[str, Any]):
    """UniPC: the unified predictor-corrector of order 2, with B(h) = e^h - 1 ("bh2"; Zhao et al. 2023)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(cfg)


def _dpmpp_2m(cfg: dict[str, Any]):
    """DPM-Solver++(2M), the multistep second-order solver in data prediction (Lu et al. 2022, Algorithm 2)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2)


def _dpmpp_2m_karras(cfg: dict[str, Any]):
    """DPM-Solver++(2M) on Karras et al.'s sigmas, rho = 7 (Karras et al. 2022, Eq. 5)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                   use_karras_sigmas=True)


SAMPLERS: Registry[Callable[[dict[str, Any]], Any]] = Registry("--scheduler", "sampler")
SAMPLERS.register("ddpm", _ddpm)
SAMPLERS.register("ddim", _ddim)
SAMPLERS.register("pndm", _pndm)
SAMPLERS.register("euler", _euler)
SAMPLERS.register("euler-a", _euler_ancestral)
SAMPLERS.register("unipc", _unipc)
SAMPLERS.register("dpm++2m", _dpmpp_2m)
SAMPLERS.register("dpm++", _dpmpp_2m)  # the name o2m had first: the same sampler as dpm++2m
SAMPLERS.register("dpm++2m-karras", _dpmpp_2m_karras)

# The ``--scheduler`` help: each name, and the diffusers scheduler it builds from the model's scheduler config.
SAMPLER_HELP = ("ddpm (DDPMScheduler, ancestral; honours learned variance), ddim (DDIMScheduler, eta 0), pndm "
                "(PNDMScheduler, PLMS with skip_prk_steps, as SD pipelines), euler (EulerDiscreteScheduler), euler-a "
                "(EulerAncestralDiscreteScheduler), unipc (UniPCMultistepScheduler), dpm++2m "
                "(DPMSolverMultistepScheduler, DPM-Solver++ 2M; dpm++ is the same), dpm++2m-karras (the same on "
                "Karras sigmas).")


def make_scheduler(name: str, base_config: dict[str, Any]):
    """The diffusers scheduler ``name`` (see ``SAMPLER_HELP``) built from a model's scheduler config.

    Only ``ddpm`` reads ``variance_type``; every other sampler gets the config without it (the sampler loop drops
    learned-variance channels itself, because diffusers' DPM-Solver slices a hard-coded 3 channels for learned
    variance). Everything else comes from the config as diffusers' ``from_config`` reads it (``prediction_type``,
    ``timestep_spacing``, ``steps_offset``, and a pipeline's own sigma spacing such as ``use_karras_sigmas``).
    """
    build = SAMPLERS.resolve(name)
    cfg = {k: v for k, v in base_config.items() if not k.startswith("_")}
    if name != "ddpm":
        cfg = {k: v for k, v in cfg.items() if k != "variance_type"}
    try:
        return build(cfg)
    except (NotImplementedError, ValueError) as e:  # e.g. DDIM and DPM-Solver have no "laplace" beta_schedule
        raise O2MError(f"--scheduler {name}: the model's scheduler config does not fit it ({e}); "
                       "try --scheduler ddpm") from e


def schedule_terms(base_config: dict[str, Any]) -> DiffusionTerms:
    """The DDPM constants of a model's scheduler config (betas as diffusers' DDPMScheduler computes them)."""
    return DiffusionTerms(_ddpm({k: v for k, v in base_config.items() if not k.startswith("_")}).betas)


def uses_learned_variance(name: str, base_config: dict[str, Any]) -> bool:
    """Only the DDPM sampler consumes the variance channels of a learned-variance model."""
    return name == "ddpm" and str(base_config.get("variance_type", "")).startswith("learned")


def scheduler_config_for_outputs(base_config: dict[str, Any], in_channels: int, out_channels: int) -> dict[str, Any]:
    """The scheduler config with the ``variance_type`` a model's output channels imply.

    A C-channel model predicts eps only: a ``learned*`` type becomes ``fixed_small`` (diffusers' DDPM
    default). A 2C-channel model learns its variance: a fixed type becomes ``learned_range`` (improved DDPM).
    """
    cfg = dict(base_config)
    learned_type = str(cfg.get("variance_type", "fixed_small")).startswith("learned")
    if out_channels == in_channels and learned_type:
        cfg["variance_type"] = "fixed_small"
    elif out_channels == 2 * in_channels and not learned_type:
        cfg["variance_type"] = "learned_range"
    return cfg


def _repeat_by_design(sched) -> int | None:
    """The index of the timestep a scheduler repeats on purpose, or None.

    PLMS without its Runge-Kutta warm-up (diffusers' PNDM with ``skip_prk_steps``) calls the model twice at its
    second timestep: the first call gives a provisional step, the second averages the two eps before the linear
    multistep formula takes over (Liu et al. 2022, PLMS), so its list reads t_n, t_n-1, t_n-1, t_n-2, ...
    """
    ts = sched.timesteps
    if getattr(sched.config, "skip_prk_steps", False) and type(sched).__name__ == "PNDMScheduler" and len(ts) >= 3 \
            and float(ts[1]) == float(ts[2]):
        return 2
    return None


def _use_timesteps(sched, wanted: list[float]) -> None:
    """Make ``wanted`` the scheduler's timesteps, with the state its step reads made to match.

    DPM-Solver, Euler and DDPM take custom timesteps. DDIM and PNDM read only the current timestep and the spacing
    T // steps, so their list is replaced. UniPC and Euler ancestral step by their ``sigmas``, one per timestep and
    the final sigma after them: those are interpolated from the training sigmas sqrt((1 - abar_t) / abar_t) at
    the wanted timesteps, as their own ``set_timesteps`` does for its grid.
    """
    import inspect

    import numpy as np
    import torch

    dtype = sched.timesteps.dtype
    if "timesteps" in inspect.signature(sched.set_timesteps).parameters:
        sched.set_timesteps(timesteps=[int(round(t)) for t in wanted])
        return
    if hasattr(sched, "sigmas") and hasattr(sched, "alphas_cumprod"):
        acp = sched.alphas_cumprod.cpu()
        table = (((1 - acp) / acp) ** 0.5).numpy()  # float32, as theirs
        sigmas = np.interp(np.asarray(wanted, dtype=np.float64), np.arange(len(table)), table)
        sched.sigmas = torch.cat([torch.from_numpy(sigmas).to(sched.sigmas.dtype), sched.sigmas[-1:].cpu()])
    sched.timesteps = torch.tensor(wanted, dtype=torch.float64).to(dtype)


def set_steps(sched, steps: int) -> None:
    """``sched.set_timesteps(steps)``, with timesteps inside [0, T - 1] and none repeated unless by design.

    diffusers' "linspace" spacing rounds ``linspace(0, T-1, steps+1)``, which repeats a timestep when
    steps = T (500 twice for T = 1000; UniPC's "leading" spacing even puts every step at one timestep). The
    multistep updates of DPM-Solver++ and UniPC divide by the log-SNR gap of consecutive steps, so a repeat is 0/0
    and every image turns NaN. Then the same spacing is passed without repeats. "leading" spacing adds
    ``steps_offset`` unchecked, so a legal offset with many steps reaches T (an IndexError, or a timestep no
    student serves): that grid is shifted down to end at T - 1. Left alone: PNDM's repeated second timestep (see
    :func:`_repeat_by_design`), and a rounded timestep repeating where a solver spaces its steps by its own sigmas
    (Karras, exponential, beta sigmas, Lu's lambdas): it steps by the sigmas, which stay distinct. Timesteps may be
    fractional (Euler's "linspace" grid): they are compared as numbers, not truncated.
    """
    import numpy as np

    sched.set_timesteps(steps)
    T = int(sched.config.num_train_timesteps)
    ts = [float(t) for t in sched.timesteps]
    design = _repeat_by_design(sched)
    core = ts if design is None else ts[:design] + ts[design + 1:]
    sigma_spaced = any(getattr(sched.config, k, False) for k in ("use_karras_sigmas", "use_exponential_sigmas",
                                                                  "use_beta_sigmas", "use_lu_lambdas"))
    repeats = len(set(core)) < len(core) and not sigma_spaced
    if min(ts) < 0 or max(ts) > T - 1 or repeats:
        over = max(ts) - (T - 1)
        if not repeats and over > 0 and min(ts) - over >= 0:
            # "leading" spacing plus steps_offset runs past the last timestep (SD's offset 1 at steps = T; an
            # IndexError in diffusers' step): the same grid, shifted down to end at T - 1.
            wanted = [t - over for t in ts]
        elif design is not None:  # PLMS steps by T // steps from each timestep: no other grid fits it
            raise O2MError(f"--steps {steps}: PNDM's timesteps for this scheduler config leave [0, {T - 1}]; try "
                           "another --scheduler")
        else:
            wanted = [float(t) for t in np.unique(np.linspace(0, T - 1, min(steps, T)).round().astype(int))[::-1]]
        _use_timesteps(sched, wanted)
    if hasattr(sched, "set_begin_index"):
        # Step i is timestep i: DPM-Solver otherwise finds its place by looking the first timestep up, and a
        # repeated one (Karras or beta sigmas at many steps) starts it one step late, past its last sigma.
        sched.set_begin_index(0)


def teacher_reverse_settings(sched: dict, where: Path) -> tuple[str, float | None]:
    """(variance_type, x0 clip range or None) of the teacher's reverse step, as diffusers' DDPMScheduler reads them."""
    check_prediction_type(sched.get("prediction_type"), f"{where}: scheduler config")
    if sched.get("thresholding", False):
        raise O2MError(f"{where}: scheduler config sets thresholding (dynamic thresholding) which o2m's reverse step "
                       "does not implement")
    variance = str(sched.get("variance_type", "fixed_small"))
    check_variance_type(variance, f"{where}: scheduler config")
    if not sched.get("clip_sample", True):
        return variance, None
    clip = sched.get("clip_sample_range", 1.0)
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not clip > 0 or clip == float("inf"):
        raise O2MError(f"{where}: scheduler config clip_sample_range {clip!r} must be a positive number")
    return variance, float(clip)
