"""An ``o2m sample`` directory read back: its verified manifest, its images (``samples.npz``) and, where the model
was conditioned, the labels or prompts the images were asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from o2mcli.errors import O2MError
from o2mcli.manifest import read_manifest, require_kind

SAMPLES_FILE = "samples.npz"


def load_samples(directory: Path) -> tuple[Any, np.ndarray]:
    """A verified ``samples`` stage directory: its manifest and images, uint8 (N, H, W, C)."""
    directory = Path(directory)
    if not directory.exists():
        raise O2MError(f"{directory}: no such samples directory")
    man = read_manifest(directory, verify=True)
    require_kind(man, directory, ("samples",))
    path = directory / SAMPLES_FILE
    if not path.is_file():
        raise O2MError(f"{path}: missing (a samples directory holds its images in {SAMPLES_FILE})")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise O2MError(f"{path}: no 'images' array (found {', '.join(z.files) or 'nothing'})")
            images = z["images"]
    except O2MError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise O2MError(f"{path}: unreadable npz ({' '.join(str(e).split())[:120]})") from e
    if images.dtype != np.uint8 or images.ndim != 4:
        raise O2MError(f"{path}: images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if images.shape[0] < 2:
        raise O2MError(f"{path}: {images.shape[0]} image(s); FID and KID need at least 2")
    if not man.parents:
        raise O2MError(f"{directory}: the manifest names no model (parents is empty)")
    for key in ("scheduler", "steps"):
        if key not in man.config:
            raise O2MError(f"{directory}: the manifest config lacks {key!r}")
    return man, images


def load_sample_labels(directory: Path, n: int) -> np.ndarray | None:
    """The class labels a conditional model's samples were asked for (``labels`` in samples.npz), or None."""
    path = Path(directory) / SAMPLES_FILE
    with np.load(path, allow_pickle=False) as z:
        if "labels" not in z.files:
            return None
        labels = z["labels"]
    if labels.dtype.kind not in "iu" or labels.shape != (n,):
        raise O2MError(f"{path}: 'labels' must be {n} integers, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def load_sample_prompts(directory: Path, n: int) -> list[str] | None:
    """The prompts a text-conditioned model's samples were made from (``prompts`` in samples.npz), or None.

    ``prompts`` is a numpy unicode array (dtype ``<U..``), one prompt per image, read without pickle.
    """
    path = Path(directory) / SAMPLES_FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            if "prompts" not in z.files:
                return None
            prompts = z["prompts"]
    except (OSError, ValueError, EOFError) as e:
        # An object array (pickled strings) lands here too: allow_pickle=False refuses to read it.
        raise O2MError(f"{path}: unreadable 'prompts' ({' '.join(str(e).split())[:120]}); prompts must be a "
                       "numpy unicode array") from e
    if prompts.dtype.kind != "U" or prompts.shape != (n,):
        raise O2MError(f"{path}: 'prompts' must be {n} unicode strings (one per image), got "
                       f"{prompts.dtype} {prompts.shape}")
    return [str(p) for p in prompts]
