"""The condition a denoiser is called with: one typed record per batch, one row per sample.

A family reads the fields it takes (``DenoiserFamily.predict``): class labels (UNet2DModel, DiT), text sequence
embeddings (Stable Diffusion), and with them pooled text embeddings and added ids (SDXL's time ids). The engine, the
sampler, the student group and the DKDM buffer only index, concatenate and move a condition, so a family with a new
field adds it here and reads it in its own module. Tables of conditions are stored packed, one float row per
prompt (``Codec.pack``/``Codec.unpack``), so a prompt table is one tensor whatever the family.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Optional, Sequence

import torch

FIELDS = ("labels", "tokens", "pooled", "ids", "mask")


@dataclass(frozen=True)
class Condition:
    """A batch's condition; every field present has the batch as its first dimension."""

    labels: Optional[torch.Tensor] = None  # (B,) int64 class labels (the null class where dropped)
    tokens: Optional[torch.Tensor] = None  # (B, L, D) text sequence embeddings
    pooled: Optional[torch.Tensor] = None  # (B, P) pooled text embeddings (SDXL)
    ids: Optional[torch.Tensor] = None  # (B, K) added ids (SDXL: original size, crop, target size)
    mask: Optional[torch.Tensor] = None  # (B, L) 1 where a token is attended

    def present(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Condition":
        return replace(self, **{k: fn(v) for k, v in self.present().items()})

    def __len__(self) -> int:
        found = self.present()
        return int(next(iter(found.values())).shape[0]) if found else 0

    def __getitem__(self, idx: Any) -> "Condition":
        """The rows ``idx`` (an index tensor, a mask or a slice) of every field."""
        if torch.is_tensor(idx):
            return self._map(lambda v: v[idx.to(v.device)])
        return self._map(lambda v: v[idx])

    @property
    def device(self) -> torch.device:
        found = self.present()
        return next(iter(found.values())).device if found else torch.device("cpu")

    def to(self, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> "Condition":
        """Every field on ``device``; floating-point fields (embeddings, ids) also in ``dtype``."""
        def move(v: torch.Tensor) -> torch.Tensor:
            return v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)

        return self._map(move)

    def expand(self, n: int) -> "Condition":
        """A one-row condition repeated for ``n`` samples (a negative prompt for the whole batch)."""
        return self._map(lambda v: v.expand(n, *v.shape[1:]))

    @staticmethod
    def cat(parts: Sequence["Condition"]) -> "Condition":
        """The conditions stacked along the batch (each must hold the same fields)."""
        names = [tuple(p.present()) for p in parts]
        if len(set(names)) != 1:
            raise ValueError(f"cannot stack conditions holding different fields: {names}")
        return Condition(**{k: torch.cat([p.present()[k] for p in parts]) for k in names[0]})


def tokens_condition(rows: torch.Tensor) -> Condition:
    """Packed rows that are text tokens alone (SD 1.x/2.x's table rows, (N, L, D)) as a Condition."""
    return Condition(tokens=rows)


def as_condition(cond: Any, primary: str) -> Optional[Condition]:
    """``cond`` as a Condition: a bare tensor is the family's ``primary`` field (labels, or text tokens)."""
    if cond is None or isinstance(cond, Condition):
        return cond
    if torch.is_tensor(cond):
        return Condition(**{primary: cond})
    raise TypeError(f"a condition is a Condition or a tensor, not {type(cond).__name__}")


def stack(cond: Any, other: Any) -> Any:
    """Two conditions (or two bare tensors) stacked along the batch: a guided call's conditional and unconditional
    halves."""
    if isinstance(cond, Condition) and isinstance(other, Condition):
        return Condition.cat([cond, other])
    if torch.is_tensor(cond) and torch.is_tensor(other):
        return torch.cat([cond, other])
    raise TypeError(f"cannot stack a {type(cond).__name__} and a {type(other).__name__}")


def rows(cond: Any) -> int:
    """How many samples a condition (or a bare tensor) covers."""
    return len(cond) if isinstance(cond, Condition) else int(cond.shape[0])
