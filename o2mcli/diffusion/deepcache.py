"""DeepCache at sampling time (Ma, Fang, Wang 2024): every N-th step a full forward refreshes the cache of the deep
features; the steps between recompute only the shallow branch B around it.

The per-architecture forwards live behind the family interface (``DenoiserFamily.deepcache_predict``); this module
holds the schedule and the per-trajectory state. With a K-student group (O2MKD) a cache belongs to the student
that computed it: a step served by another student is a full step, whatever the schedule says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from o2mcli.errors import O2MError, OptionError
from o2mcli.models.families import family_of
from o2mcli.models.group import StudentGroup


@dataclass(frozen=True)
class DeepCacheSpec:
    """The cache interval N (1: every step full, no caching) and the cache branch B (down block B's pair)."""

    interval: int
    branch: int = 0

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise OptionError("deepcache", self.interval, "the cache interval N must be at least 1 (1: no caching)")
        if self.branch < 0:
            raise OptionError("cache_branch", self.branch, "the cache branch must be 0 or more (0: the first "
                              "down block)")


@dataclass
class DeepCacheCounts:
    """Model calls actually made over a sampling run: full forwards and partial (shallow-branch) forwards."""

    full: int = 0
    partial: int = 0


def is_full_step(step: int, interval: int) -> bool:
    """DeepCache's uniform 1:N strategy (Ma et al. 2024, Sec. 3.3): step ``step`` (0-based) is full iff N divides it."""
    return step % interval == 0


def scheduled_calls(steps: int, interval: int) -> tuple[int, int]:
    """(full, partial) calls of one ``steps``-step trajectory of one model under the 1:N schedule."""
    full = -(-steps // interval)
    return full, steps - full


def average_macs(full_calls: int, partial_calls: int, full_macs: float, partial_macs: float) -> float:
    """MACs per call averaged over the calls made: (full * F + partial * P) / (full + partial)."""
    calls = full_calls + partial_calls
    if calls == 0:
        raise O2MError("DeepCache: no model calls were made, so there is no average")
    return (full_calls * full_macs + partial_calls * partial_macs) / calls


def members(model: nn.Module) -> list[nn.Module]:
    """The networks a sampler may call: a group's students, or the one model."""
    return list(model.students) if isinstance(model, StudentGroup) else [model]


def check_deepcache(model: nn.Module, spec: DeepCacheSpec) -> int:
    """Refuse a model DeepCache cannot run (not a UNet) or a branch it lacks; returns its down-block count
    (the smallest over a group's students)."""
    counts = [family_of(m).deepcache_branches(m) for m in members(model)]
    n = min(counts)
    if spec.branch >= n:
        what = "the model has" if len(counts) == 1 else "the smallest student has"
        raise OptionError("cache_branch", spec.branch, f"{what} {n} down blocks, so the branch must be 0..{n - 1}")
    return n


class CachedDenoiser:
    """One trajectory's DeepCache state, called like ``models.denoise.predict`` once per sampler step.

    A fresh one per batch: a cache holds the features of the batch (with classifier-free guidance the concatenated
    conditional and unconditional halves, since both go through one call) it was computed on.
    """

    def __init__(self, spec: DeepCacheSpec, counts: Optional[DeepCacheCounts] = None) -> None:
        self.spec = spec
        self.counts = counts if counts is not None else DeepCacheCounts()
        self.step = 0
        self.cache: Any = None
        self.owner: Optional[int] = None  # which student computed the cache (0 for a single model)

    def __call__(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                 cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(model, StudentGroup):
            k = model.take(t, x_t.shape[0])
            net = model.students[k]
        else:
            k, net = 0, model
        fam = family_of(net)
        full = self.cache is None or self.owner != k or is_full_step(self.step, self.spec.interval)
        self.step += 1
        if full and self.spec.interval == 1:
            # N=1: nothing is ever reused, so no cache is kept; the plain forward, bit for bit.
            self.counts.full += 1
            return fam.predict(net, x_t, t, cond)
        out, self.cache = fam.deepcache_predict(net, x_t, t, cond, self.spec.branch, None if full else self.cache)
        self.owner = k
        if full:
            self.counts.full += 1
        else:
            self.counts.partial += 1
        return out
