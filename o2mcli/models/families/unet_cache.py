"""DeepCache's two forwards for diffusers UNets at the original's granularity (Ma, Fang, Wang 2024, "DeepCache:
Accelerating Diffusion Models for Free", Sec. 3.2; its diffusers helper's ``cache_branch_id``): a full forward that
also keeps the deep feature entering one up layer, and a partial forward that recomputes only the layers shallower
than it.

Layer branches. Number the skip features the down path produces in diffusers' ``res_samples`` order: skip 0 is
``conv_in``'s output, then each down block gives one per resnet(+attention) layer, then one for its downsampler's
output. The up path consumes them in reverse, one per up resnet: the last resnet of the last up block consumes skip 0,
the one before it skip 1, and so on (a UNet whose up resnets do not match its skips one for one is refused). Branch
``b`` (0-based, ``0..skips-1``):

- the full step is diffusers' own forward, bit for bit; a hook keeps the hidden state that enters the up layer
  consuming skip ``b`` (before its concatenation with the skip): the up block's input when that layer is the block's
  first, else the previous up layer's output;
- the partial step runs the time (and condition) embedding, ``conv_in`` (skip 0), the down layers producing skips
  ``1..b`` (nothing else of the down path: no discarded downsampler), then, from the cached hidden state, the up
  layers consuming skips ``b..0`` (with any upsampler between them) and the output head. The deeper down layers, the
  mid block and the deeper up layers do not run.

On SD 1.x (two layers per down block plus a downsampler, three per up block) branch 0 is conv_in, the last
resnet+attention of the last up block and the head, about 6% of a full step; this matches DeepCache's helper
(``cache_block_id = b // 3``, ``cache_layer_id = b % 3`` there). With a fresh cache at the same input the partial
forward equals the full one (``tests/test_deepcache.py`` checks it against diffusers' forward for every branch).

The standard block types split by layer: ``DownBlock2D``, ``AttnDownBlock2D``, ``CrossAttnDownBlock2D``,
``ResnetDownsampleBlock2D`` and ``UpBlock2D``, ``AttnUpBlock2D``, ``CrossAttnUpBlock2D``, ``ResnetUpsampleBlock2D``;
any other (score-SDE skip blocks, K-blocks, simple cross-attention) is refused by name, as is FreeU (it rescales
the skips and hidden states the partial step reuses). Only the skeleton of ``UNet2DModel.forward`` /
``UNet2DConditionModel.forward`` that o2m's ``predict`` uses is reimplemented (no ControlNet/adapter residuals or
attention masks).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from o2mcli.errors import O2MError

DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D", "ResnetDownsampleBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D", "ResnetUpsampleBlock2D")
DOWNSAMPLER = -1  # a producer's layer index for a down block's downsampler


@dataclass(frozen=True)
class UpInput:
    """The cache: the hidden state that entered the up layer consuming the branch's skip on the full step, for the
    batch it was computed on."""

    hidden: torch.Tensor


@dataclass(frozen=True)
class SkipLayout:
    """Who produces and who consumes each skip feature: ``producers[s]`` is (down block, layer) (``(-1, 0)``:
    ``conv_in``; layer ``DOWNSAMPLER``: the block's downsampler), ``consumers[s]`` is (up block, resnet)."""

    producers: tuple[tuple[int, int], ...]
    consumers: tuple[tuple[int, int], ...]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def skip_layout(model: nn.Module) -> SkipLayout:
    """The UNet's skip features, refusing block types that cannot be split by layer and FreeU."""
    m = _unwrap(model)
    for kind, blocks, known in (("down", m.down_blocks, DOWN_TYPES), ("up", m.up_blocks, UP_TYPES)):
        for i, b in enumerate(blocks):
            if type(b).__name__ not in known:
                raise O2MError(f"DeepCache: {kind} block {i} is a {type(b).__name__}, which o2m cannot split by layer "
                               f"(supported: {', '.join(known)})")
    if any(all(getattr(b, a, None) for a in ("s1", "s2", "b1", "b2")) for b in m.up_blocks):
        raise O2MError("DeepCache: FreeU is enabled on the UNet; it rescales the features a partial step reuses, so "
                       "disable it (unet.disable_freeu()) to sample with DeepCache")
    producers: list[tuple[int, int]] = [(-1, 0)]
    for d, b in enumerate(m.down_blocks):
        producers += [(d, i) for i in range(len(b.resnets))]
        if b.downsamplers is not None:
            producers.append((d, DOWNSAMPLER))
    order = [(u, j) for u, b in enumerate(m.up_blocks) for j in range(len(b.resnets))]
    if len(order) != len(producers):
        raise O2MError(f"DeepCache: the {type(m).__name__}'s down path makes {len(producers)} skip features but its "
                       f"up path consumes {len(order)}; its blocks do not pair layer for layer")
    return SkipLayout(tuple(producers), tuple(reversed(order)))


def branch_count(model: nn.Module) -> int:
    """How many layer branches (skip features) a UNet has."""
    return len(skip_layout(model).producers)


def check_branch(model: nn.Module, branch: int) -> SkipLayout:
    """Refuse a layer branch the UNet does not have, naming the range and the model; returns the layout."""
    lay = skip_layout(model)
    n = len(lay.producers)
    if not 0 <= branch < n:
        raise O2MError(f"--cache-branch {branch}: the {type(_unwrap(model)).__name__} has {n} layer branches (skip "
                       f"features), so the branch must be 0..{n - 1}")
    return lay


@contextmanager
def _capture_up_input(model: nn.Module, up: int, layer: int) -> Iterator[dict[str, UpInput]]:
    """While open, record the hidden state entering resnet ``layer`` of up block ``up`` before its concatenation
    with the skip: the block's input for its first resnet, else the previous up layer's output."""
    m = _unwrap(model)
    block = m.up_blocks[up]
    box: dict[str, UpInput] = {}

    def pre(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        box["cache"] = UpInput(args[0] if args else kwargs["hidden_states"])

    def post(_mod: nn.Module, _args: tuple, out: Any) -> None:
        box["cache"] = UpInput(out[0] if isinstance(out, tuple) else getattr(out, "sample", out))

    if layer == 0:
        handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        attns = getattr(block, "attentions", None)
        handle = (attns[layer - 1] if attns else block.resnets[layer - 1]).register_forward_hook(post)
    try:
        yield box
    finally:
        handle.remove()


def full_with_cache(model: nn.Module, branch: int, call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, UpInput]:
    """Run ``call`` (the family's plain forward of ``model``) and return its output and the DeepCache cache."""
    up, layer = check_branch(model, branch).consumers[branch]
    with _capture_up_input(model, up, layer) as box:
        out = call()
    if "cache" not in box:
        raise O2MError(f"DeepCache: the forward never reached resnet {layer} of up block {up}")
    return out, box["cache"]


def _check_cache(cache: UpInput, batch: int) -> None:
    if cache.hidden.shape[0] != batch:
        raise O2MError(f"DeepCache: the cache holds {cache.hidden.shape[0]} samples but the step has {batch} "
                       "(a cache serves only the batch it was computed on)")


def _attend(block: nn.Module, i: int, h: torch.Tensor, text: Optional[torch.Tensor]) -> torch.Tensor:
    """Layer ``i``'s attention after its resnet, called as the block's own forward calls it."""
    attns = getattr(block, "attentions", None)
    if not attns:
        return h
    if getattr(block, "has_cross_attention", False):
        return attns[i](h, encoder_hidden_states=text, return_dict=False)[0]
    return attns[i](h)


def _is_resnet(module: nn.Module) -> bool:
    from diffusers.models.resnet import ResnetBlock2D

    return isinstance(module, ResnetBlock2D)


def _down_layer(block: nn.Module, i: int, h: torch.Tensor, emb: torch.Tensor,
                text: Optional[torch.Tensor]) -> torch.Tensor:
    """The down layer producing one skip: resnet ``i`` (and its attention), or the downsampler(s)."""
    if i == DOWNSAMPLER:
        for ds in block.downsamplers:
            h = ds(h, emb) if _is_resnet(ds) else ds(h)
        return h
    return _attend(block, i, block.resnets[i](h, emb), text)


def _upsample(block: nn.Module, h: torch.Tensor, emb: torch.Tensor, size: Any) -> torch.Tensor:
    """The up block's upsampler(s), called as its forward calls them (``AttnUpBlock2D`` passes no size)."""
    for us in block.upsamplers:
        if _is_resnet(us):
            h = us(h, emb)
        elif type(block).__name__ == "AttnUpBlock2D":
            h = us(h)
        else:
            h = us(h, size)
    return h


def _shallow_branch(m: nn.Module, x: torch.Tensor, emb: torch.Tensor, text: Optional[torch.Tensor], branch: int,
                    cache: UpInput, pass_size: bool = False) -> torch.Tensor:
    """conv_in, the down layers producing skips 1..branch, then from the cache the up layers consuming skips
    branch..0 (with the upsamplers between them); returns the hidden state entering the output head."""
    lay = check_branch(m, branch)
    _check_cache(cache, x.shape[0])
    h = m.conv_in(x)
    skips = [h]
    for d, i in lay.producers[1:branch + 1]:
        h = _down_layer(m.down_blocks[d], i, h, emb, text)
        skips.append(h)
    first, layer = lay.consumers[branch]
    h = cache.hidden
    last = len(m.up_blocks) - 1
    for u in range(first, last + 1):
        block = m.up_blocks[u]
        for j in range(layer if u == first else 0, len(block.resnets)):
            h = _attend(block, j, block.resnets[j](torch.cat([h, skips.pop()], dim=1), emb), text)
        if block.upsamplers is not None:
            h = _upsample(block, h, emb, skips[-1].shape[2:] if pass_size and u < last and skips else None)
    return h


def _timesteps(t: Any, x: torch.Tensor) -> torch.Tensor:
    """Timesteps as a (B,) tensor, the way diffusers' UNet2DModel broadcasts them."""
    ts = t if torch.is_tensor(t) else torch.tensor([t], dtype=torch.long, device=x.device)
    if ts.ndim == 0:
        ts = ts[None].to(x.device)
    return ts * torch.ones(x.shape[0], dtype=ts.dtype, device=ts.device)


def unet2d_partial(model: nn.Module, x: torch.Tensor, t: Any, class_labels: Optional[torch.Tensor], branch: int,
                   cache: UpInput) -> torch.Tensor:
    """The partial DeepCache forward of a ``UNet2DModel`` (the skeleton of its ``forward``)."""
    m = _unwrap(model)
    cfg = m.config
    if cfg.center_input_sample:
        x = 2 * x - 1.0
    ts = _timesteps(t, x)
    emb = m.time_embedding(m.time_proj(ts).to(dtype=m.dtype))
    if m.class_embedding is not None:
        if class_labels is None:
            raise ValueError("class_labels should be provided when doing class conditioning")
        labels = m.time_proj(class_labels) if cfg.class_embed_type == "timestep" else class_labels
        emb = emb + m.class_embedding(labels).to(dtype=m.dtype)
    h = _shallow_branch(m, x, emb, None, branch, cache)
    h = m.conv_out(m.conv_act(m.conv_norm_out(h)))
    if cfg.time_embedding_type == "fourier":
        h = h / ts.reshape((h.shape[0], *([1] * len(h.shape[1:]))))
    return h


def unet2d_condition_partial(model: nn.Module, x: torch.Tensor, t: Any, text: torch.Tensor, branch: int,
                             cache: UpInput, added: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """The partial DeepCache forward of a ``UNet2DConditionModel`` (the skeleton of its ``forward``, text
    embeddings as ``encoder_hidden_states``, SDXL's pooled text and time ids as ``added``; no class labels or
    masks)."""
    m = _unwrap(model)
    cfg = m.config
    if cfg.addition_embed_type not in (None, "text_time") or m.class_embedding is not None:
        raise O2MError(f"DeepCache: a UNet2DConditionModel with addition_embed_type={cfg.addition_embed_type!r} "
                       "or class embeddings is not supported (o2m samples Stable Diffusion and SDXL UNets)")
    up_factor = 2 ** m.num_upsamplers
    pass_size = any(d % up_factor != 0 for d in x.shape[-2:])
    if cfg.center_input_sample:
        x = 2 * x - 1.0
    emb = m.time_embedding(m.get_time_embed(sample=x, timestep=t), None)
    if added is not None:  # SDXL: the pooled text and time ids' embedding joins the time embedding, as in forward
        aug = m.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs=added)
        emb = emb if aug is None else emb + aug
    if m.time_embed_act is not None:
        emb = m.time_embed_act(emb)
    text = m.process_encoder_hidden_states(encoder_hidden_states=text, added_cond_kwargs=added)
    h = _shallow_branch(m, x, emb, text, branch, cache, pass_size)
    if m.conv_norm_out:
        h = m.conv_act(m.conv_norm_out(h))
    return m.conv_out(h)


class UNetDeepCache:
    """The DeepCache methods of a UNet family (mixed in before ``DenoiserFamily``): a full step is the family's own
    ``predict`` with the cache taken on the way; a partial step is the family's ``deepcache_partial``."""

    def deepcache_branches(self, model: nn.Module) -> int:
        return branch_count(model)

    def deepcache_predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor],
                          branch: int, cache: Any) -> tuple[torch.Tensor, Any]:
        check_branch(model, branch)
        if cache is None:
            return full_with_cache(model, branch, lambda: self.predict(model, x_t, t, cond))
        return self.deepcache_partial(model, x_t, t, cond, branch, cache), cache

    def deepcache_partial(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor],
                          branch: int, cache: Any) -> torch.Tensor:
        raise NotImplementedError
