"""What ``o2m prune`` needs of a model family: a check, a width plan, the pruning pass, a rebuild with the
plain library that proves the result loads without o2m, and the per-block summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn


class Pruner:
    """Channel pruning for one model family (``family`` is its diffusers ``_class_name``)."""

    family: ClassVar[str]

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
