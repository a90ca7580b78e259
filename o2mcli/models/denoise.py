"""One call for every denoiser: a model of any registered family, or a group of students routed by t."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from o2mcli.models.families import family_of
from o2mcli.models.group import StudentGroup


def predict(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The raw prediction (eps, then the variance channels where learned) for ``x_t`` at ``t``.

    A DDP-wrapped model is called through its wrapper, so gradients synchronise.
    """
    if isinstance(model, StudentGroup):
        return model(x_t, t, cond)
    return family_of(model).predict(model, x_t, t, cond)


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of one input sample of a model or a group of students."""
    one = model.students[0] if isinstance(model, StudentGroup) else model
    return family_of(one).input_shape(one)
