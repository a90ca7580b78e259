"""No KD: the student learns from the data alone (the papers' "w/o KD" baseline row)."""

from __future__ import annotations

import torch

from o2mcli.distill.losses.base import KDLoss, Outputs


class NoKD(KDLoss):
    """Contributes nothing and needs no teacher: with it the engine never runs the teacher."""

    name = "none"
    needs_teacher = False

    def forward(self, student: Outputs, teacher: Outputs | None) -> torch.Tensor:
        return student.pred.new_zeros(())
