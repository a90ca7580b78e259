"""Depth pruning of a transformer (``--drop-blocks``, issue #14): whole blocks removed from a stack of equal blocks,
the first and the last kept, every remaining tensor copied from the teacher and checked."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from o2mcli.errors import O2MError


def blocks_to_drop(layers: int, n: int, where: Path) -> list[int]:
    """``n`` evenly spaced middle blocks (never the first, whose embedding also drives the output, nor the last)."""
    if n < 1:
        raise O2MError(f"--drop-blocks {n}: must be at least 1")
    if layers - n < 2:
        raise O2MError(f"{where}: --drop-blocks {n} of a DiT's {layers} transformer blocks would leave "
                       f"{layers - n}; at least 2 must remain (the first and the last are always kept)")
    middle = layers - 2
    return sorted({1 + int(math.floor((j + 0.5) * middle / n)) for j in range(n)})


@dataclass
class DepthRemoval:
    """What ``--drop-blocks`` did: the student's config, student block -> teacher block, what went."""

    variant: str
    config: dict[str, Any]
    kept: list[int]
    removed: list[str]
    block_map: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"variant": self.variant, "removed": self.removed, "kept": self.kept, "layer_map": self.block_map,
                "block_map": self.block_map, "feature_pairs": dict(self.block_map), "notes": self.notes}


def drop_blocks(teacher: nn.Module, n: int, where: Path) -> tuple[nn.Module, DepthRemoval]:
    """A shallower DiT built by plain diffusers from its config, every tensor copied from the teacher."""
    from o2mcli.models.families.dit import DiT
    from o2mcli.models.io import denoiser_config_of

    cfg = denoiser_config_of(teacher)
    layers = int(cfg["num_layers"])
    gone = blocks_to_drop(layers, n, where)
    kept = [i for i in range(layers) if i not in gone]
    new_cfg = dict(cfg)
    new_cfg["num_layers"] = len(kept)
    state = teacher.state_dict()
    pre = "transformer_blocks."
    key_map = {}
    for k in state:
        if k.startswith(pre):
            i, rest = k[len(pre):].split(".", 1)
            if int(i) in kept:
                key_map[f"{pre}{kept.index(int(i))}.{rest}"] = k
        else:
            key_map[k] = k
    student = DiT().build(new_cfg, {k: state[src].detach().clone() for k, src in key_map.items()}, where)
    for k, v in student.state_dict().items():  # the strict load above, checked once more against the map
        if not torch.equal(v, state[key_map[k]]):
            raise RuntimeError(f"--drop-blocks {n}: student tensor {k} differs from teacher {key_map[k]}")
    block_map = {f"{pre}{s}": f"{pre}{t}" for s, t in enumerate(kept)}
    return student, DepthRemoval(variant=f"drop-blocks {n}", config=new_cfg, kept=kept,
                                 removed=[f"{pre}{i}" for i in gone], block_map=block_map,
                                 notes=["transformer block 0 is always kept: diffusers' DiT reads its (t, class) "
                                        "embedding for the final modulation as well"])
