"""What a text-conditioned ``UNet2DConditionModel`` config says about its inputs (Stable Diffusion 1.x/2.x and SDXL):
the widths it reads, SDXL's added time ids, and a plain build for block-removal plans. Shared by the family, the
SD/SDXL pipeline modules and the pruners, below all of them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

TIME_IDS = 6  # SDXL's added time ids: original (H, W), crop (top, left), target (H, W)
VAE_FACTOR = 8  # pixels per latent a side (SD/SDXL VAE): the stand-in time ids' size from a latent's
# SDXL's added sizes, bounded like every other size before a model is built
XL_BOUNDS = (("addition_time_embed_dim", 16384), ("projection_class_embeddings_input_dim", 1 << 20))


def is_text_time(cfg: Any) -> bool:
    """Whether a config (a map or a built model's config) takes SDXL's pooled text and time ids."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    return get("addition_embed_type") == "text_time"


def pooled_width(cfg: Any) -> int:
    """The pooled text embedding's width an SDXL config expects: its projection's input less the time ids'."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    return int(get("projection_class_embeddings_input_dim") or 0) - TIME_IDS * int(get("addition_time_embed_dim")
                                                                                   or 0)


def target_time_ids(height: int, width: int, n: int, device: Any = "cpu", dtype: Any = torch.float32
                    ) -> torch.Tensor:
    """SDXL's time ids of ``n`` images generated at ``height`` x ``width`` pixels, uncropped: (H, W, 0, 0, H, W)."""
    return torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype).expand(n, TIME_IDS)


def width(d: Any) -> int:
    """A ``cross_attention_dim`` setting's width (diffusers allows one per block; SD 1.x/2.x use one)."""
    return int(d[0] if isinstance(d, (list, tuple)) else d)


def build_plain(cfg: dict[str, Any]) -> nn.Module:
    """A plain diffusers ``UNet2DConditionModel`` of ``cfg`` with fresh weights, in eval mode; the caller has checked
    the config (block-removal plans build their teacher and student shapes this way, on the meta device)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
