"""Model families behind the denoiser interface, one module each, keyed by diffusers' ``_class_name``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from o2mcli.errors import O2MError
from o2mcli.models.families.base import DenoiserFamily
from o2mcli.models.families.dit import DiT
from o2mcli.models.families.stable_diffusion import SDPipelineFormat
from o2mcli.models.families.stable_diffusion_xl import SDXLPipelineFormat
from o2mcli.models.families.unet2d import UNet2D
from o2mcli.models.families.unet2d_condition import UNet2DCondition
from o2mcli.registry import Registry

FAMILIES: Registry[DenoiserFamily] = Registry("_class_name", "model family")
FAMILIES.register(UNet2D.name, UNet2D())
FAMILIES.register(UNet2DCondition.name, UNet2DCondition())
FAMILIES.register(DiT.name, DiT())

DEFAULT_FAMILY = UNet2D.name  # a config without _class_name (o2m's own, older files)

# Pipeline directories whose denoiser comes with a codec's parts (VAE, text encoders), keyed by the pipeline class
# their model_index.json names; each claims its directories, checks their layout and makes the model's record.
PIPELINES: Registry[Any] = Registry("model_index.json _class_name", "pipeline format")
PIPELINES.register(SDPipelineFormat.name, SDPipelineFormat())
PIPELINES.register(SDXLPipelineFormat.name, SDXLPipelineFormat())

__all__ = ["FAMILIES", "PIPELINES", "DenoiserFamily", "family_for_config", "family_of", "pipeline_format"]


def family_for_config(cfg: Any, where: Path, served: bool = False) -> DenoiserFamily:
    """The family a config's ``_class_name`` names; an unsupported class is refused by name, and with ``served``
    so is a family whose stages are not built yet (loading a model for a stage asks that)."""
    name = cfg.get("_class_name", DEFAULT_FAMILY) if isinstance(cfg, dict) else DEFAULT_FAMILY
    ready = [n for n in FAMILIES if FAMILIES[n].not_yet is None]
    if name not in FAMILIES:
        raise O2MError(f"{where}: found a {name}; o2m supports {', '.join(ready)}")
    family = FAMILIES[name]
    if served and family.not_yet is not None:
        raise O2MError(f"{where}: found a {name}: {family.not_yet}")
    return family


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def family_of(model: nn.Module) -> DenoiserFamily:
    """The family of a built model (DDP-wrapped or not)."""
    name = type(_unwrap(model)).__name__
    if name not in FAMILIES:
        raise O2MError(f"a {name} is not a model family o2m supports ({', '.join(FAMILIES)})")
    return FAMILIES[name]


def pipeline_format(root: Path) -> Any:
    """The registered pipeline format that claims the directory ``root``, or None (a plain pipeline such as
    DDPMPipeline's, whose ``unet/`` is all there is)."""
    return next((fmt for fmt in PIPELINES.values() if fmt.claims(root)), None)
