"""The in-memory image set every data source returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ImageSet:
    """Images as float32 in [0, 1], shape (N, C, H, W), with where they came from, and class labels where the
    data have them (``labels[i]`` indexes ``classes``)."""

    images: torch.Tensor
    name: str
    source: str
    sha256: str
    labels: Optional[torch.Tensor] = None  # int64 (N,)
    classes: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.images.shape[0]

    def to_model_range(self) -> torch.Tensor:
        """[0, 1] -> [-1, 1], the range DDPM models are trained on."""
        return self.images * 2.0 - 1.0
