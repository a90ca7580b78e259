"""Uniform channel pruning of a diffusers ``UNet2DModel`` with torch-pruning.

torch-pruning traces the UNet into dependency groups (a residual stream with its skip
concatenations, a ResNet block's inner width, the time MLP, an attention block's q/k/v width)
and removes channels group by group. o2m only decides *how many* channels each group keeps (the
uniform plan, so that a diffusers config describes the result) and *which* (an importance
criterion; whole heads for multi-head attention). Two things torch-pruning cannot know are fixed
here: the sinusoidal time projection, whose width is tied to ``block_out_channels[0]``, and the
module attributes diffusers computes from the config (``Downsample2D.channels``, attention heads
and scale). The result is then checked against a fresh diffusers model built from the new config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch_pruning as tp
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.models.denoise import predict
from o2mcli.pruning.widths import WidthPlan, reference_unet  # noqa: F401 - part of this module's API

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2D", None)


# 1. What can be pruned ---------------------------------------------------------------------------

def check_prunable(cfg: dict[str, Any], where: Path) -> None:
    """Refuse UNet configurations outside the DDPM family, naming what was found."""
    cls = cfg.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise O2MError(f"{where}: found a {cls}; o2m prune supports UNet2DModel (the DDPM family)")
    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        for b in cfg.get(key, ()):
            if b not in allowed:
                raise O2MError(f"{where}: {key} contains {b}; o2m prune supports {', '.join(allowed)}")
    if cfg.get("mid_block_type", "UNetMidBlock2D") not in MID_BLOCKS:
        raise O2MError(f"{where}: mid_block_type {cfg['mid_block_type']} is not supported (UNetMidBlock2D only)")
    checks = (("time_embedding_type", "positional"), ("resnet_time_scale_shift", "default"),
              ("downsample_type", "conv"), ("upsample_type", "conv"))
    for key, want in checks:
        if cfg.get(key, want) != want:
            raise O2MError(f"{where}: {key}={cfg[key]!r} is not supported by o2m prune (only {want!r})")
    if cfg.get("class_embed_type") is not None:
        # A learned label table (num_class_embeds) is narrowed with the time embedding it is added to; the other
        # class embeddings project a vector through their own MLP, which o2m does not yet plan widths for.
        raise O2MError(f"{where}: class_embed_type={cfg['class_embed_type']!r} is not supported by o2m prune (only "
                       "a class label table: num_class_embeds with class_embed_type null)")


# 2. Choosing the channels to keep ----------------------------------------------------------------

def keep_channels(scores: torch.Tensor, keep: int, heads: int = 1) -> list[int]:
    """Indices of the ``keep`` best channels; with several heads, the best whole heads."""
    n = scores.numel()
    if heads > 1:
        d = n // heads
        if keep % d:
            raise RuntimeError(f"cannot keep {keep} of {n} channels in whole heads of {d}")
        head_scores = scores.reshape(heads, d).sum(1)
        best = torch.topk(head_scores, keep // d).indices.sort().values
        return [int(h) * d + j for h in best for j in range(d)]
    return sorted(int(i) for i in torch.topk(scores, keep).indices)


def timestep_columns(old_dim: int, new_dim: int, downscale_freq_shift: float) -> list[int]:
    """Columns of the old sinusoidal embedding whose frequencies are nearest the new one's.

    diffusers' ``get_timestep_embedding`` uses frequencies exp(-ln(1e4) i / (half - shift)), so a
    narrower embedding samples the same band more coarsely: each new frequency maps to the nearest
    old one (strictly increasing, so no column is used twice), for both the sin and cos halves.
    """
    h, h2 = old_dim // 2, new_dim // 2
    r = (h - downscale_freq_shift) / max(h2 - downscale_freq_shift, 1e-9)
    idx = [min(h - 1, int(math.floor(j * r + 0.5))) for j in range(h2)]
    return idx + [h + i for i in idx]


# 3. The pruning pass -----------------------------------------------------------------------------

@dataclass
class PruneOutcome:
    """What the pass did: groups pruned and channel counts, for the report."""

    groups: list[dict[str, Any]] = field(default_factory=list)
    heads: dict[str, list[int]] = field(default_factory=dict)  # attention module -> [old heads, new heads]


def _owner(names: dict[nn.Module, str], module: nn.Module, unet: nn.Module) -> tuple[str, nn.Module | None]:
    from diffusers.models.attention_processor import Attention

    name = names[module]
    parent = name.rsplit(".", 1)[0]
    owner = unet.get_submodule(parent) if "." in name else None
    return name, owner if isinstance(owner, Attention) else None


def prune_uniform(unet: nn.Module, plan: WidthPlan, importance: Callable[[Any], torch.Tensor]) -> PruneOutcome:
    """Prune ``unet`` in place to ``plan``'s widths, keeping channels ranked by ``importance``."""
    from diffusers.models.attention_processor import Attention

    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)[0]
    p = next(unet.parameters())
    example = (torch.randn(1, cfg.in_channels, size, size, device=p.device), torch.tensor([1], device=p.device))
    graph = tp.DependencyGraph().build_dependency(
        unet, example_inputs=example, forward_fn=lambda m, x: predict(m, *x), verbose=False)
    names = {m: n for n, m in unet.named_modules()}
    widths = plan.width_map()
    attn_shape = {a: (a.heads, a.inner_dim // a.heads) for a in unet.modules() if isinstance(a, Attention)}
    outcome = PruneOutcome()

    for group in list(graph.get_all_groups(ignored_layers=[unet.conv_out], root_module_types=(nn.Conv2d, nn.Linear))):
        root, handler = group[0].dep.target.module, group[0].dep.handler
        n = len(group[0].idxs)
        name, attn = _owner(names, root, unet)
        heads = 1
        if name.startswith("time_embedding."):
            target = plan.new_time_dim
        elif attn is not None and root in (attn.to_q, attn.to_k, attn.to_v):
            old_heads, d = attn_shape[attn]
            target = widths[attn.query_dim]
            heads = old_heads
            outcome.heads[names[attn]] = [old_heads, old_heads if old_heads == 1 else target // d]
        elif n in widths:
            target = widths[n]
        else:
            raise RuntimeError(f"{name}: a dependency group of {n} channels matches no block width {widths}")
        if target == n:
            continue
        # Re-fetch the group: earlier prunes changed the shapes of layers it shares.
        group = graph.get_pruning_group(root, handler, idxs=list(range(n)))
        scores = importance(group)
        if scores is None or scores.numel() != n or not torch.isfinite(scores).all():
            raise O2MError(f"{name}: the importance criterion gave no usable scores (are gradients missing?)")
        keep = keep_channels(scores.detach().float().cpu(), target, heads)
        drop = sorted(set(range(n)) - set(keep))
        pruning = graph.get_pruning_group(root, handler, idxs=drop)
        if not graph.check_pruning_group(pruning):
            raise RuntimeError(f"{name}: torch-pruning refused to remove {len(drop)} of {n} channels")
        pruning.prune()
        outcome.groups.append({"root": name, "channels": [n, target], "layers": len(pruning)})

    _retime(unet, plan)
    _fix_attributes(unet, attn_shape)
    unet.register_to_config(block_out_channels=tuple(plan.new_channels))
    if cfg.get("time_embedding_dim") is not None:
        unet.register_to_config(time_embedding_dim=plan.new_time_dim)
    return outcome


def _retime(unet: nn.Module, plan: WidthPlan) -> None:
    """Narrow the sinusoidal projection and the first time-MLP layer's inputs to block 0's new width."""
    old, new = plan.old_channels[0], plan.new_channels[0]
    if old == new:
        return
    proj, lin = unet.time_proj, unet.time_embedding.linear_1
    cols = timestep_columns(old, new, float(proj.downscale_freq_shift))
    tp.prune_linear_in_channels(lin, sorted(set(range(lin.in_features)) - set(cols)))
    proj.num_channels = new


def _fix_attributes(unet: nn.Module, attn_shape: dict[nn.Module, tuple[int, int]]) -> None:
    """Set the width-derived attributes diffusers computes in ``__init__`` from the pruned weights."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    for m in unet.modules():
        if isinstance(m, (Downsample2D, Upsample2D)) and getattr(m, "conv", None) is not None:
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
        elif isinstance(m, ResnetBlock2D):
            m.in_channels, m.out_channels = m.conv1.in_channels, m.conv2.out_channels
        elif isinstance(m, Attention):
            old_heads, d = attn_shape[m]
            inner = m.to_q.out_features
            dim_head = inner if old_heads == 1 else d  # one head spans the block; else heads keep their size
            m.query_dim = m.cross_attention_dim = m.out_dim = m.out_context_dim = m.to_q.in_features
            m.inner_dim, m.inner_kv_dim = inner, m.to_k.out_features
            m.heads = m.sliceable_head_dim = inner // dim_head
            m.scale = dim_head ** -0.5 if m.scale_qk else 1.0


# 4. Checking the result against plain diffusers ---------------------------------------------------

_SKIP = {"processor", "training"}


def attribute_mismatches(model: nn.Module, reference: nn.Module) -> list[str]:
    """Config-derived attributes and parameter shapes where ``model`` differs from ``reference``."""
    out = []
    ref_modules = dict(reference.named_modules())
    for name, m in model.named_modules():
        r = ref_modules.get(name)
        if r is None or type(r) is not type(m):
            out.append(f"{name or 'model'}: module {type(m).__name__} vs {type(r).__name__}")
            continue
        for k, v in vars(m).items():
            if k.startswith("_") or k in _SKIP or not isinstance(v, (int, float, bool, str, tuple, type(None))):
                continue
            if k in vars(r) and vars(r)[k] != v:
                out.append(f"{name}.{k}: {v!r} vs {vars(r)[k]!r}")
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    for k, v in model.state_dict().items():
        if ref_shapes.get(k) != tuple(v.shape):
            out.append(f"{k}: shape {tuple(v.shape)} vs {ref_shapes.get(k)}")
    return out
