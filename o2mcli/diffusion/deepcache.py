"""DeepCache at sampling time (Ma, Fang, Wang 2024): full steps refresh the cache of the deep features; the steps
between recompute only the shallow layer branch B around it (``o2mcli.models.families.unet_cache`` defines a layer
branch: skip feature B and the layers shallower than it).

Which steps are full: the uniform 1:N schedule (every N-th step, step 0 included) or the paper's non-uniform 1:N
schedule (the same number of full steps, packed densely around a center step by a power law; Sec. 3.3).

The per-architecture forwards live behind the family interface (``DenoiserFamily.deepcache_predict``); this module
holds the schedule and the per-trajectory state. With a K-student group (O2MKD) a cache belongs to the student
that computed it: a step served by another student is a full step, whatever the schedule says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from o2mcli.errors import O2MError, OptionError
from o2mcli.models.families import family_of
from o2mcli.models.group import StudentGroup


SCHEDULES = ("uniform", "nonuniform")
BRANCH_UNIT = "layer"  # what a branch counts in the sample manifest's DeepCache record (earlier o2m: block pairs)
NONUNIFORM_POWER = 1.4  # the power law's starting exponent (lowered by 0.02 until the full steps are distinct)
NONUNIFORM_CENTER = 0.2  # the center step as a fraction of the steps (step 10 of 50)


@dataclass(frozen=True)
class DeepCacheSpec:
    """The cache interval N (1: every step full, no caching), the layer branch B (skip feature B and the layers
    shallower than it are recomputed) and the schedule of full steps (``uniform`` or ``nonuniform``)."""

    interval: int
    branch: int = 0
    schedule: str = "uniform"

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise OptionError("deepcache", self.interval, "the cache interval N must be at least 1 (1: no caching)")
        if self.branch < 0:
            raise OptionError("cache_branch", self.branch, "the cache branch must be 0 or more (0: conv_in's skip, "
                              "the paper's setting)")
        if self.schedule not in SCHEDULES:
            raise OptionError("deepcache_schedule", self.schedule,
                              f"the schedule must be one of {', '.join(SCHEDULES)}")

    def record(self) -> dict[str, Any]:
        """The schedule as manifests and reports record it."""
        return {"interval": self.interval, "branch": self.branch, "branch_unit": BRANCH_UNIT,
                "schedule": self.schedule}


@dataclass
class DeepCacheCounts:
    """Model calls actually made over a sampling run: full forwards and partial (shallow-branch) forwards."""

    full: int = 0
    partial: int = 0


def is_full_step(step: int, interval: int) -> bool:
    """DeepCache's uniform 1:N strategy (Ma et al. 2024, Sec. 3.3): step ``step`` (0-based) is full iff N divides it."""
    return step % interval == 0


def nonuniform_full_steps(steps: int, interval: int, center: Optional[int] = None,
                          power: float = NONUNIFORM_POWER) -> list[int]:
    """DeepCache's non-uniform 1:N strategy (Ma et al. 2024, Sec. 3.3): ceil(T/N) full steps at
    c + floor(sign(u)|u|^p) for u evenly spaced over [-c^(1/p), (T-c)^(1/p)), so dense around step c; step 0 always.

    Deterministic. As in the paper's code, p is lowered by 0.02 until the steps are distinct; at p = 1 they are
    floor(T i / k), always distinct. ``center`` defaults to T/5 (rounded)."""
    k = -(-steps // interval)
    c = round(NONUNIFORM_CENTER * steps) if center is None else center
    if not 0 <= c <= steps:
        raise O2MError(f"DeepCache: the non-uniform schedule's center {c} is outside steps 0..{steps}")
    n = 0
    while True:
        p = power - 0.02 * n
        p = 1.0 if p <= 1 + 1e-9 else p
        lo, hi = -(c ** (1 / p)), (steps - c) ** (1 / p)
        full = {0}
        for i in range(1, k):
            u = lo + (hi - lo) * i / k
            full.add(min(steps - 1, c + math.floor(math.copysign(abs(u) ** p, u))))
        if len(full) == k or p == 1.0:
            return sorted(full)
        n += 1


def full_steps(steps: int, interval: int, schedule: str = "uniform") -> list[int]:
    """The full steps (0-based) of one ``steps``-step trajectory of one model under ``schedule``."""
    if schedule == "nonuniform":
        return nonuniform_full_steps(steps, interval)
    return [i for i in range(steps) if is_full_step(i, interval)]


def scheduled_calls(steps: int, interval: int, schedule: str = "uniform") -> tuple[int, int]:
    """(full, partial) calls of one ``steps``-step trajectory of one model under the schedule."""
    full = len(full_steps(steps, interval, schedule))
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
    """Refuse a model DeepCache cannot run (not a UNet, or blocks it cannot split by layer) or a layer branch it
    lacks; returns its number of layer branches (skip features; the smallest over a group's students)."""
    nets = members(model)
    counts = [family_of(m).deepcache_branches(m) for m in nets]
    n = min(counts)
    if spec.branch >= n:
        net = nets[counts.index(n)]
        name = type(getattr(net, "module", net)).__name__
        what = f"the {name}" if len(counts) == 1 else f"the smallest student ({name})"
        raise OptionError("cache_branch", spec.branch, f"{what} has {n} layer branches (skip features), so the "
                          f"branch must be 0..{n - 1}")
    return n


class CachedDenoiser:
    """One trajectory's DeepCache state, called like ``models.denoise.predict`` once per sampler step.

    A fresh one per batch: a cache holds the features of the batch (with classifier-free guidance the concatenated
    conditional and unconditional halves, since both go through one call) it was computed on.
    """

    def __init__(self, spec: DeepCacheSpec, counts: Optional[DeepCacheCounts] = None,
                 steps: Optional[int] = None) -> None:
        self.spec = spec
        self.counts = counts if counts is not None else DeepCacheCounts()
        self.full_steps: Optional[frozenset[int]] = None  # None: the uniform rule, step by step
        if spec.schedule != "uniform":
            if steps is None:
                raise O2MError(f"DeepCache: the {spec.schedule} schedule needs the trajectory's number of steps")
            self.full_steps = frozenset(full_steps(steps, spec.interval, spec.schedule))
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
        scheduled = (is_full_step(self.step, self.spec.interval) if self.full_steps is None
                     else self.step in self.full_steps)
        full = self.cache is None or self.owner != k or scheduled
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
