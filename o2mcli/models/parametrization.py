"""What a denoiser's output means: a parametrization of the Gaussian diffusion x_t = a_t x0 + s_t eps.

With a_t = sqrt(abar_t) and s_t = sqrt(1 - abar_t), an eps model predicts the noise (Ho et al. 2020), a v model
v = a_t eps - s_t x0 (Salimans & Ho 2022, Sec. 4). Each is a linear function of (x_t, the other), so conversion
between them is exact; the losses, the DKDM buffer and the KD targets go through these functions, never through a
model's raw output read as eps. A parametrization is named as diffusers' scheduler configs name it
(``prediction_type``), which is where a model records its own.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from o2mcli.errors import O2MError
from o2mcli.registry import Registry

# A schedule's terms (``diffusion.gaussian.DiffusionTerms``, a layer up): a parametrization reads only their
# ``alphas_cumprod``.
DiffusionTerms = Any


def _scales(terms: DiffusionTerms, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_t, s_t) = (sqrt(abar_t), sqrt(1 - abar_t)) at per-sample ``t``, shaped for broadcasting (Ho et al. Eq. 4)."""
    abar = terms.alphas_cumprod.to(t.device)[t].float().reshape(-1, *([1] * (ndim - 1)))
    return abar.sqrt(), (1.0 - abar).sqrt()


class Parametrization:
    """One meaning of a model's (first C) output channels; subclass, set ``name``, and register it."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def target(self, terms: DiffusionTerms, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model should output for x_t = q_sample(x0, t, noise): the regression target of L_simple."""
        raise NotImplementedError

    def to_eps(self, terms: DiffusionTerms, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The eps an output implies at (x_t, t)."""
        raise NotImplementedError

    def from_eps(self, terms: DiffusionTerms, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The output that implies ``eps`` at (x_t, t): the inverse of :meth:`to_eps`."""
        raise NotImplementedError

    def to_x0(self, terms: DiffusionTerms, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean sample an output implies: x0 = (x_t - s_t eps) / a_t (Ho et al. Eq. 4 inverted)."""
        a, s = _scales(terms, t, x_t.ndim)
        return (x_t - s * self.to_eps(terms, out, x_t, t)) / a

    def convert(self, terms: DiffusionTerms, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                to: "Parametrization") -> torch.Tensor:
        """This parametrization's output expressed in ``to``'s (exact: both are linear in x_t and eps)."""
        if to.name == self.name:
            return out
        return to.from_eps(terms, self.to_eps(terms, out, x_t, t), x_t, t)


class Epsilon(Parametrization):
    """eps-prediction (Ho et al. 2020): the output is the noise."""

    name = "epsilon"
    summary = "eps (the noise)"

    def target(self, terms, x0, noise, t):
        return noise

    def to_eps(self, terms, out, x_t, t):
        return out

    def from_eps(self, terms, eps, x_t, t):
        return eps


class VPrediction(Parametrization):
    """v-prediction (Salimans & Ho 2022, Sec. 4): v = a_t eps - s_t x0, so eps = a_t v + s_t x_t."""

    name = "v_prediction"
    summary = "v = sqrt(abar) eps - sqrt(1 - abar) x0"

    def target(self, terms, x0, noise, t):
        a, s = _scales(terms, t, x0.ndim)
        return a * noise - s * x0

    def to_eps(self, terms, out, x_t, t):
        # x_t = a x0 + s eps and v = a eps - s x0, with a^2 + s^2 = 1: eps = a v + s x_t
        a, s = _scales(terms, t, x_t.ndim)
        return a * out + s * x_t

    def from_eps(self, terms, eps, x_t, t):
        # v = a eps - s x0, x0 = (x_t - s eps) / a: v = (eps - s x_t) / a
        a, s = _scales(terms, t, x_t.ndim)
        return (eps - s * x_t) / a


PARAMETRIZATIONS: Registry[Parametrization] = Registry("prediction_type", "parametrization")
PARAMETRIZATIONS.register(Epsilon.name, Epsilon())
PARAMETRIZATIONS.register(VPrediction.name, VPrediction())

# What diffusers also accepts, refused by name until a family needs it.
NOT_YET = {"sample": "x0-prediction models are not supported yet; o2m takes epsilon and v_prediction",
           "flow_prediction": "flow-matching models are not supported yet; o2m takes epsilon and v_prediction"}


ALIASES = {"eps": "epsilon", "v": "v_prediction"}


def prediction_name(value: str) -> str:
    """An option's parametrization (diffusers' name, or the short ``eps``/``v``) as diffusers names it; ValueError
    (a pydantic validator's message) when unknown."""
    name = ALIASES.get(value, value)
    if name not in PARAMETRIZATIONS.names():
        raise ValueError(f"expected one of {', '.join(PARAMETRIZATIONS.names())} (or eps, v)")
    return name


def check_prediction_type(value: object, where: str) -> str:
    """A scheduler config's ``prediction_type`` (missing: epsilon), refused in one line unless registered."""
    name = "epsilon" if value is None else value
    if not isinstance(name, str):
        raise O2MError(f"{where}: prediction_type = {value!r}; expected one of {', '.join(PARAMETRIZATIONS.names())}")
    if name in NOT_YET:
        raise O2MError(f"{where}: prediction_type {name!r}: {NOT_YET[name]}")
    if name not in PARAMETRIZATIONS.names():
        raise O2MError(f"{where}: prediction_type {name!r} is unknown; expected one of "
                       f"{', '.join(PARAMETRIZATIONS.names())}")
    return name


def parametrization_of(scheduler_config: dict) -> Parametrization:
    """The parametrization a model's scheduler config records (checked when the model was loaded)."""
    return PARAMETRIZATIONS.resolve(check_prediction_type(scheduler_config.get("prediction_type"), "scheduler config"))
