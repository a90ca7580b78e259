"""Model families behind the denoiser interface, one module each, keyed by diffusers' ``_class_name``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from o2mcli.errors import O2MError
from o2mcli.models.families.base import DenoiserFamily
from o2mcli.models.families.unet2d import UNet2D
from o2mcli.registry import Registry

FAMILIES: Registry[DenoiserFamily] = Registry("_class_name", "model family")
FAMILIES.register(UNet2D.name, UNet2D())

DEFAULT_FAMILY = UNet2D.name  # a config without _class_name (o2m's own, older files)

__all__ = ["FAMILIES", "DenoiserFamily", "family_for_config", "family_of"]


def family_for_config(cfg: Any, where: Path) -> DenoiserFamily:
    """The family a config's ``_class_name`` names; an unsupported class is refused by name."""
    name = cfg.get("_class_name", DEFAULT_FAMILY) if isinstance(cfg, dict) else DEFAULT_FAMILY
    if name not in FAMILIES:
        raise O2MError(f"{where}: found a {name}; o2m supports {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def family_of(model: nn.Module) -> DenoiserFamily:
    """The family of a built model (DDP-wrapped or not)."""
    name = type(_unwrap(model)).__name__
    if name not in FAMILIES:
        raise O2MError(f"a {name} is not a model family o2m supports ({', '.join(FAMILIES)})")
    return FAMILIES[name]
