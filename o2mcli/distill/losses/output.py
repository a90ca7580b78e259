"""Prediction KD (Hinton et al. 2015, for diffusion): ||eps_T(x_t, t) - eps_S(x_t, t)||^2, in the students'
parametrization (eps, or v for a v-prediction student: the teacher's output converted exactly)."""

from __future__ import annotations

import torch

from o2mcli.diffusion.gaussian import mean_flat
from o2mcli.distill.losses.base import KDLoss, Outputs


class OutputKD(KDLoss):
    """MSE between the teacher's and the student's predictions (mean over pixels and batch)."""

    name = "output"

    def forward(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        return mean_flat((student.pred - teacher.pred) ** 2).mean()
