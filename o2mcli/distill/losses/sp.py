"""Similarity-preserving KD (Tung & Mori 2019): match the batch's pairwise similarity matrices."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from o2mcli.distill.losses.base import KDLoss, Outputs


def similarity(f: torch.Tensor) -> torch.Tensor:
    """G = row_normalize(Q Q^T), Q = F.view(b, -1): a b x b matrix, whatever the channel count."""
    q = f.float().flatten(1)
    return F.normalize(q @ q.t(), dim=1)


class SimilarityPreserving(KDLoss):
    """sum over blocks of ||G_T - G_S||_F^2 / b^2."""

    name = "sp"
    needs_features = True

    def forward(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        b = student.pred.shape[0]
        return sum((similarity(student.features[n]) - similarity(teacher.features[n])).pow(2).sum() / (b * b)
                   for n in self.points)
