"""Pictures a person can look at: image grids and simple line plots (PIL only)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from o2mcli.fsutil import atomic_file


def to_uint8(images01: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (N, C, H, W) -> uint8 (N, H, W, C)."""
    x = np.clip(np.rint(np.asarray(images01) * 255.0), 0, 255).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def grid_image(images: np.ndarray, ncol: int | None = None, min_cell: int = 32, pad: int = 2):
    """uint8 (N, H, W, C) -> a PIL grid, each cell upscaled (nearest) to at least ``min_cell`` pixels."""
    from PIL import Image

    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    scale = max(1, math.ceil(min_cell / max(h, w)))
    ch, cw = h * scale + pad, w * scale + pad
    canvas = np.full((nrow * ch + pad, ncol * cw + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        cell = images[i].repeat(scale, 0).repeat(scale, 1)
        canvas[pad + r * ch: pad + r * ch + h * scale, pad + q * cw: pad + q * cw + w * scale] = cell
    return Image.fromarray(canvas[:, :, 0] if c == 1 else canvas)


def side_by_side(panels: Sequence[tuple[str, "object"]], pad: int = 12, caption_h: int = 22):
    """PIL images side by side on white, each under its caption (e.g. the teacher's and the students' grids)."""
    from PIL import Image, ImageDraw

    from o2mcli.errors import O2MError

    if not panels:
        raise O2MError("side_by_side: no panels")
    ims = [im.convert("RGB") for _, im in panels]
    h = max(im.height for im in ims) + caption_h + 2 * pad
    w = sum(im.width for im in ims) + pad * (len(ims) + 1)
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for (label, _), im in zip(panels, ims):
        draw.text((x, pad // 2), label, fill=(0, 0, 0))
        canvas.paste(im, (x, pad + caption_h))
        x += im.width + pad
    return canvas


def save_png(img, path: Path) -> None:
    """Save a PIL image atomically."""
    with atomic_file(Path(path)) as tmp:
        img.save(tmp, format="PNG")


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path, title: str,
              xlabel: str = "step", ylabel: str = "loss", logy: bool = False, size=(640, 400)) -> None:
    """A small line/scatter plot with axes and a legend, written as PNG."""
    from PIL import Image, ImageDraw

    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
              (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # matplotlib's tab10
    W, H = size
    left, right, top, bottom = 70, 20, 30, 45
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [(float(x), float(y)) for xs, ys in series.values() for x, y in zip(xs, ys) if np.isfinite(y)]
    if logy:
        pts = [(x, y) for x, y in pts if y > 0]
    f = (lambda y: math.log10(y)) if logy else (lambda y: y)
    if pts:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(f(p[1]) for p in pts), max(f(p[1]) for p in pts)
    else:
        x0, x1, y0, y1 = 0.0, 1.0, 0.0, 1.0
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right), H - bottom - (f(y) - y0) / (y1 - y0) * (H - top - bottom))

    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        yy = H - bottom - (H - top - bottom) * i / 4
        d.text((4, yy - 6), f"{10 ** yv if logy else yv:.3g}", fill="black")
        xv = x0 + (x1 - x0) * i / 4
        d.text((left + (W - left - right) * i / 4 - 10, H - bottom + 6), f"{xv:.4g}", fill="black")
    d.text((W // 2 - 4 * len(title), 8), title, fill="black")
    d.text((W // 2 - 4 * len(xlabel), H - 18), xlabel, fill="black")
    d.text((4, top - 20), ylabel, fill="black")
    for i, (name, (xs, ys)) in enumerate(series.items()):
        col = colors[i % len(colors)]
        p = [px(float(x), float(y)) for x, y in zip(xs, ys) if np.isfinite(y) and (not logy or y > 0)]
        if len(p) > 1:
            d.line(p, fill=col, width=2)
        for q in p if len(p) <= 30 else []:
            d.ellipse([q[0] - 3, q[1] - 3, q[0] + 3, q[1] + 3], fill=col)
        d.text((W - right - 150, top + 6 + 14 * i), name, fill=col)
    save_png(img, path)
