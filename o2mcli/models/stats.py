"""Parameters and MACs of a denoiser (one forward of one image)."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from o2mcli.models.denoise import input_shape, predict


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        return out.numel() * k
    return out.numel() * module.in_features  # nn.Linear


@torch.no_grad()
def count_block_macs(unet: nn.Module) -> dict[str, int]:
    """MACs of one batch-1 forward per top-level block (``conv_in``, ``down_blocks.0``, ..., ``conv_out``).

    Convolutions and linear layers are counted, the convention (thop, torch-pruning) behind the
    papers' 6.1 G for google/ddpm-cifar10-32 (this reads 6.05 G); attention score matmuls
    (0.17 G there) are not. Works on the meta device, so a config can be costed without memory.
    """
    x, t = _probe(unet)
    return _count_blocks(unet, lambda: predict(unet, x, t))


@torch.no_grad()
def count_deepcache_block_macs(unet: nn.Module, branch: int) -> dict[str, int]:
    """MACs of one batch-1 DeepCache partial forward of layer branch ``branch`` per top-level block: the partial
    forward itself runs (meta device or real), counted as :func:`count_block_macs` counts the full forward (the cache
    is filled by an uncounted full forward first)."""
    from o2mcli.models.families import family_of

    x, t = _probe(unet)
    fam = family_of(unet)
    _, cache = fam.deepcache_predict(unet, x, t, None, branch, None)
    return _count_blocks(unet, lambda: fam.deepcache_predict(unet, x, t, None, branch, cache))


def count_deepcache_macs(unet: nn.Module, branch: int) -> int:
    """MACs of one batch-1 DeepCache partial forward of branch ``branch`` (see :func:`count_deepcache_block_macs`)."""
    return sum(count_deepcache_block_macs(unet, branch).values())


def _probe(unet: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch-1 input (zeros, t=500) MACs are counted on."""
    p = next(unet.parameters())
    return (torch.zeros(1, *input_shape(unet), device=p.device, dtype=p.dtype),
            torch.tensor([500], device=p.device))


def _count_blocks(unet: nn.Module, run: Callable[[], object]) -> dict[str, int]:
    """Conv and linear MACs per top-level block of ``unet`` while ``run`` runs."""
    totals: dict[str, int] = defaultdict(int)
    hooks = []
    for name, m in unet.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            block = ".".join(name.split(".")[:2]) if name.split(".")[0].endswith("blocks") else name.split(".")[0]
            hooks.append(m.register_forward_hook(
                lambda mod, _i, out, b=block: totals.__setitem__(b, totals[b] + _layer_macs(mod, out))))
    try:
        run()
    finally:
        for hk in hooks:
            hk.remove()
    return dict(totals)


def count_macs(unet: nn.Module) -> int:
    """MACs of one batch-1 forward (convolutions and linear layers; see :func:`count_block_macs`)."""
    return sum(count_block_macs(unet).values())


def count_block_params(unet: nn.Module) -> dict[str, int]:
    """Parameters per top-level block, keyed like :func:`count_block_macs`."""
    totals: dict[str, int] = defaultdict(int)
    for name, prm in unet.named_parameters():
        parts = name.split(".")
        block = ".".join(parts[:2]) if parts[0].endswith("blocks") else parts[0]
        totals[block] += prm.numel()
    return dict(totals)
