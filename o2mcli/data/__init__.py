"""Image data sources for training and for FID references: ``digits`` or a folder of images."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from o2mcli.data.base import ImageSet
from o2mcli.data.digits import load_digits
from o2mcli.data.folder import load_folder
from o2mcli.data.samples import SAMPLES_FILE, load_samples
from o2mcli.errors import O2MError
from o2mcli.registry import Registry

__all__ = ["ImageSet", "load_dataset", "load_samples", "BUILTIN", "SAMPLES_FILE"]

BUILTIN: Registry[Callable[[], ImageSet]] = Registry("--data", "built-in data")
BUILTIN.register("digits", load_digits)


def load_dataset(spec: str, labels: bool = True) -> ImageSet:
    """``digits`` (the bundled digits), an ``o2m sample`` directory (its samples.npz), or a folder of images.

    A samples directory as data is the DKDM paper's baseline: a synthetic dataset drawn from the
    teacher, then ordinary training on it; a class-conditional teacher's samples carry their labels and the
    teacher's class names. ``labels=False`` skips reading a samples directory's labels (a FID reference).
    """
    if spec in BUILTIN:
        return BUILTIN[spec]()
    path = Path(spec)
    if not path.exists():
        raise O2MError(f"{spec}: no such data folder (built-in data: {', '.join(BUILTIN)})")
    if (path / "manifest.json").is_file() and (path / SAMPLES_FILE).is_file():
        return _load_samples(path, labels)
    return load_folder(path)


def _load_samples(path: Path, with_labels: bool = True) -> ImageSet:
    """A samples directory's images, with their labels and class names where a class-conditional model made them
    (:func:`o2mcli.data.samples.labels_and_classes`)."""
    import torch

    from o2mcli.data.samples import labels_and_classes

    man, images = load_samples(path)  # verified; uint8 (N, H, W, C)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    found = labels_and_classes(path, man, images.shape[0]) if with_labels else None
    return ImageSet(images=x.contiguous(), name=path.name, source=str(path.resolve()),
                    sha256=man.artifact(SAMPLES_FILE).sha256,
                    labels=None if found is None else torch.from_numpy(found[0]),
                    classes=() if found is None else tuple(found[1]))
