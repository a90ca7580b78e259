"""Channel-importance criteria, one module each, behind a registry.

Each criterion returns a torch-pruning importance object: called on a dependency group, it
scores every channel of the group's root layer (higher = keep).
"""

from __future__ import annotations

from typing import Any, Callable

from o2mcli.pruning.importance.magnitude import magnitude
from o2mcli.pruning.importance.random import random_importance
from o2mcli.pruning.importance.taylor import taylor
from o2mcli.registry import Registry

IMPORTANCE: Registry[Callable[..., Any]] = Registry("--importance", "criterion")
IMPORTANCE.register("magnitude", magnitude)
IMPORTANCE.register("random", random_importance)
IMPORTANCE.register("taylor", taylor)


def get_importance(name: str) -> Callable[..., Any]:
    """The criterion registered as ``name``."""
    return IMPORTANCE.resolve(name)
