"""What a student minimizes: L = [L_diff] + alpha * L_KD + lambda * KL (each term optional).

O2MKD on real data: L_diff + alpha L_KD (the paper's balancing weight; default alpha = 1).
DKDM: no L_diff (there is no true noise), L_KD = output KD, plus lambda KL between the
teacher's and the student's reverse Gaussians when both learn their variance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from o2mcli.diffusion.gaussian import DiffusionTerms, mean_flat, reverse_kl
from o2mcli.models.parametrization import Epsilon, Parametrization
from o2mcli.distill.losses.base import KDLoss, Outputs
from o2mcli.distill.losses.output import OutputKD
from o2mcli.diffusion.losses import hybrid_loss
from o2mcli.distill.sources.base import Batch

KLTerm = Callable[[Outputs, Outputs, Batch, DiffusionTerms], torch.Tensor]


def dkdm_kl(student: Outputs, teacher: Outputs, batch: Batch, terms: DiffusionTerms,
            clip: float | None = 1.0) -> torch.Tensor:
    """DKDM's L'_vlb: KL(p_T || p_S), teacher mean from its clipped x0, student mean unclipped and detached."""
    return reverse_kl(terms, batch.x_t, batch.t, teacher.eps, teacher.v, student.eps.detach(), student.v,
                      clip=clip).mean()


@dataclass(frozen=True)
class Objective:
    """Weights of the loss terms.

    ``base`` is ``diffusion`` (L_diff against the true noise, or the target ``param`` makes of it: real data) or
    ``output`` (DKDM's L'_simple = ||eps_T - eps_S||^2, in the students' parametrization: data-free); a ``--kd`` other than ``output`` adds
    ``alpha * L_KD``; ``kl`` is the DKDM KL term (None when teacher or student has fixed variance).
    """

    alpha: float = 1.0
    base: Literal["diffusion", "output"] = "diffusion"
    vlb_weight: float = 0.001
    kl_weight: float = 0.0
    kl: KLTerm | None = None
    # The students' parametrization: L_diff regresses its target (eps: the noise; v: Salimans & Ho's v).
    param: Parametrization = field(default_factory=Epsilon)

    @property
    def needs_teacher(self) -> bool:
        """Whether the objective reads the teacher whatever the KD loss (DKDM's L'_simple, the KL term)."""
        return self.base == "output" or (self.kl is not None and self.kl_weight > 0)

    def __call__(self, kd: KDLoss, student: Outputs, teacher: Outputs | None, batch: Batch,
                 terms: DiffusionTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        total: torch.Tensor | float = 0.0
        if self.base == "diffusion" and batch.noise is not None:
            target = self.param.target(terms, batch.x0, batch.noise, batch.t)
            parts["diff"], mse, vlb = hybrid_loss(terms, batch.x0, batch.x_t, batch.t, student.pred, target,
                                                  student.eps, student.v, self.vlb_weight)
            if student.v is not None:  # the hybrid loss's two terms, logged apart
                parts["mse"], parts["vlb"] = mse, vlb
            total = parts["diff"]
        elif self.base == "output":
            parts["simple"] = mean_flat((student.pred - teacher.pred) ** 2).mean()
            total = parts["simple"]
        if kd.needs_teacher and not (self.base == "output" and isinstance(kd, OutputKD)):
            # (DKDM's L'_simple already is output KD, so a loss that also holds one adds only its feature part;
            # ``none`` adds nothing)
            features_only = self.base == "output" and hasattr(kd, "feature_loss")
            parts["kd"] = kd.feature_loss(student, teacher) if features_only else kd(student, teacher)
            total = total + self.alpha * parts["kd"]
        if self.kl is not None and self.kl_weight > 0:
            parts["kl"] = self.kl(student, teacher, batch, terms)
            total = total + self.kl_weight * parts["kl"]
        parts["loss"] = total
        return total, parts
