"""Block outputs of a UNet captured by forward hooks, for feature-based KD.

The points are the outputs of every down block, the mid block and every up block. A teacher
and a student are matched by block name and spatial size, so channel counts may differ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from o2mcli.errors import O2MError
from o2mcli.models.denoise import predict
from o2mcli.models.families import family_of


def feature_points(unet: nn.Module) -> list[str]:
    """Names of the blocks whose outputs are KD features (the model family's choice)."""
    return family_of(unet).feature_points(unet)


class FeatureTap:
    """Records the named blocks' outputs on every forward of ``unet`` while enabled."""

    def __init__(self, unet: nn.Module, names: list[str]) -> None:
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        self.enabled = bool(names)
        self._hooks = [unet.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def record(_m: nn.Module, _i: Any, out: Any) -> None:
            if self.enabled:
                self.features[name] = out[0] if isinstance(out, tuple) else out
        return record

    def pop(self) -> dict[str, torch.Tensor]:
        out, self.features = self.features, {}
        return out

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


@torch.no_grad()
def feature_shapes(unet: nn.Module, names: list[str]) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of each named block's output, from one batch-1 forward."""
    p = next(unet.parameters())
    tap = FeatureTap(unet, names)
    try:
        predict(unet, torch.zeros(1, *family_of(unet).input_shape(unet), device=p.device, dtype=p.dtype),
                torch.tensor([1], device=p.device))
        return {n: tuple(f.shape[1:]) for n, f in tap.pop().items()}
    finally:
        tap.remove()


def matched_points(student: nn.Module, teacher: nn.Module, pairs: dict[str, str] | None = None
                   ) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """Student blocks whose teacher block (``pairs[name]``, else the same name) has the same spatial size, and each
    side's channel counts, keyed by the student's block names. With ``pairs`` (a BK-SDM template's
    ``feature_pairs``), only the paired blocks are compared."""
    s = feature_shapes(student, feature_points(student))
    t = feature_shapes(teacher, feature_points(teacher))
    of = (lambda n: pairs.get(n)) if pairs else (lambda n: n)
    names = [n for n in s if of(n) in t and s[n][1:] == t[of(n)][1:]]
    if not names:
        raise O2MError("feature KD needs student and teacher blocks of the same spatial sizes; none match "
                       "(use --kd output)")
    return names, {n: s[n][0] for n in names}, {n: t[of(n)][0] for n in names}
