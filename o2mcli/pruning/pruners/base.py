"""What ``o2m prune`` needs of a model family: a check, a width plan, the pruning pass, a rebuild with the
plain library that proves the result loads without o2m, and the per-block summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from o2mcli.errors import O2MError


class Pruner:
    """Channel pruning for one model family (``family`` is its diffusers ``_class_name``)."""

    family: ClassVar[str]
    # Capabilities a family declares (the stage asks these, never the family's name):
    # named block-removal variants (``--blocks``: ``remove_blocks``), none by default;
    block_variants: ClassVar[tuple[str, ...]] = ()
    # whether it drops whole blocks of an equal stack (``--drop-blocks``: ``drop_blocks``, ``removal_summary``);
    drops_blocks: ClassVar[bool] = False
    # what its widths are counted in, per block (the report's column): channels, or attention heads.
    width_unit: ClassVar[str] = "channels"

    def check(self, cfg: dict[str, Any], where: Path) -> None:
        """Refuse, by name, a configuration of the family this pruner does not handle."""
        raise NotImplementedError

    def plan(self, cfg: dict[str, Any], ratio: Optional[float], target_macs: Optional[float],
             round_to: Optional[int]) -> Any:
        """The widths to keep: a ratio, or the least pruning that meets a MACs budget (a ``WidthPlan``)."""
        raise NotImplementedError

    def prune(self, model: nn.Module, plan: Any, importance: Callable[[Any], torch.Tensor]) -> Any:
        """Remove channels in place, keeping those ``importance`` ranks highest; what was done."""
        raise NotImplementedError

    def rebuild(self, pruned: nn.Module, new_cfg: dict[str, Any], where: Path) -> nn.Module:
        """The pruned model rebuilt from its new config by the plain library, checked to be the same model."""
        raise NotImplementedError

    def summary(self, teacher: nn.Module, template: nn.Module, plan: Any, outcome: Any) -> dict:
        """Params, MACs and widths per block, teacher against template, for the manifest."""
        raise NotImplementedError

    def widths_line(self, teacher: dict, template: dict) -> str:
        """The report's line of the widths that changed, from the summary's teacher and template records."""
        return f"block_out_channels {teacher['block_out_channels']} -> {template['block_out_channels']}"

    # Declared by the families that have them (``block_variants``, ``drops_blocks``):
    #   remove_blocks(model, variant, where) -> (a shallower student built from the family's config, initialized
    #       from ``model``'s remaining blocks; a record of what was removed);
    #   drop_blocks(model, n, where) -> (a student without ``n`` whole blocks; its record);
    #   removal_summary(teacher, shallow, template, removal, slim) -> the summary of a ``drop_blocks`` removal.


def offered(pruners: Any, has: Callable[[Any], bool]) -> str:
    """The families whose pruner ``has`` a capability, for a refusal ("DiTTransformer2DModel", or "none")."""
    names = [p.family for p in pruners if has(p)]
    return ", ".join(names) or "none"


def check_capability(pruner: Pruner, pruners: Any, blocks: Optional[str], drop_blocks: Optional[int],
                     where: Path) -> None:
    """Refuse ``--blocks``/``--drop-blocks`` a family does not offer, naming the families that do."""
    if blocks is not None and blocks not in pruner.block_variants:
        mine = f"its patterns are {', '.join(pruner.block_variants)}" if pruner.block_variants else \
            "it has no block-removal variants"
        raise O2MError(f"{where}: --blocks {blocks}: a {pruner.family}'s {mine} (--blocks {blocks} applies to "
                       f"{offered(pruners, lambda p: blocks in p.block_variants)})")
    if drop_blocks is not None and not pruner.drops_blocks:
        raise O2MError(f"{where}: --drop-blocks {drop_blocks}: a {pruner.family} has no stack of equal blocks to "
                       f"drop from (--drop-blocks applies to {offered(pruners, lambda p: p.drops_blocks)}; block "
                       f"patterns, --blocks, to {offered(pruners, lambda p: bool(p.block_variants))})")
