"""Random channel scores: the baseline every criterion must beat."""

from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp


class _SeededRandom(tp.importance.Importance):
    """Uniform random scores drawn from one seeded generator, so ``--seed`` fixes the template."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, group: Any, **_: Any) -> torch.Tensor:
        n = len(group[0].idxs)
        return torch.rand(n, generator=self.generator)


def random_importance(*, seed: int = 0, **_: Any) -> tp.importance.Importance:
    """Seeded random importance."""
    return _SeededRandom(seed)
