"""Uniform channel pruning of a diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``) with torch-pruning.

torch-pruning traces the UNet into dependency groups (a residual stream with its skip
concatenations, a ResNet block's inner width, the time MLP, an attention block's q/k/v width, a
transformer's inner stream, a GEGLU feed-forward's paired halves) and removes channels group by
group. o2m only decides *how many* channels each group keeps and *which* (an importance criterion).
How many comes from the model diffusers builds from the new config (on the meta device): each
group's root layer keeps the width its namesake there has, and each attention keeps the head count
and head size that model has (``UNet2DModel`` fixes the head size, so whole heads go;
``UNet2DConditionModel`` fixes the head count, so every head narrows alike). Things torch-pruning
cannot know are fixed here: the sinusoidal time projection, whose width is tied to
``block_out_channels[0]``, and the module attributes diffusers computes in ``__init__``
(``Downsample2D.channels``, attention heads and scale, transformer widths). The result is then
checked against a fresh diffusers model built from the new config.
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
from o2mcli.models.io import denoiser_config_of
from o2mcli.pruning.widths import WidthPlan, reference_unet  # noqa: F401 - part of this module's API

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2D", None)
TRACE_SIZE = 32


# 1. What can be pruned ---------------------------------------------------------------------------

def check_prunable(cfg: dict[str, Any], where: Path) -> None:
    """Refuse UNet2DModel configurations outside the DDPM family's blocks, naming what was found (the pruner
    registry gives this pass only UNet2DModel configs)."""
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


def keep_within_heads(scores: torch.Tensor, keep: int, heads: int) -> list[int]:
    """Indices of the best ``keep // heads`` channels of every head: all heads stay, each one narrower."""
    n = scores.numel()
    if n % heads or keep % heads:
        raise RuntimeError(f"cannot keep {keep} of {n} channels evenly across {heads} heads")
    d, k = n // heads, keep // heads
    best = torch.topk(scores.reshape(heads, d), k, dim=1).indices.sort(dim=1).values
    return [h * d + int(j) for h in range(heads) for j in best[h]]


