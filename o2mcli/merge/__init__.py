"""Merge methods for K students of one run, one module each, behind a registry (``--method``)."""

from __future__ import annotations

from typing import Callable

from o2mcli.merge.average import weighted_average
from o2mcli.merge.task_arithmetic import task_arithmetic
from o2mcli.registry import Registry

MERGE_METHODS: Registry[Callable[..., dict]] = Registry("--method", "merge method")
MERGE_METHODS.register("task-arithmetic", task_arithmetic)
MERGE_METHODS.register("average", weighted_average)


def get_method(name: str) -> Callable[..., dict]:
    """The merge method registered as ``name``."""
    return MERGE_METHODS.resolve(name)
