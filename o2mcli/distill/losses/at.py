"""Attention transfer (Zagoruyko & Komodakis 2017): match normalized spatial energy maps of block features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from o2mcli.distill.losses.base import KDLoss, Outputs


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """A(F) = normalize(mean_c F^2), flattened per sample: independent of the channel count."""
    return F.normalize(f.float().pow(2).mean(1).flatten(1), dim=1)


class AttentionTransfer(KDLoss):
    """sum over blocks of ||A(F_T) - A(F_S)||_2, averaged over the batch."""

    name = "at"
    needs_features = True

    def forward(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        return sum((attention_map(student.features[n]) - attention_map(teacher.features[n])).norm(dim=1).mean()
                   for n in self.points)
