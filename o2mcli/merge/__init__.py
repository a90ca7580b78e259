"""Merge methods for K students of one run, one module each, behind a registry (``--method``)."""

from __future__ import annotations

from typing import Callable

from o2mcli.errors import O2MError
from o2mcli.merge.average import weighted_average
from o2mcli.merge.task_arithmetic import task_arithmetic

MERGE_METHODS: dict[str, Callable[..., dict]] = {"task-arithmetic": task_arithmetic, "average": weighted_average}


def get_method(name: str) -> Callable[..., dict]:
    """The merge method registered as ``name``."""
    try:
        return MERGE_METHODS[name]
    except KeyError as e:
        raise O2MError(f"--method {name!r}: unknown merge method (choose from {', '.join(MERGE_METHODS)})") from e
