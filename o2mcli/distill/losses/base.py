"""The KD-loss interface: a module scoring a student's outputs against the teacher's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


@dataclass
class Outputs:
    """One model's outputs on a batch: its prediction in the run's stated space (the students' parametrization:
    what KD and L_simple compare), the eps it implies (what the Gaussian terms read), the variance channels (if
    learned), block features."""

    eps: torch.Tensor
    v: torch.Tensor | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    pred: torch.Tensor | None = None  # None: ``eps`` (an eps-prediction run)

    def __post_init__(self) -> None:
        if self.pred is None:
            self.pred = self.eps


class KDLoss(nn.Module):
    """Base class: ``forward(student, teacher) -> scalar``; teacher tensors arrive detached.

    Subclasses that read block features set ``needs_features``; they receive the channel counts
    of both sides, which may differ (a pruned student), and the matched block names.
    """

    name: ClassVar[str] = ""
    needs_features: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = True  # False only for ``none``: the engine then skips the teacher

    def __init__(self, student_channels: dict[str, int], teacher_channels: dict[str, int],
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.points = list(student_channels)

    def forward(self, student: Outputs, teacher: Outputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
