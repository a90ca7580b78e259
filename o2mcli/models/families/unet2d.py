"""diffusers' ``UNet2DModel``: the pixel-space DDPM UNet (unconditional, or class-conditional)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.models.condition import as_condition
from o2mcli.models.configs import check_int_in
from o2mcli.models.families.base import DenoiserFamily, LabelInput, build_from_config
from o2mcli.models.families.unet_cache import UNetDeepCache, unet2d_partial

MAX_SAMPLE_SIZE = 2048
TEXT_BOUNDS = (("cross_attention_dim", 16384),)  # the extra size a text-conditioned UNet config must bound
MAX_ACTIVATION_BYTES = 16 << 30  # one sample's largest feature maps, a generous bound for a UNet2DModel


def check_unet_sizes(cfg: Any, where: Path, extra: tuple[tuple[str, int], ...] = ()) -> None:
    """What every diffusers UNet config must pass before it is built: an object, integer sizes in bounds (and the
    ``extra`` keys' upper bounds), ``sample_size`` an int or [H, W], and activations of bounded size."""
    if not isinstance(cfg, dict):
        raise O2MError(f"{where}: the UNet config is a JSON {type(cfg).__name__}, expected an object")
    for key, hi in (("in_channels", 64), ("out_channels", 128)):
        check_int_in(cfg, key, 1, hi, where, "UNet config")
    # per-block values: a list, or (but for the widths) one integer for every block
    for key, hi in (("block_out_channels", 16384), ("layers_per_block", 64), ("sample_size", MAX_SAMPLE_SIZE),
                    *extra):
        check_int_in(cfg, key, 1, hi, where, "UNet config", many=True)
    if "block_out_channels" in cfg and not isinstance(cfg["block_out_channels"], (list, tuple)):
        raise O2MError(f"{where}: UNet config block_out_channels = {cfg['block_out_channels']!r}; expected a list of "
                       "integers, one width per block")
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) != 2:
        raise O2MError(f"{where}: UNet config sample_size = {size!r}; expected an integer or [height, width]")
    hw = (size, size) if isinstance(size, int) else tuple(size or (32, 32))
    widest = max(cfg.get("block_out_channels") or [1])
    need = hw[0] * hw[1] * widest * 4 * 4  # a few float32 maps at full resolution and the widest width
    if need > MAX_ACTIVATION_BYTES:
        raise O2MError(f"{where}: UNet config sample_size {size!r} x {widest} channels implies "
                       f"{need / 2**30:.0f} GiB of activations per image; refused (at most "
                       f"{MAX_ACTIVATION_BYTES >> 30} GiB)")


def unet_input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of a diffusers UNet's input, from its config (``sample_size`` an int or [H, W])."""
    cfg = model.config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(cfg.in_channels), int(h), int(w)


def unet_block_outputs(model: nn.Module) -> list[str]:
    """Every down block's output, the mid block's and every up block's: a diffusers UNet's feature-KD points."""
    names = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
    if getattr(model, "mid_block", None) is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{i}" for i in range(len(model.up_blocks))]


def _labels(model: nn.Module, x_t: torch.Tensor, cond: Any) -> Optional[torch.Tensor]:
    """The class labels to pass: ``cond``'s (a Condition, or bare labels), or for a class-conditional model asked
    without labels (MACs, feature shapes) the last embedding, which is the null class of o2m's conditional models
    (classifier-free guidance's unconditional branch)."""
    cond = as_condition(cond, "labels")
    labels = None if cond is None else cond.labels
    n_embeds = getattr(getattr(model, "module", model).config, "num_class_embeds", None)
    if labels is None and n_embeds:
        return torch.full((x_t.shape[0],), n_embeds - 1, dtype=torch.long, device=x_t.device)
    return labels


class UNet2D(UNetDeepCache, DenoiserFamily):
    """``UNet2DModel``: eps (and v) from ``model(x_t, t[, class_labels]).sample``."""

    name = "UNet2DModel"

    def check_config(self, cfg: Any, where: Path) -> None:
        check_unet_sizes(cfg, where)

    def build(self, cfg: dict[str, Any], state: Optional[dict[str, torch.Tensor]], where: Path) -> nn.Module:
        from diffusers import UNet2DModel

        self.check_config(cfg, where)
        return build_from_config(UNet2DModel, cfg, state, where)

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        labels = _labels(model, x_t, cond)
        if labels is None:
            return model(x_t, t).sample
        return model(x_t, t, class_labels=labels).sample

    def deepcache_partial(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor],
                          branch: int, cache: Any) -> torch.Tensor:
        return unet2d_partial(model, x_t, t, _labels(model, x_t, cond), branch, cache)

    def label_input(self, cfg: dict[str, Any]) -> LabelInput:
        n = cfg.get("num_class_embeds")
        return LabelInput("num_class_embeds", int(n) if n else None, "class embeddings",
                          same=(("class_embed_type", cfg.get("class_embed_type")),))

    def input_shape(self, model: nn.Module) -> tuple[int, int, int]:
        return unet_input_shape(model)

    def feature_points(self, model: nn.Module) -> list[str]:
        return unet_block_outputs(model)

    def pipeline(self, model: nn.Module, scheduler: Any, parts: Any = None) -> Any:
        from diffusers import DDPMPipeline

        return DDPMPipeline(unet=model, scheduler=scheduler)
