"""Pruners, one module per model family, behind a registry keyed by the family's ``_class_name``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from o2mcli.errors import O2MError
from o2mcli.pruning.pruners.base import Pruner
from o2mcli.pruning.pruners.dit import DiTPruner
from o2mcli.pruning.pruners.unet2d import UNet2DPruner
from o2mcli.pruning.pruners.unet2d_condition import UNet2DConditionPruner
from o2mcli.registry import Registry

PRUNERS: Registry[Pruner] = Registry("_class_name", "model family for o2m prune")
PRUNERS.register(UNet2DPruner.family, UNet2DPruner())
PRUNERS.register(UNet2DConditionPruner.family, UNet2DConditionPruner())
PRUNERS.register(DiTPruner.family, DiTPruner())

__all__ = ["PRUNERS", "Pruner", "block_variants", "pruner_for"]


def pruner_for(cfg: dict[str, Any], where: Path) -> Pruner:
    """The pruner of the config's family; a family o2m prune does not handle is refused by name."""
    name = cfg.get("_class_name", "UNet2DModel")
    if name not in PRUNERS:
        raise O2MError(f"{where}: found a {name}; o2m prune supports {', '.join(PRUNERS)}")
    return PRUNERS[name]


def block_variants() -> list[str]:
    """Every block-removal pattern a registered family offers (``--blocks``), in registration order."""
    return [v for p in PRUNERS.values() for v in p.block_variants]
