"""DeepCache's two forwards for diffusers UNets (Ma, Fang, Wang 2024, "DeepCache: Accelerating Diffusion Models
for Free", Sec. 3.2): a full forward that also keeps the deep feature entering the shallow up block paired with
down block ``branch``, and a partial forward that recomputes only the shallow branch around that cache.

A UNet with ``n`` down blocks pairs down block ``b`` with up block ``n - 1 - b`` (diffusers lists up blocks deepest
first). The partial forward runs the time embedding, ``conv_in``, down blocks ``0..b`` (their skip outputs), then up
blocks ``n-1-b .. n-1`` starting from the cached hidden state, and the output head. Everything deeper (the deeper
down blocks, the mid block, the deeper up blocks) is skipped. With a fresh cache at the same input the partial
forward equals the full one (``tests/test_deepcache.py`` checks it against diffusers' own forward).

Only the skeleton of diffusers' ``UNet2DModel.forward`` / ``UNet2DConditionModel.forward`` that o2m's
``predict`` uses is reimplemented (no ControlNet/adapter residuals, attention masks or added conditions); the full
forward is diffusers' own call, the cache taken by a forward pre-hook, so a full step is bit-for-bit the plain one.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from o2mcli.errors import O2MError


@dataclass(frozen=True)
class UpInput:
    """The cache: what enters the paired up block on a full step (the hidden state; a score-SDE UNet's running
    ``skip_sample`` too), for the batch it was computed on."""

    hidden: torch.Tensor
    skip: Optional[torch.Tensor] = None


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def down_block_count(model: nn.Module) -> int:
    """How many down blocks (DeepCache branches) a UNet has."""
    return len(_unwrap(model).down_blocks)


def check_branch(model: nn.Module, branch: int) -> None:
    """Refuse a cache branch the UNet does not have, naming both numbers."""
    n = down_block_count(model)
    if not 0 <= branch < n:
        raise O2MError(f"--cache-branch {branch}: the {type(_unwrap(model)).__name__} has {n} down blocks, so the "
                       f"branch must be 0..{n - 1}")


def paired_up(model: nn.Module, branch: int) -> int:
    """The index of the up block that takes down block ``branch``'s skips: ``n - 1 - branch``."""
    return down_block_count(model) - 1 - branch


@contextmanager
def _capture_up_input(model: nn.Module, up: int) -> Iterator[dict[str, UpInput]]:
    """While open, record what diffusers' forward passes into up block ``up`` (positional or keyword)."""
    box: dict[str, UpInput] = {}

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        skip = args[3] if len(args) > 3 else kwargs.get("skip_sample")
        box["cache"] = UpInput(hidden, skip)

    handle = _unwrap(model).up_blocks[up].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


def full_with_cache(model: nn.Module, branch: int, call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, UpInput]:
    """Run ``call`` (the family's plain forward of ``model``) and return its output and the DeepCache cache."""
    with _capture_up_input(model, paired_up(model, branch)) as box:
        out = call()
    if "cache" not in box:
        raise O2MError(f"DeepCache: the forward never reached up block {paired_up(model, branch)}")
    return out, box["cache"]


def _shallow_skips(model: nn.Module, skips: tuple, branch: int) -> tuple:
    """The skips the shallow up blocks ``n-1-branch..`` consume: the first ones down blocks 0..branch made (the
    full forward pops skips from the end, so those up blocks take exactly the first ``need``)."""
    need = sum(len(b.resnets) for b in model.up_blocks[paired_up(model, branch):])
    if len(skips) < need:
        raise O2MError(f"DeepCache: down blocks 0..{branch} give {len(skips)} skip features but up blocks "
                       f"{paired_up(model, branch)}.. take {need}; this UNet's blocks do not pair")
    return skips[:need]


def _check_cache(cache: UpInput, batch: int) -> None:
    if cache.hidden.shape[0] != batch:
        raise O2MError(f"DeepCache: the cache holds {cache.hidden.shape[0]} samples but the step has {batch} "
                       "(a cache serves only the batch it was computed on)")


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
    _check_cache(cache, x.shape[0])
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
    skip = x
    h = m.conv_in(x)
    skips: tuple = (h,)
    for block in m.down_blocks[:branch + 1]:
        if hasattr(block, "skip_conv"):
            h, res, skip = block(hidden_states=h, temb=emb, skip_sample=skip)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips += res
    skips = _shallow_skips(m, skips, branch)
    h, skip = cache.hidden, cache.skip
    for block in m.up_blocks[paired_up(m, branch):]:
        res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        if hasattr(block, "skip_conv"):
            h, skip = block(h, res, emb, skip)
        else:
            h = block(h, res, emb)
    h = m.conv_out(m.conv_act(m.conv_norm_out(h)))
    if skip is not None:
        h = h + skip
    if cfg.time_embedding_type == "fourier":
        h = h / ts.reshape((h.shape[0], *([1] * len(h.shape[1:]))))
    return h


def unet2d_condition_partial(model: nn.Module, x: torch.Tensor, t: Any, text: torch.Tensor, branch: int,
                             cache: UpInput, added: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """The partial DeepCache forward of a ``UNet2DConditionModel`` (the skeleton of its ``forward``, text
    embeddings as ``encoder_hidden_states``, SDXL's pooled text and time ids as ``added``; no class labels or
    masks)."""
    m = _unwrap(model)
    _check_cache(cache, x.shape[0])
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
    h = m.conv_in(x)
    skips: tuple = (h,)
    for block in m.down_blocks[:branch + 1]:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=text)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips += res
    skips = _shallow_skips(m, skips, branch)
    h = cache.hidden
    first = paired_up(m, branch)
    for i in range(first, len(m.up_blocks)):
        block = m.up_blocks[i]
        res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        size = skips[-1].shape[2:] if pass_size and i < len(m.up_blocks) - 1 else None
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=text,
                      upsample_size=size)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
    if m.conv_norm_out:
        h = m.conv_act(m.conv_norm_out(h))
    return m.conv_out(h)


class UNetDeepCache:
    """The DeepCache methods of a UNet family (mixed in before ``DenoiserFamily``): a full step is the family's own
    ``predict`` with the cache taken on the way; a partial step is the family's ``deepcache_partial``."""

    def deepcache_branches(self, model: nn.Module) -> int:
        return down_block_count(model)

    def deepcache_predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor],
                          branch: int, cache: Any) -> tuple[torch.Tensor, Any]:
        check_branch(model, branch)
        if cache is None:
            return full_with_cache(model, branch, lambda: self.predict(model, x_t, t, cond))
        return self.deepcache_partial(model, x_t, t, cond, branch, cache), cache

    def deepcache_partial(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor],
                          branch: int, cache: Any) -> torch.Tensor:
        raise NotImplementedError
