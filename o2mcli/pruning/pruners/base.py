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
    # Named block-removal variants (``--blocks``) this family offers; none by default.
    block_variants: ClassVar[tuple[str, ...]] = ()

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

    def remove_blocks(self, model: nn.Module, variant: str, where: Path) -> tuple[nn.Module, Any]:
        """A shallower student built from the family's config and initialized from ``model``'s remaining blocks,
        and a record of what was removed (``--blocks``). Families without variants refuse by name."""
        raise O2MError(f"{where}: --blocks {variant}: a {self.family} has no block-removal variants (BK-SDM's "
                       "bk-base, bk-small and bk-tiny apply to Stable Diffusion's UNet2DConditionModel)")

    def drop_blocks(self, model: nn.Module, n: int, where: Path) -> tuple[nn.Module, Any]:
        """A shallower student without ``n`` whole blocks (``--drop-blocks``, DiT); other families refuse by name."""
        raise O2MError(f"{where}: --drop-blocks {n}: a {self.family} has no stack of equal blocks to drop from "
                       "(--drop-blocks applies to DiTTransformer2DModel; Stable Diffusion UNets take --blocks)")

    def removal_summary(self, teacher: nn.Module, shallow: nn.Module, template: nn.Module, removal: Any,
                        slim: Optional[dict]) -> dict:
        """The summary of a ``drop_blocks`` removal (and of the slimming after it, if any)."""
        raise NotImplementedError