def keep_pairs(scores: torch.Tensor, keep: int) -> list[int]:
    """First-half indices of the best ``keep // 2`` channel pairs (i, i + n/2) of a GEGLU projection.

    GEGLU splits its projection in two halves, value and gate, multiplied channel by channel:
    channel i lives or dies with channel i + n/2 (torch-pruning removes both when given i)."""
    n = scores.numel()
    if n % 2 or keep % 2:
        raise RuntimeError(f"cannot keep {keep} of {n} GEGLU channels in value/gate pairs")
    pair = scores[: n // 2] + scores[n // 2:]
    return sorted(int(i) for i in torch.topk(pair, keep // 2).indices)


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
    head_dims: dict[str, list[int]] = field(default_factory=dict)  # attention module -> [old size, new size]


@dataclass(frozen=True)
class GroupTarget:
    """How a dependency group is cut: to ``width`` channels, ``how`` ("plain", "whole-heads", "within-heads",
    "pairs"), across ``heads`` heads where that matters."""

    width: int
    how: str = "plain"
    heads: int = 1


def head_shape(attn: nn.Module) -> tuple[int, int]:
    """(heads, head size) of a diffusers ``Attention``."""
    return int(attn.heads), int(attn.to_q.out_features) // int(attn.heads)


def out_width(module: nn.Module) -> int:
    """Output channels of a conv or linear layer."""
    return int(module.out_channels if isinstance(module, nn.Conv2d) else module.out_features)


def group_target(name: str, mods: dict[str, nn.Module], ref: dict[str, nn.Module]) -> GroupTarget:
    """The cut of the group rooted at layer ``name`` (of the modules ``mods``): the width its namesake in ``ref``
    (the modules of the model the new config builds) has, and for attention projections the head count and size
    that model has there."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention

    if name not in ref:
        raise RuntimeError(f"{name}: layer has no counterpart in the model the new config builds")
    width = out_width(ref[name])
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    owner = mods.get(parent)
    if isinstance(owner, GEGLU):
        return GroupTarget(width, "pairs")
    if isinstance(owner, Attention) and mods[name] in (owner.to_q, owner.to_k, owner.to_v):
        (h0, d0), (h1, d1) = head_shape(owner), head_shape(ref[parent])
        if h0 == 1 or h0 * d0 == h1 * d1:
            return GroupTarget(width)
        if h1 == h0:
            return GroupTarget(width, "within-heads", h0)
        if d1 == d0:
            return GroupTarget(width, "whole-heads", h0)
        raise RuntimeError(f"{parent}: {h0} heads of {d0} cannot become {h1} heads of {d1} by removing channels")
    return GroupTarget(width)


def channels_to_drop(scores: torch.Tensor, n: int, target: GroupTarget) -> list[int]:
    """The root indices to hand torch-pruning so that the group keeps ``target`` (best ``scores`` kept)."""
    if target.how == "pairs":
        keep = keep_pairs(scores, target.width)
        return sorted(set(range(n // 2)) - set(keep))
    if target.how == "within-heads":
        keep = keep_within_heads(scores, target.width, target.heads)
    else:
        keep = keep_channels(scores, target.width, target.heads if target.how == "whole-heads" else 1)
    return sorted(set(range(n)) - set(keep))


def prune_uniform(unet: nn.Module, plan: WidthPlan, importance: Callable[[Any], torch.Tensor]) -> PruneOutcome:
    """Prune ``unet`` in place to ``plan``'s widths, keeping channels ranked by ``importance``."""
    from diffusers.models.attention_processor import Attention

    cfg = unet.config
    reference = reference_unet(plan.new_config(denoiser_config_of(unet)))  # meta device: widths and heads, no memory
    ref_modules = dict(reference.named_modules())
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)[0]
    # The dependency structure does not depend on the spatial size: trace SD's 64x64 latents at 32x32, a quarter
    # of the activations (every stage still halves an even size: 32 >> 4 = 2).
    size = min(size, TRACE_SIZE) if size % TRACE_SIZE == 0 else size
    p = next(unet.parameters())
    example = (torch.randn(1, cfg.in_channels, size, size, device=p.device), torch.tensor([1], device=p.device))
    graph = tp.DependencyGraph().build_dependency(
        unet, example_inputs=example, forward_fn=lambda m, x: predict(m, *x), verbose=False)
    modules = dict(unet.named_modules())
    names = {m: n for n, m in modules.items()}
    outcome = PruneOutcome()
    for a in unet.modules():
        if isinstance(a, Attention):
            name = names[a]
            (h0, d0), (h1, d1) = head_shape(a), head_shape(ref_modules[name])
            outcome.heads[name], outcome.head_dims[name] = [h0, h1], [d0, d1]

    for group in list(graph.get_all_groups(ignored_layers=[unet.conv_out], root_module_types=(nn.Conv2d, nn.Linear))):
        root, handler = group[0].dep.target.module, group[0].dep.handler
        n = len(group[0].idxs)
        name = names[root]
        target = group_target(name, modules, ref_modules)
        if target.width == n:
            continue
        # Re-fetch the group: earlier prunes changed the shapes of layers it shares.
        group = graph.get_pruning_group(root, handler, idxs=list(range(n)))
        scores = importance(group)
        if scores is None or scores.numel() != n or not torch.isfinite(scores).all():
            raise O2MError(f"{name}: the importance criterion gave no usable scores (are gradients missing?)")
        drop = channels_to_drop(scores.detach().float().cpu(), n, target)
        pruning = graph.get_pruning_group(root, handler, idxs=drop)
        if not graph.check_pruning_group(pruning):
            raise RuntimeError(f"{name}: torch-pruning refused to remove {len(drop)} of {n} channels")
        pruning.prune()
        if out_width(root) != target.width:
            raise RuntimeError(f"{name}: kept {out_width(root)} channels, the new config needs {target.width}")
        outcome.groups.append({"root": name, "channels": [n, target.width], "layers": len(pruning)})

    _retime(unet, plan)
    fix_attributes(unet, reference)
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


def fix_attributes(unet: nn.Module, reference: nn.Module) -> None:
    """Set the width-derived attributes diffusers computes in ``__init__`` from the pruned weights; the head count
    and size of each attention from ``reference`` (the model the new config builds), which decides between them."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.upsampling import Upsample2D

    ref = dict(reference.named_modules())
    for name, m in unet.named_modules():
        if isinstance(m, (Downsample2D, Upsample2D)) and getattr(m, "conv", None) is not None:
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
        elif isinstance(m, ResnetBlock2D):
            m.in_channels, m.out_channels = m.conv1.in_channels, m.conv2.out_channels
        elif isinstance(m, Attention):
            heads, dim_head = head_shape(ref[name])
            m.query_dim = m.out_context_dim = m.to_q.in_features
            m.cross_attention_dim = m.to_k.in_features  # the text width for cross-attention: never pruned
            m.out_dim = m.to_out[0].out_features
            m.inner_dim, m.inner_kv_dim = m.to_q.out_features, m.to_k.out_features
            m.heads = m.sliceable_head_dim = m.to_q.out_features // dim_head
            if m.heads != heads:
                raise RuntimeError(f"{name}: {m.heads} heads of {dim_head} left, the new config builds {heads}")
            m.scale = dim_head ** -0.5 if m.scale_qk else 1.0
        elif isinstance(m, Transformer2DModel):
            inner = out_width(m.proj_in)
            m.in_channels, m.out_channels, m.inner_dim = m.norm.num_channels, out_width(m.proj_out), inner
            m.num_attention_heads, m.attention_head_dim = ref[name].num_attention_heads, ref[name].attention_head_dim
            m.register_to_config(in_channels=m.in_channels, out_channels=m.out_channels,
                                 num_attention_heads=m.num_attention_heads, attention_head_dim=m.attention_head_dim)
        elif isinstance(m, BasicTransformerBlock):
            m.dim = m.norm1.normalized_shape[0]
            m.num_attention_heads, m.attention_head_dim = ref[name].num_attention_heads, ref[name].attention_head_dim
    for name, m in unet.named_modules():  # blocks record their widths and their transformers' head count
        if isinstance(m, (Transformer2DModel, BasicTransformerBlock)) or not hasattr(m, "resnets"):
            continue
        if "in_channels" in vars(m):
            m.in_channels, m.out_channels = m.resnets[0].in_channels, m.resnets[-1].out_channels
        if "num_attention_heads" in vars(m):
            m.num_attention_heads = ref[name].num_attention_heads


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
