"""K students, each serving one contiguous timestep range (O2MKD sampling)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.models.families import family_of


def check_ranges(ranges: Sequence[tuple[int, int]], num_train_timesteps: int) -> None:
    """Ranges must be sorted, contiguous, non-empty and cover exactly [0, T)."""
    if not ranges:
        raise O2MError("a student group needs at least one timestep range")
    expected = 0
    for lo, hi in ranges:
        if lo != expected or hi <= lo:
            raise O2MError(f"timestep ranges {list(ranges)} must be contiguous, non-empty and start at 0")
        expected = hi
    if expected != num_train_timesteps:
        raise O2MError(f"timestep ranges {list(ranges)} end at {expected}, expected T={num_train_timesteps}")


class StudentGroup(nn.Module):
    """Routes each denoising call to the student whose range ``[lo, hi)`` holds ``t``.

    Called as ``group(x_t, t, cond)`` it returns the raw prediction, as ``models.denoise.predict`` does
    for one model. ``served[k]`` counts the samples student ``k`` denoised (for checks and reports).
    """

    def __init__(self, students: Sequence[nn.Module], ranges: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        if len(students) != len(ranges):
            raise O2MError(f"{len(students)} students but {len(ranges)} timestep ranges")
        check_ranges(ranges, ranges[-1][1])
        self.students = nn.ModuleList(students)
        self.ranges = [tuple(map(int, r)) for r in ranges]
        self.register_buffer("_upper", torch.tensor([hi for _, hi in self.ranges]), persistent=False)
        self.served = [0] * len(students)

    @property
    def config(self):
        return self.students[0].config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def student_for(self, t: int) -> int:
        """Index of the student that serves timestep ``t``."""
        for k, (lo, hi) in enumerate(self.ranges):
            if lo <= t < hi:
                return k
        raise O2MError(f"timestep {t} is outside every student's range {self.ranges}")

    def take(self, timestep, n: int) -> int:
        """The student that serves a single ``timestep`` (the sampling case), counted as serving ``n`` samples."""
        k = self.student_for(int(torch.as_tensor(timestep).reshape(()).item()))
        self.served[k] += n
        return k

    def forward(self, sample: torch.Tensor, timestep, cond: torch.Tensor | None = None) -> torch.Tensor:
        fam = family_of(self.students[0])
        t = torch.as_tensor(timestep)
        if t.numel() == 1:
            # The sampling case: one timestep for the whole batch, one student.
            k = self.take(t, sample.shape[0])
            return fam.predict(self.students[k], sample, timestep, cond)
        t = t.to(sample.device).reshape(-1).expand(sample.shape[0])
        idx = torch.bucketize(t, self._upper.to(t.device), right=True)
        out = None
        for k in idx.unique().tolist():
            mask = idx == k
            part = fam.predict(self.students[k], sample[mask], t[mask], None if cond is None else cond[mask])
            if out is None:
                out = part.new_empty((sample.shape[0], *part.shape[1:]))
            out[mask] = part
            self.served[k] += int(mask.sum())
        return out
