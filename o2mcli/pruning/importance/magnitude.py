"""L2 magnitude of each channel's weights, summed over every layer the channel touches (Li et al. 2017)."""

from __future__ import annotations

from typing import Any

import torch_pruning as tp


def magnitude(**_: Any) -> tp.importance.Importance:
    """Group L2-norm importance (torch-pruning's ``GroupMagnitudeImportance``)."""
    return tp.importance.GroupMagnitudeImportance(p=2)
