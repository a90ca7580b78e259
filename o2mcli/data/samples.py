"""An ``o2m sample`` directory read back: its verified manifest, its images (``samples.npz``) and, where the model
was conditioned, the labels or prompts the images were asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from o2mcli.models.conditioning import takes_labels
from o2mcli.errors import O2MError
from o2mcli.manifest import read_manifest, require_kind
from o2mcli.outputs import note_input

SAMPLES_FILE = "samples.npz"


def load_samples(directory: Path) -> tuple[Any, np.ndarray]:
    """A verified ``samples`` stage directory: its manifest and images, uint8 (N, H, W, C)."""
    directory = Path(directory)
    if not directory.exists():
        raise O2MError(f"{directory}: no such samples directory")
    man = read_manifest(directory, verify=True)
    require_kind(man, directory, ("samples",))
    note_input(directory, "samples this run reads")
    for ref in man.parents:  # the model that drew them: never an output of a run that reads its samples
        note_input(ref.path, f"the model that drew {directory}")
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


def _member(path: Path, key: str, must_be: str) -> np.ndarray | None:
    """The array ``key`` of the npz ``path`` (None where it has none), read without pickle: an object array (pickled
    values) is refused in one line saying what the array ``must_be``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return z[key] if key in z.files else None
    except (OSError, ValueError, EOFError) as e:  # an object array lands here: allow_pickle=False refuses it
        raise O2MError(f"{path}: unreadable {key!r} ({' '.join(str(e).split())[:120]}); {key} must be "
                       f"{must_be}") from e


def load_sample_labels(directory: Path, n: int, classes: int | None = None, whence: str = "") -> np.ndarray | None:
    """The class labels a conditional model's samples were asked for (``labels`` in samples.npz), or None.

    ``labels`` is a numpy integer array, one label per image, read without pickle; a label below 0, or at or above
    ``classes`` (the number of classes ``whence`` names) where that is known, is refused.
    """
    path = Path(directory) / SAMPLES_FILE
    labels = _member(path, "labels", "a numpy integer array")
    if labels is None:
        return None
    if labels.dtype.kind not in "iu" or labels.shape != (n,):
        raise O2MError(f"{path}: 'labels' must be {n} integers, got {labels.dtype} {labels.shape}")
    check_label_range(path, labels, classes, whence)
    return labels.astype(np.int64)


def check_label_range(path: Path, labels: np.ndarray, classes: int | None, whence: str) -> None:
    """Refuse labels below 0, or at or above ``classes`` when that is known (``whence``: whose classes they are)."""
    top = np.iinfo(np.int64).max if classes is None else classes
    bad = np.unique(labels[(labels < 0) | (labels >= top)])
    if bad.size == 0:
        return
    shown = ", ".join(str(int(v)) for v in bad[:5]) + (f" and {bad.size - 5} more" if bad.size > 5 else "")
    if classes is None:
        valid = "class labels are 0 or more"
    elif classes == 0:
        valid = f"no label is valid ({whence})"
    else:
        valid = f"valid labels are 0..{classes - 1} ({whence})"
    raise O2MError(f"{path}: labels {shown} are outside the classes; {valid}")


def model_unavailable(path: str) -> Optional[str]:
    """Why the samples' parent model cannot be measured here (it is gone or unreadable), or None when it can be
    opened (then it is loaded and checked against the recorded hash: a changed model is refused, not skipped).

    Samples travel without their model (copied to another machine, the model deleted): FID and KID need only the
    images, so an absent model costs the row its params, MACs and throughput, not the whole score.
    """
    import os

    p = Path(path)
    if not os.path.lexists(p) or not p.exists():  # a dangling symlink is as gone as a missing path
        return f"{path}: no such file or directory"
    try:
        if p.is_dir():
            os.listdir(p)
        else:
            with open(p, "rb") as f:
                f.read(1)
    except PermissionError:
        return f"{path}: not readable (permission denied)"
    except OSError as e:
        return f"{path}: not readable ({e.strerror or e})"
    return None


def model_classes(directory: Path, man: Any) -> tuple[list[str] | None, str]:
    """The class names of the model that made the samples (its conditioning record: classes 0..K-1, the null
    class left out) and a phrase naming them; ``(None, why)`` where the model is gone, unreadable or changed since
    sampling, ``([], ...)`` where it is not class-conditional."""
    from o2mcli.models.io import load_model

    parent = man.parents[0]
    why = model_unavailable(parent.path)
    if why is not None:
        return None, why
    try:
        loaded = load_model(parent.path)
    except O2MError as e:
        return None, str(e)
    if loaded.sha256 != parent.sha256:
        return None, f"{parent.path}: changed since sampling ({Path(directory)} recorded sha256 {parent.sha256[:12]})"
    cond = loaded.conditioning
    if not takes_labels(cond):
        return [], f"the model {parent.path}, which is not class-conditional"
    null = cond.get("null_class")
    k = null if isinstance(null, int) else len(cond["classes"])
    return [str(c) for c in cond["classes"][:k]], f"the classes of the model {parent.path}"


def summary_classes(man: Any, labels: np.ndarray) -> list[str] | None:
    """Class names from the samples' manifest summary (``classes``: name -> count of the classes sampled, in index
    order) where they name every index 0..max(labels) and their counts are the labels'; else None."""
    found = man.summary.get("classes") if isinstance(man.summary, dict) else None
    if not isinstance(found, dict) or not found:
        return None
    used = sorted(set(int(v) for v in labels.tolist()))
    if used != list(range(len(found))):
        return None
    if list(found.values()) != [int((labels == k).sum()) for k in used]:
        return None
    return [str(name) for name in found]


def has_labels(directory: Path) -> bool:
    """Whether a samples directory's samples.npz holds ``labels`` (its member list only; nothing is loaded)."""
    try:
        with np.load(Path(directory) / SAMPLES_FILE, allow_pickle=False) as z:
            return "labels" in z.files
    except (OSError, ValueError, EOFError):
        return False


def labels_and_classes(directory: Path, man: Any, n: int) -> tuple[np.ndarray, list[str]] | None:
    """Labelled samples' labels and class names: the model's (:func:`model_classes`), else the manifest summary's
    (:func:`summary_classes`); None without labels. Labels outside the classes, or no names at all, are refused."""
    if not has_labels(directory):
        return None
    path = Path(directory) / SAMPLES_FILE
    names, whence = model_classes(directory, man)
    labels = load_sample_labels(directory, n, None if names is None else len(names), whence)
    if names is None:
        names = summary_classes(man, labels)
        if names is None:
            raise O2MError(f"{path}: the samples carry class labels but their class names cannot be determined: the "
                           f"model that made them is unavailable ({whence}) and the manifest summary does not name "
                           "every class sampled; restore the model at its recorded path")
    return labels, names


def load_sample_prompts(directory: Path, n: int) -> list[str] | None:
    """The prompts a text-conditioned model's samples were made from (``prompts`` in samples.npz), or None.

    ``prompts`` is a numpy unicode array (dtype ``<U..``), one prompt per image, read without pickle.
    """
    path = Path(directory) / SAMPLES_FILE
    prompts = _member(path, "prompts", "a numpy unicode array")
    if prompts is None:
        return None
    if prompts.dtype.kind != "U" or prompts.shape != (n,):
        raise O2MError(f"{path}: 'prompts' must be {n} unicode strings (one per image), got "
                       f"{prompts.dtype} {prompts.shape}")
    return [str(p) for p in prompts]
