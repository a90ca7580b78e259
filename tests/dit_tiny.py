"""Tiny diffusion transformers (diffusers' DiTTransformer2DModel) for tests: pixel space, patchified, class labels."""

from __future__ import annotations

import torch


def dit_config(classes: int = 10, channels: int = 1, size: int = 8, patch: int = 2, heads: int = 2,
               head_dim: int = 8, layers: int = 3, learned: bool = False) -> dict:
    """A diffusers DiT config: ``classes`` labels (the null class after them), C or 2C outputs."""
    return {"_class_name": "DiTTransformer2DModel", "num_attention_heads": heads, "attention_head_dim": head_dim,
            "in_channels": channels, "out_channels": 2 * channels if learned else channels, "num_layers": layers,
            "sample_size": size, "patch_size": patch, "num_embeds_ada_norm": classes, "norm_num_groups": 1}


def tiny_dit(seed: int = 0, **kw) -> torch.nn.Module:
    """A random tiny DiT built through o2m's family (diffusers' own label dropout switched off), in eval mode."""
    from pathlib import Path

    from o2mcli.models.families.dit import DiT

    torch.manual_seed(seed)
    return DiT().build(dit_config(**kw), None, Path("dit.json"))
