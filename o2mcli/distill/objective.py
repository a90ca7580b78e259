"""What a student minimizes: L = [L_diff] + alpha * L_KD + lambda * KL (each term optional).

O2MKD on real data: L_diff + alpha L_KD (the paper's balancing weight; default alpha = 1).
DKDM: no L_diff (there is no true noise), L_KD = output KD, plus lambda KL between the
teacher's and the student's reverse Gaussians when both learn their variance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from o2mcli.diffusion.gaussian import DiffusionTerms
from o2mcli.distill.losses.base import KDLoss, Outputs
from o2mcli.distill.losses.diffusion import diffusion_loss
from o2mcli.distill.sources.base import Batch

KLTerm = Callable[[Outputs, Outputs, Batch, DiffusionTerms], torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """Weights of the loss terms; ``kl`` is the DKDM KL term (None when it does not apply)."""

    alpha: float = 1.0
    use_diffusion: bool = True
    vlb_weight: float = 0.001
    kl_weight: float = 0.0
    kl: KLTerm | None = None

    def __call__(self, kd: KDLoss, student: Outputs, teacher: Outputs, batch: Batch,
                 terms: DiffusionTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        if self.use_diffusion and batch.noise is not None:
            parts["diff"] = diffusion_loss(student, batch, terms, self.vlb_weight)
        parts["kd"] = kd(student, teacher)
        total = parts.get("diff", 0.0) + self.alpha * parts["kd"]
        if self.kl is not None and self.kl_weight > 0:
            parts["kl"] = self.kl(student, teacher, batch, terms)
            total = total + self.kl_weight * parts["kl"]
        parts["loss"] = total
        return total, parts
