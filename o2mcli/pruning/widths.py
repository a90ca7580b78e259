"""Uniform width plans: which channel count every block keeps, and the MACs a plan costs.

A plan scales every entry of ``block_out_channels`` by ``1 - ratio`` and rounds it to a multiple
of ``round_to`` (by default the GroupNorm group count, times the attention head size when the
config fixes one), so that a plain diffusers config expresses the pruned model exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.models.families import family_for_config


@dataclass(frozen=True)
class WidthPlan:
    """The teacher's and the template's widths under one ratio."""

    ratio: float
    round_to: int
    old_channels: tuple[int, ...]
    new_channels: tuple[int, ...]
    old_time_dim: int
    new_time_dim: int

    def width_map(self) -> dict[int, int]:
        """Old channel count -> new channel count (block widths only)."""
        return dict(zip(self.old_channels, self.new_channels))

    def new_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """The teacher's config with the template's widths (everything else unchanged)."""
        out = dict(cfg)
        out["block_out_channels"] = list(self.new_channels)
        if cfg.get("time_embedding_dim") is not None:
            out["time_embedding_dim"] = self.new_time_dim
        return out


def default_round_to(cfg: dict[str, Any]) -> int:
    """Smallest channel step a diffusers config can express: lcm(GroupNorm groups, head size)."""
    step = int(cfg.get("norm_num_groups") or 32)
    if _has_attention(cfg):
        step = math.lcm(step, *head_values(cfg))
    return step


def head_values(cfg: dict[str, Any]) -> list[int]:
    """The config's ``attention_head_dim`` entries (one, or one per block as in SD 2.x): every block width must be a
    multiple of each, whether it counts channels per head (``UNet2DModel``) or heads (``UNet2DConditionModel``)."""
    head = cfg.get("attention_head_dim")
    if head is None:
        return []
    return [int(h) for h in head] if isinstance(head, (list, tuple)) else [int(head)]


def _has_attention(cfg: dict[str, Any]) -> bool:
    blocks = list(cfg.get("down_block_types", ())) + list(cfg.get("up_block_types", ()))
    return any("Attn" in b for b in blocks) or cfg.get("add_attention", True)


def _round(c: float, step: int) -> int:
    return int(math.floor(c / step + 0.5)) * step


def plan_widths(cfg: dict[str, Any], ratio: float, round_to: int | None = None) -> WidthPlan:
    """Widths after removing ``ratio`` of every block's channels (rounded to ``round_to``)."""
    if not 0.0 < ratio < 1.0:
        raise O2MError(f"--ratio {ratio}: must be in (0, 1), the fraction of channels removed from every block")
    step = default_round_to(cfg) if round_to is None else int(round_to)
    groups = int(cfg.get("norm_num_groups") or 32)
    if step < 1 or step % groups:
        raise O2MError(f"--round-to {step}: must be a positive multiple of the teacher's norm_num_groups={groups}")
    head = cfg.get("attention_head_dim")
    if _has_attention(cfg) and any(step % h for h in head_values(cfg)):
        raise O2MError(f"--round-to {step}: must be a multiple of the teacher's attention_head_dim={head}")
    old = tuple(int(c) for c in cfg["block_out_channels"])
    new = tuple(_round(c * (1.0 - ratio), step) for c in old)
    for i, (c, n) in enumerate(zip(old, new)):
        if n < step:
            raise O2MError(f"--ratio {ratio}: block {i} ({c} channels) would keep {c * (1 - ratio):.1f} channels, "
                           f"less than one group of {step} (norm_num_groups={groups}); use a smaller ratio")
        if n > c:
            new = new[:i] + (c,) + new[i + 1:]
    if new[0] % 2:
        raise O2MError(f"--round-to {step}: block 0 would keep an odd {new[0]} channels; the sinusoidal time "
                       "embedding needs an even width")
    old_t = int(cfg.get("time_embedding_dim") or 4 * old[0])
    new_t = _round(old_t * new[0] / old[0], 1) if cfg.get("time_embedding_dim") is not None else 4 * new[0]
    return WidthPlan(ratio=ratio, round_to=step, old_channels=old, new_channels=new, old_time_dim=old_t,
                     new_time_dim=new_t)


def check_same_structure(cfg: dict[str, Any], plan: WidthPlan) -> None:
    """Refuse a plan whose config builds a model with other tensors than the teacher's, not only narrower ones.

    diffusers gives a ResNet block a 1x1 shortcut conv only when its input and output widths differ, so a plan
    that makes two different widths equal (e.g. 8, 16 -> 8, 8) would drop a trained layer that no config can keep.
    """
    old_keys = set(reference_unet(cfg).state_dict())
    new_keys = set(reference_unet(plan.new_config(cfg)).state_dict())
    if old_keys != new_keys:
        lost = sorted(old_keys - new_keys) or sorted(new_keys - old_keys)
        raise O2MError(f"--ratio {plan.ratio}: blocks {list(plan.old_channels)} -> {list(plan.new_channels)} at "
                       f"--round-to {plan.round_to} changes the model's layers ({lost[0]} and {len(lost) - 1} more "
                       "exist only on one side: diffusers builds a shortcut conv only between unequal widths); use "
                       "a ratio or --round-to that keeps unequal widths unequal")


@torch.no_grad()
def config_macs(cfg: dict[str, Any]) -> int:
    """MACs of one batch-1 forward of a UNet built from ``cfg``, on the meta device (no memory, no compute)."""
    from o2mcli.models.stats import count_macs

    return count_macs(reference_unet(cfg))


def block_macs(model: nn.Module) -> dict[str, int]:
    """Per-block MACs of one batch-1 forward of ``model``'s config, counted on the meta device (an SD UNet's real
    forward on a CPU takes seconds; the count does not need the weights)."""
    from o2mcli.models.io import denoiser_config_of
    from o2mcli.models.stats import count_block_macs

    return count_block_macs(reference_unet(denoiser_config_of(model)))


def plan_for_macs(cfg: dict[str, Any], target_macs: float, round_to: int | None = None) -> WidthPlan:
    """The least-pruned uniform plan whose template costs at most ``target_macs`` per forward."""
    teacher = config_macs(cfg)
    if target_macs >= teacher:
        raise O2MError(f"--target-macs {target_macs / 1e9:.4g}G: the teacher already costs {teacher / 1e9:.4g}G; "
                       "nothing to prune")
    seen: dict[tuple[int, ...], int] = {}
    best: WidthPlan | None = None
    for i in range(1, 200):  # ratios 0.005 ... 0.995; the MACs fall as the ratio grows
        ratio = i / 200
        try:
            plan = plan_widths(cfg, ratio, round_to)
        except O2MError:
            break
        if plan.new_channels not in seen:
            seen[plan.new_channels] = config_macs(plan.new_config(cfg))
        if seen[plan.new_channels] <= target_macs:
            best = plan
            break
    if best is None:
        smallest = min(seen.values()) if seen else teacher
        raise O2MError(f"--target-macs {target_macs / 1e9:.4g}G: below what a uniform template can reach "
                       f"(the smallest costs {smallest / 1e9:.4g}G; lower --round-to to go further)")
    return best


def reference_unet(cfg: dict[str, Any], device: str | torch.device = "meta") -> nn.Module:
    """A fresh model of ``cfg``'s family built from it (on the meta device by default: no memory)."""
    with torch.device(device):
        return family_for_config(cfg, Path("config")).build(cfg, None, Path("config"))
