"""The timestep plan: K contiguous ranges, and which range each student trains on at each step.

O2MKD (Zhang et al.): at every iteration student k trains on timesteps drawn uniformly from its
own range R_k with probability ``p_own``, otherwise from all of [0, T). p_own = 0, or K = 1, is
one-to-one KD (O2OKD); p_own = 1 trains each student on its range only (the paper shows it
converges badly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from o2mcli.errors import OptionError
from o2mcli.parsing import int_list


def uniform_boundaries(T: int, k: int) -> list[int]:
    """``[0, T/K, 2T/K, ..., T]`` (integer, contiguous)."""
    if not 1 <= k <= T:
        raise OptionError("students", k, f"must be between 1 and the {T} training timesteps")
    return [round(i * T / k) for i in range(k + 1)]


def parse_boundaries(bounds: str | Sequence[int], T: int) -> list[int]:
    """``"0,200,450,700,1000"`` (or those integers) -> validated boundaries (from 0 to T, strictly increasing)."""
    try:
        b = list(int_list(bounds))
    except ValueError:
        raise OptionError("boundaries", bounds, f"expected comma-separated integers like 0,250,500,750,{T}") from None
    if len(b) < 2 or b[0] != 0 or b[-1] != T:
        raise OptionError("boundaries", bounds, f"must start at 0 and end at T={T}")
    for lo, hi in zip(b, b[1:]):
        if hi <= lo:
            raise OptionError("boundaries", bounds, f"must be strictly increasing (empty range [{lo}, {hi}))")
    return b


@dataclass(frozen=True)
class TimestepPlan:
    """K ranges ``[b_k, b_{k+1})`` over ``[0, T)`` and the probability of training on the own range."""

    boundaries: tuple[int, ...]
    p_own: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_own <= 1.0:
            raise OptionError("p_own", self.p_own, "must be a probability in [0, 1]")

    @property
    def T(self) -> int:
        return self.boundaries[-1]

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self.boundaries[:-1], self.boundaries[1:]))

    @property
    def max_draws_per_step(self) -> int:
        """The most distinct ranges one step can draw from (the full range and each own range)."""
        own = [r for r in self.ranges if r != (0, self.T)]
        if self.p_own == 0 or not own:
            return 1
        return len(own) + (1 if self.p_own < 1 else 0)

    def choose(self, generator: torch.Generator) -> list[tuple[int, int]]:
        """One draw per student for this step: the range its batch's timesteps come from."""
        coins = torch.rand(len(self.ranges), generator=generator)
        full = (0, self.T)
        return [r if (r != full and float(c) < self.p_own) else full for r, c in zip(self.ranges, coins)]


def draw_timesteps(lo: int, hi: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` timesteps uniform on ``[lo, hi)``."""
    return torch.randint(lo, hi, (n,), generator=generator)


def plan_for(boundaries: str | Sequence[int] | None, T: int, students: int, p_own: float) -> TimestepPlan:
    """The run's plan: ``--boundaries`` (checked against K) or K uniform ranges of [0, T)."""
    bounds = parse_boundaries(boundaries, T) if boundaries else uniform_boundaries(T, students)
    if boundaries and len(bounds) - 1 != students:
        raise OptionError("boundaries", boundaries, f"makes {len(bounds) - 1} ranges for {students} students")
    return TimestepPlan(tuple(bounds), p_own)
