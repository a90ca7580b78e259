"""Merge methods for K students of one run, one module each, behind a registry (``--method``)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from o2mcli.merge.average import weighted_average
from o2mcli.merge.task_arithmetic import task_arithmetic
from o2mcli.registry import Registry

MERGE_METHODS: Registry[Callable[..., dict]] = Registry("--method", "merge method")
MERGE_METHODS.register("task-arithmetic", task_arithmetic)
MERGE_METHODS.register("average", weighted_average)


def get_method(name: str) -> Callable[..., dict]:
    """The merge method registered as ``name``."""
    return MERGE_METHODS.resolve(name)


def first_nonfinite(state: dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating tensor of ``state`` holding an inf or NaN, or None when every one is finite."""
    for key, v in state.items():
        if v.dtype.is_floating_point and not bool(torch.isfinite(v).all()):
            return key
    return None
