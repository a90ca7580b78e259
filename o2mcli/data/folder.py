"""A folder of same-size images (png, jpg, bmp, webp), grayscale or RGB."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from o2mcli.data.base import ImageSet
from o2mcli.errors import O2MError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_PIXELS = 8192 * 8192  # per image; a larger header is a decompression bomb, refused before decoding


def load_folder(folder: Path) -> ImageSet:
    """Every image file directly in ``folder``; mixed sizes, mixed modes or unreadable files are refused."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise O2MError(f"{folder}: not a directory of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise O2MError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    arrays, first_shape, digest = [], None, hashlib.sha256()
    for f in files:
        try:
            with Image.open(f) as im:
                if im.size[0] * im.size[1] > MAX_PIXELS:
                    raise O2MError(f"{f}: image claims {im.size[0]}x{im.size[1]} pixels, more than o2m decodes "
                                   f"({MAX_PIXELS:,}); a decompression bomb or not a training image")
                im.load()
                mode = "L" if im.mode in ("L", "1", "I;16", "I", "LA") else "RGB"
                arr = np.asarray(im.convert(mode), dtype=np.uint8)
        except Image.DecompressionBombError as e:
            raise O2MError(f"{f}: image claims more pixels than o2m decodes ({e}); a decompression bomb") from e
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise O2MError(f"{f}: unreadable image ({type(e).__name__})") from e
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
    return ImageSet(images=x.contiguous(), name=folder.name, source=str(folder.resolve()), sha256=digest.hexdigest())


def _fmt(shape: tuple[int, ...]) -> str:
    h, w, c = shape
    return f"{w}x{h} with {c} channel(s)"
