"""FID and KID from feature sets, computed by clean-fid's own functions.

The ``o2m score`` stage computes features in memory (``o2mcli.scoring.features``) and then calls
``cleanfid.fid.frechet_distance`` and ``cleanfid.fid.kernel_distance`` here. It does not run
clean-fid's folder loader (``get_folder_features``) on its inputs because: samples come from the
hash-verified ``samples.npz``, not from loose PNGs; reference folders go through
``o2mcli.data.load_folder``, which takes the images directly in the folder and refuses mixed sizes
or modes, while clean-fid globs recursively and converts everything to RGB, so the two could score
different image sets; and the in-memory path needs no DataLoader workers. The image pipeline is
nevertheless clean-fid's (same RGB replication, same resizer, ``get_batch_features``), and
``fid_between_folders`` runs clean-fid's complete folder path (``compute_fid`` with our extractor as
``custom_feat_extractor``), which the tests use to check both paths agree.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from o2mcli.errors import O2MError


def _features(f: np.ndarray, what: str) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2:
        raise O2MError(f"{what}: expected features (N, dim), got shape {f.shape}")
    if f.shape[0] < 2:
        raise O2MError(f"{what}: {f.shape[0]} image(s); FID and KID need at least 2")
    if not np.isfinite(f).all():
        raise O2MError(f"{what}: features contain NaN or inf")
    return f


def _pair(f1: np.ndarray, f2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f1, f2 = _features(f1, "generated set"), _features(f2, "reference set")
    if f1.shape[1] != f2.shape[1]:
        raise O2MError(f"feature dimensions differ ({f1.shape[1]} vs {f2.shape[1]})")
    return f1, f2


def feature_stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (N - 1 normalised) of a feature set, as clean-fid computes them."""
    f = _features(f, "features")
    return np.mean(f, axis=0), np.cov(f, rowvar=False)


def fid_from_features(f1: np.ndarray, f2: np.ndarray, notes: Optional[list[str]] = None) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID, Heusel et al. 2017), by cleanfid.fid.frechet_distance."""
    from cleanfid.fid import frechet_distance

    f1, f2 = _pair(f1, f2)
    mu1, s1 = np.mean(f1, axis=0), np.cov(f1, rowvar=False)
    mu2, s2 = np.mean(f2, axis=0), np.cov(f2, rowvar=False)
    said = io.StringIO()
    try:
        # clean-fid prints when it regularises a singular product and scipy warns; both become notes.
        with contextlib.redirect_stdout(said), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            d = frechet_distance(mu1, s1, mu2, s2)
    except ValueError as e:
        raise O2MError(f"FID: matrix square root failed ({e}); use more samples") from e
    if notes is not None:
        said_lines = [" ".join(said.getvalue().split())] if said.getvalue().strip() else []
        for text in [f"scipy: {w.message}" for w in caught if w.category.__name__ == "LinAlgWarning"] + \
                [f"clean-fid: {t}" for t in said_lines]:
            if text not in notes:
                notes.append(text)
    v = float(np.real(d))
    return 0.0 if -1e-6 < v < 0.0 else v  # round-off of identical sets


def kid_subset_size(n1: int, n2: int, cap: int = 1000) -> int:
    """KID subset size: at most ``cap`` and half the smaller set, so each subset is a real draw from both sets."""
    return max(2, min(cap, min(n1, n2) // 2))


def kid_from_features(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """Kernel distance (KID, Binkowski et al. 2018): unbiased MMD^2, cubic kernel, mean and std over subsets, each by cleanfid.fid.kernel_distance.

    Each subset draws ``kid_subset_size(n1, n2, subset_size)`` images without replacement from *both* sets;
    were it n (clean-fid's min(n1, n2, 1000) when a set has at most 1000 images) every subset would hold all
    of that set, and the std would measure the other set's subsets alone (for two such sets, ~1e-13).
    """
    from cleanfid.fid import kernel_distance

    f1, f2 = _pair(f1, f2)
    if subsets < 1 or subset_size < 2:
        raise O2MError(f"KID: need at least 1 subset of at least 2 images (got {subsets} x {subset_size})")
    if min(f1.shape[0], f2.shape[0]) < 4:
        raise O2MError(f"KID: needs at least 4 images per set to draw proper subsets (got {f1.shape[0]} and "
                       f"{f2.shape[0]})")
    m = kid_subset_size(f1.shape[0], f2.shape[0], subset_size)
    state = np.random.get_state()  # clean-fid draws subsets from numpy's global generator
    try:
        np.random.seed(seed % (2 ** 32))
        vals = np.array([kernel_distance(f1, f2, num_subsets=1, max_subset_size=m) for _ in range(subsets)])
    finally:
        np.random.set_state(state)
    return float(vals.mean()), float(vals.std())


def size_warnings(n: int, dim: int, what: str) -> list[str]:
    """Warnings for feature sets too small for a full-rank covariance."""
    if n <= dim:
        return [f"{n} {what} are not more than the {dim} feature dimensions, so the covariance is singular "
                f"and FID is biased and unstable; use more than {dim} (thousands for comparable numbers)"]
    return []


def fid_between_folders(dir1: Path, dir2: Path, extractor, batch_size: int = 64) -> float:
    """FID (Heusel et al. 2017) between two image folders by clean-fid's own folder path, with ``extractor`` as its custom_feat_extractor."""
    from cleanfid.fid import compute_fid

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy's about clean-fid's sqrtm(disp=...)
        return float(compute_fid(str(dir1), str(dir2), mode="clean", custom_feat_extractor=extractor.model,
                                 custom_fn_resize=extractor.resize, num_workers=0, batch_size=batch_size,
                                 device=extractor.device, verbose=False, use_dataparallel=False))


def folder_features(folder: Path, extractor, batch_size: int = 64) -> np.ndarray:
    """Features of every image under ``folder`` by clean-fid's ``get_folder_features`` (recursive, RGB), offline."""
    from cleanfid.fid import get_folder_features

    return get_folder_features(str(folder), extractor.model, num_workers=0, batch_size=batch_size,
                               device=extractor.device, mode="clean", custom_fn_resize=extractor.resize,
                               verbose=False).astype(np.float64)
