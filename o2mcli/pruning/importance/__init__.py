"""Channel-importance criteria, one module each, behind a registry.

Each criterion returns a torch-pruning importance object: called on a dependency group, it
scores every channel of the group's root layer (higher = keep).
"""

from __future__ import annotations

from typing import Any, Callable

from o2mcli.errors import O2MError
from o2mcli.pruning.importance.magnitude import magnitude
from o2mcli.pruning.importance.random import random_importance
from o2mcli.pruning.importance.taylor import taylor

IMPORTANCE: dict[str, Callable[..., Any]] = {
    "magnitude": magnitude,
    "random": random_importance,
    "taylor": taylor,
}


def get_importance(name: str) -> Callable[..., Any]:
    """The criterion registered as ``name``."""
    try:
        return IMPORTANCE[name]
    except KeyError as e:
        raise O2MError(f"--importance {name!r}: unknown criterion (choose from {', '.join(IMPORTANCE)})") from e
