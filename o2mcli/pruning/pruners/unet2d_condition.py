"""``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x) pruning: uniform channel slimming and BK-SDM block removal.

Slimming is the ``UNet2DModel`` pass (``pruning/surgery.py``) with what the transformer blocks add:
cross-attention keys and values keep the text width on their inputs (only their outputs, the head
dims, narrow), GEGLU feed-forwards lose value/gate channel pairs, ``proj_in``/``proj_out`` (1x1
convs, or linears with ``use_linear_projection``) follow the block width. diffusers builds an SD
UNet with ``attention_head_dim`` *heads* per transformer (the config key is misnamed), so a pruned
model keeps every head and narrows each. Block removal is ``pruning/blocks.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.models.condition import Condition
from o2mcli.models.families.text_unet import VAE_FACTOR, is_text_time, pooled_width, target_time_ids
from o2mcli.pruning.blocks import VARIANTS, BlockRemoval, remove_blocks
from o2mcli.pruning.pruners.sdxl_blocks import SDXL_VARIANTS, remove_sdxl_blocks
from o2mcli.pruning.pruners.unet2d import UNet2DPruner

DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)

# Config keys outside SD 1.x/2.x, their only accepted value, and what a different value means.
UNHANDLED = (
    ("addition_embed_type", None, "added text/time embeddings, as in SDXL"),
    ("addition_time_embed_dim", None, "added time ids, as in SDXL"),
    ("projection_class_embeddings_input_dim", None, "a projected class or time-id embedding, as in SDXL"),
    ("class_embed_type", None, "a class embedding"),
    ("num_class_embeds", None, "a class label table"),
    ("encoder_hid_dim", None, "a projection of the encoder states"),
    ("encoder_hid_dim_type", None, "a projection of the encoder states"),
    ("time_cond_proj_dim", None, "a guidance-scale embedding (LCM)"),
    ("dual_cross_attention", False, "dual cross-attention"),
    ("attention_type", "default", "gated attention"),
    ("resnet_time_scale_shift", "default", "scale-shift time conditioning"),
    ("resnet_skip_time_act", False, "a skipped time activation"),
    ("time_embedding_type", "positional", "Fourier time embeddings"),
    ("time_embedding_act_fn", None, "an extra time-embedding activation"),
    ("timestep_post_act", None, "a post-activation of the time embedding"),
    ("class_embeddings_concat", False, "concatenated class embeddings"),
    ("cross_attention_norm", None, "a normalized cross-attention input"),
    ("mid_block_only_cross_attention", None, "cross-attention-only mid blocks"),
    ("reverse_transformer_layers_per_block", None, "per-stage transformer depths, as in SDXL"),
    ("num_attention_heads", None, "heads given apart from attention_head_dim"),
)


# What an SDXL UNet ("text_time") adds, which the slimming handles: the pooled text and time ids' embedding (its
# output narrows with the time embedding, its input stays) and per-stage transformer depths.
SDXL_KEYS = ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
             "reverse_transformer_layers_per_block", "transformer_layers_per_block")


def check_sd_unet(cfg: dict[str, Any], where: Path) -> None:
    """Refuse, by name, a ``UNet2DConditionModel`` config outside SD 1.x/2.x and SDXL that o2m prune does not
    handle."""
    xl = is_text_time(cfg)
    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        for b in cfg.get(key, ()):
            if b not in allowed:
                raise O2MError(f"{where}: {key} contains {b}; o2m prune supports {', '.join(allowed)}")
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in MID_BLOCKS:
        raise O2MError(f"{where}: mid_block_type {cfg['mid_block_type']} is not supported by o2m prune "
                       "(UNetMidBlock2DCrossAttn or none)")
    for key, want, what in UNHANDLED:
        if xl and key in SDXL_KEYS:
            continue
        if cfg.get(key, want) not in (want, False if want is None else want):
            raise O2MError(f"{where}: {key}={cfg[key]!r} ({what}) is not supported by o2m prune; it handles SD "
                           "1.x/2.x UNets")
    only = cfg.get("only_cross_attention", False)
    if any(only) if isinstance(only, (list, tuple)) else only:
        raise O2MError(f"{where}: only_cross_attention={only!r} is not supported by o2m prune; it handles SD "
                       "1.x/2.x UNets")
    for key in ("transformer_layers_per_block", "cross_attention_dim"):
        if isinstance(cfg.get(key), (list, tuple)) and not (xl and key in SDXL_KEYS):
            raise O2MError(f"{where}: a per-stage {key} ({cfg[key]!r}, as in SDXL) is not supported by o2m prune; "
                           "it handles SD 1.x/2.x UNets")


class UNet2DConditionPruner(UNet2DPruner):
    """Stable Diffusion's UNet: the ``UNet2DModel`` width plan and pass, its own checks, text in the rebuild check,
    and BK-SDM's block-removal variants."""

    family = "UNet2DConditionModel"
    block_variants = VARIANTS + SDXL_VARIANTS

    def check(self, cfg: dict[str, Any], where: Path) -> None:
        check_sd_unet(cfg, where)

    def probe_condition(self, cfg: dict[str, Any], n: int, generator: torch.Generator) -> Optional[Condition]:
        """Random text embeddings (7 tokens; SDXL: and random pooled text, the target size's time ids): the check
        covers the cross-attention keys and values, and the added embedding, too."""
        width = cfg["cross_attention_dim"]
        tokens = torch.randn(n, 7, int(width[0] if isinstance(width, (list, tuple)) else width), generator=generator)
        if not is_text_time(cfg):
            return Condition(tokens=tokens)
        size = cfg["sample_size"] if isinstance(cfg["sample_size"], int) else cfg["sample_size"][0]
        return Condition(tokens=tokens, pooled=torch.randn(n, pooled_width(cfg), generator=generator),
                         ids=target_time_ids(VAE_FACTOR * size, VAE_FACTOR * size, n))

    def remove_blocks(self, model: nn.Module, variant: str, where: Path) -> tuple[nn.Module, BlockRemoval]:
        """BK-SDM's variants (SD 1.x/2.x), or the SDXL literature's patterns (KOALA, SSD-1B, Vega)."""
        if variant in SDXL_VARIANTS:
            return remove_sdxl_blocks(model, variant, where)
        if is_text_time(model.config):
            raise O2MError(f"{where}: --blocks {variant} is BK-SDM's, for SD 1.x/2.x UNets; an SDXL UNet takes "
                           f"{', '.join(SDXL_VARIANTS)}")
        return remove_blocks(model, variant, where)

    def summary(self, teacher: nn.Module, template: nn.Module, plan: Any, outcome: Any) -> dict:
        out = super().summary(teacher, template, plan, outcome)
        out["attention_head_dims"] = outcome.head_dims  # heads stay (SD's config counts heads); each narrows
        return out
