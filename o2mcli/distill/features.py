"""Block outputs of a denoiser captured by forward hooks, for feature-based KD.

The points are the family's (a UNet: every down block, the mid block and every up block; a DiT: every
transformer block), each recorded as a (B, C, H, W) map by the family's ``feature_map`` (a DiT's tokens
become its patch grid). A teacher and a student are matched by block name and spatial size, so channel
counts may differ. Where no block name is shared (a DiT and a UNet), each student point takes the teacher
point of the same spatial size at the nearest relative depth, a point's depth being index / (points - 1) in its
family's input-to-output order over all its points (ties: the shallower). A DiT's blocks all sit at the patch
grid's resolution, so they spread over the UNet's blocks of that resolution (a tiny 8x8 UNet with 2x2 patches:
the first DiT block takes the first 4x4 down block, the last the mid block); a point of a size the other side
lacks is left out. The KD losses' projections (feat, crd) or channel-free forms (at, sp) absorb the widths.
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
        self._model, self._family = unet, family_of(unet)
        self.features: dict[str, torch.Tensor] = {}
        self.enabled = bool(names)
        self._hooks = [unet.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def record(_m: nn.Module, _i: Any, out: Any) -> None:
            if self.enabled:
                f = out[0] if isinstance(out, tuple) else out
                self.features[name] = self._family.feature_map(self._model, name, f)
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
    ``feature_pairs``), only the paired blocks are compared; without, and with no block name shared (another
    family), blocks pair by spatial size and relative depth (see the module docstring)."""
    names, s_ch, t_ch, _ = feature_match(student, teacher, pairs)
    return names, s_ch, t_ch


def feature_match(student: nn.Module, teacher: nn.Module, pairs: dict[str, str] | None = None
                  ) -> tuple[list[str], dict[str, int], dict[str, int], dict[str, str]]:
    """:func:`matched_points` and the student -> teacher block pairs it used (the engine taps the teacher's)."""
    if pairs:
        # Recorded pairs name the points themselves, which may lie inside a block (BK-SDM-Tiny's innermost stage is
        # compared by an attention's proj_out); names the models lack are left out. Tapped in forward order.
        s = feature_shapes(student, [n for n in pairs if _has_module(student, n)])
        t = feature_shapes(teacher, sorted({pairs[n] for n in s if _has_module(teacher, pairs[n])}))
    else:
        s = feature_shapes(student, feature_points(student))
        t = feature_shapes(teacher, feature_points(teacher))
    if not pairs and not set(s) & set(t):
        pairs = depth_pairs(list(s), list(t), s, t)
    of = (lambda n: pairs.get(n)) if pairs else (lambda n: n)
    names = [n for n in s if of(n) in t and s[n][1:] == t[of(n)][1:]]
    if not names:
        raise O2MError("feature KD needs student and teacher blocks of the same spatial sizes; none match "
                       "(use --kd output)")
    return names, {n: s[n][0] for n in names}, {n: t[of(n)][0] for n in names}, {n: of(n) for n in names}


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def depth_pairs(s_names: list[str], t_names: list[str], s: dict[str, tuple[int, int, int]],
                t: dict[str, tuple[int, int, int]]) -> dict[str, str]:
    """Each student point -> the teacher point of the same spatial size at the nearest relative depth (ties: the
    shallower); a point without a teacher point of its size is left out."""
    def depth(i: int, n: int) -> float:
        return i / (n - 1) if n > 1 else 0.0

    out = {}
    for i, n in enumerate(s_names):
        same = [(abs(depth(j, len(t_names)) - depth(i, len(s_names))), j) for j, m in enumerate(t_names)
                if t[m][1:] == s[n][1:]]
        if same:
            out[n] = t_names[min(same)[1]]
    return out
