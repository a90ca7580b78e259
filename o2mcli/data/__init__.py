"""Image data sources for training and for FID references: ``digits`` or a folder of images."""

from __future__ import annotations

from pathlib import Path

from o2mcli.data.base import ImageSet
from o2mcli.data.digits import load_digits
from o2mcli.data.folder import load_folder
from o2mcli.errors import O2MError

__all__ = ["ImageSet", "load_dataset", "BUILTIN"]

BUILTIN = {"digits": load_digits}


def load_dataset(spec: str) -> ImageSet:
    """``digits`` (the bundled scikit-learn digits) or a path to a folder of same-size images."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    path = Path(spec)
    if not path.exists():
        raise O2MError(f"{spec}: no such data folder (built-in data: {', '.join(BUILTIN)})")
    return load_folder(path)
