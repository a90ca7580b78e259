"""The data-source interface of the distillation engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Batch:
    """Noisy inputs at timesteps ``t``; ``noise``/``x0`` are known only for real-data sources."""

    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor | None = None
    x0: torch.Tensor | None = None
    slots: torch.Tensor | None = None  # buffer slots (data-free sources)
    t_host: torch.Tensor | None = None  # the same t on the CPU (buffer bookkeeping without a device sync)
    cond: torch.Tensor | None = None  # class labels (the null class where dropped), for conditional models


class DataSource(Protocol):
    """Draws batches on a timestep range; may update itself from the teacher's output."""

    name: str
    needs_teacher: bool  # whether after_teacher reads the teacher's output
    shared: bool  # True: students on one range share a batch; False: each student draws its own (a shard)

    def begin_step(self) -> None:
        """Called once per training step before its draws (the buffer keeps one step's draws disjoint)."""

    def draw(self, lo: int, hi: int, n: int, generator: torch.Generator, student: int = 0) -> Batch:
        """``n`` samples on [lo, hi) for ``student`` (a sharded source draws from that student's shard)."""

    def after_teacher(self, batch: Batch, teacher_out: torch.Tensor, generator: torch.Generator) -> None: ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...
