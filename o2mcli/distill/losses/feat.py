"""BK-SDM's block-output feature KD (Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable
Diffusion", Eq. 2-4), for any UNet family with block feature points (UNet2DModel and UNet2DConditionModel).

BK-SDM trains a block-removed student on

    L = L_task + lambda_out * L_outKD + lambda_feat * L_featKD,
    L_outKD  = E ||eps_T(z_t, y, t) - eps_S(z_t, y, t)||^2,
    L_featKD = E sum_l ||f_T^l(z_t, y, t) - f_S^l(z_t, y, t)||^2,

with l over the outputs of the stages both networks still have, each term a mean squared error
(their code: ``F.mse_loss(..., reduction="mean")`` per block, summed over blocks), and
lambda_out = lambda_feat = 1. o2m's objective already adds L_task (L_diff on real data) and
``alpha * L_KD``; this loss is ``L_KD = lambda_out * L_outKD + lambda_feat * L_featKD``, so
``--alpha 1`` is BK-SDM's recipe.

BK-SDM's students only drop blocks, so matched blocks have the teacher's width. A uniformly
slimmed student (``o2m prune --ratio``) has fewer channels; there the student feature first
passes a learned 1x1 convolution to the teacher's width (FitNets' regressor, Romero et al. 2015),
trained with the student and initialised from the loss's generator (so runs are reproducible).
Blocks of equal width are compared directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from o2mcli.diffusion.gaussian import mean_flat
from o2mcli.distill.losses.base import KDLoss, Outputs


def _key(point: str) -> str:
    """A block name as a ModuleDict key (which may not contain dots)."""
    return point.replace(".", "__")


class FeatureKD(KDLoss):
    """lambda_out * MSE(pred_S, pred_T) (the students' parametrization) + lambda_feat * sum over matched blocks of MSE(P(f_S), f_T)."""

    name = "feat"
    needs_features = True

    def __init__(self, student_channels: dict[str, int], teacher_channels: dict[str, int],
                 generator: torch.Generator | None = None, lambda_out: float = 1.0,
                 lambda_feat: float = 1.0) -> None:
        super().__init__(student_channels, teacher_channels, generator)
        g = generator or torch.Generator().manual_seed(0)
        self.lambda_out = float(lambda_out)
        self.lambda_feat = float(lambda_feat)
        self.proj = nn.ModuleDict()
        for point in self.points:  # in the matched order, so the generator's draws are reproducible
            s, t = int(student_channels[point]), int(teacher_channels[point])
            if s == t:
                continue  # BK-SDM's case: the identity
            conv = nn.Conv2d(s, t, kernel_size=1, bias=False)
            bound = s ** -0.5  # PyTorch's default conv bound (kaiming_uniform, a=sqrt(5)): 1/sqrt(fan_in)
            with torch.no_grad():
                conv.weight.uniform_(-bound, bound, generator=g)
            self.proj[_key(point)] = conv

    def projected(self, point: str, f: torch.Tensor) -> torch.Tensor:
        """The student feature of ``point`` at the teacher's width (unchanged where the widths agree)."""
        key = _key(point)
        return self.proj[key](f.float()) if key in self.proj else f.float()

    def feature_loss(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        """L_featKD: sum over the matched blocks of the mean squared error to the teacher's block output."""
        return sum(F.mse_loss(self.projected(n, student.features[n]), teacher.features[n].float())
                   for n in self.points)

    def output_loss(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        """L_outKD: as ``--kd output`` computes it (mean over pixels and batch)."""
        return mean_flat((student.pred - teacher.pred) ** 2).mean()

    def forward(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        return self.lambda_out * self.output_loss(student, teacher) + \
            self.lambda_feat * self.feature_loss(student, teacher)
