"""scikit-learn's handwritten digits (1,797 real 8x8 images, 17 gray levels), shipped in the package."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from o2mcli.data.base import ImageSet

DIGITS_FILE = Path(__file__).with_name("digits.npz")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8) with values 0..16, labels uint8 (1797,))."""
    with np.load(DIGITS_FILE, allow_pickle=False) as z:
        return z["images"], z["labels"]


def load_digits() -> ImageSet:
    """The digits as one-channel images scaled to [0, 1] (value / 16)."""
    images, labels = digits_arrays()
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    digest = hashlib.sha256(images.tobytes()).hexdigest()
    return ImageSet(images=x, name="digits", source="sklearn.datasets.load_digits (bundled)", sha256=digest,
                    labels=torch.from_numpy(labels.astype(np.int64)), classes=tuple(str(d) for d in range(10)))
