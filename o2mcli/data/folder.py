"""A folder of same-size images (png, jpg, bmp, webp), grayscale or RGB."""

from __future__ import annotations

import hashlib
import struct
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from o2mcli.data.base import ImageSet
from o2mcli.errors import O2MError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_PIXELS = 8192 * 8192  # per image; a larger header is a decompression bomb, refused before decoding
GRAY_MODES = ("L", "1", "I;16", "I", "LA")  # PIL modes read as one channel; every other mode as RGB


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_folder(folder: Path) -> ImageSet:
    """Every image file directly in ``folder``, or, when it holds none, one subfolder per class (the
    ImageFolder convention: labels by sorted subfolder name). Mixed sizes, mixed modes or unreadable files
    are refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise O2MError(f"{folder}: not a directory of images")
    files = _images_in(folder)
    if files:
        images, digest = _read(files)
        return ImageSet(images=images, name=folder.name, source=str(folder.resolve()), sha256=digest)
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = [(d.name, _images_in(d)) for d in subdirs]
    per_class = [(name, fs) for name, fs in per_class if fs]
    if not per_class:
        raise O2MError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}, directly or in one "
                       "subfolder per class)")
    files = [f for _, fs in per_class for f in fs]
    labels = torch.tensor([k for k, (_, fs) in enumerate(per_class) for _ in fs], dtype=torch.int64)
    images, digest = _read(files)
    return ImageSet(images=images, name=folder.name, source=str(folder.resolve()), sha256=digest, labels=labels,
                    classes=tuple(name for name, _ in per_class))


def read_image(path: Path, rgb: bool = False) -> "Image.Image":
    """The image file ``path`` decoded into memory as mode "L" (a grayscale file) or "RGB" (any other, or every
    file when ``rgb``): every image o2m reads goes through here. A header claiming more than ``MAX_PIXELS`` pixels
    is refused before anything is decoded (a decompression bomb), and a missing, unreadable, truncated or
    non-image file is a one-line ``O2MError`` naming it."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # PIL warns from 89M pixels and refuses from twice that; o2m's own, lower limit refuses first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise O2MError(f"{path}: image claims {w}x{h} pixels, more than o2m decodes ({MAX_PIXELS:,}); "
                                   "a decompression bomb or not a training image")
                if w < 1 or h < 1:
                    raise O2MError(f"{path}: image of {w}x{h} pixels")
                im.load()
                gray = im.mode in GRAY_MODES
                if rgb and gray:
                    return im.convert("L").convert("RGB")  # a 16-bit grayscale file through 8 bits, like "L"
                return im.convert("L" if gray else "RGB")  # a copy: nothing refers to the file after this
    except Image.DecompressionBombError as e:
        raise O2MError(f"{path}: image claims more pixels than o2m decodes ({e}); a decompression bomb") from e
    except (OSError, ValueError, EOFError, SyntaxError, struct.error, zlib.error) as e:
        # OSError covers UnidentifiedImageError, a truncated file and a missing one; plugins raise the others on
        # corrupt headers and streams
        raise O2MError(f"{path}: unreadable image ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from e


def _read(files: list[Path]) -> tuple[torch.Tensor, str]:
    """The images of ``files`` as (N, C, H, W) in [0, 1], and the sha256 of their pixels."""
    arrays, first_shape, digest = [], None, hashlib.sha256()
    for f in files:
        arr = np.asarray(read_image(f), dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if first_shape is None:
            first_shape, first_file = arr.shape, f
        elif arr.shape != first_shape:
            raise O2MError(f"{f}: image is {_fmt(arr.shape)} but {first_file.name} is {_fmt(first_shape)}; "
                           "all images in a folder must share size and channels")
        arrays.append(arr)
        digest.update(arr.tobytes())
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return x.contiguous(), digest.hexdigest()


def _fmt(shape: tuple[int, ...]) -> str:
    h, w, c = shape
    return f"{w}x{h} with {c} channel(s)"
