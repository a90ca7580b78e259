"""Latents and text embeddings of a captioned folder, computed once and cached as safetensors shards (issue #13).

A training step of a latent model never runs the VAE encoder or the text encoder: the cache holds, per image,
the scaled VAE latent of the image (resized on its short side and centre-cropped to ``resolution``) and the text
embedding of its caption. Its index (``o2m_latent_cache.json``) records what the cache was built from (the images' and captions' digest,
the VAE's and text encoder's sha256, the resolution, the seed) and each shard's sha256; a cache whose record
differs from the request is rebuilt, one whose shard changed is refused. The cache directory appears whole or
not at all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from o2mcli.data.captions import Captioned
from o2mcli.errors import O2MError
from o2mcli.fsutil import check_output_free, contained, loads_bounded, sha256_file
from o2mcli.outputs import atomic_dir

INDEX = "o2m_latent_cache.json"  # also marks the folder as o2m's (fsutil.O2M_DIR_MARKERS)
FORMAT = "o2m-latent-cache/1"


def load_rgb(path: Path, resolution: int) -> torch.Tensor:
    """One image as (3, resolution, resolution) in [0, 1]: RGB, short side resized, centre-cropped."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = resolution / min(w, h)
            im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except OSError as e:
        raise O2MError(f"{path}: unreadable image ({e})") from e
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def source_digest(items: list[Captioned]) -> str:
    """sha256 over every image file's bytes and every caption, in order."""
    h = hashlib.sha256()
    for it in items:
        h.update(sha256_file(it.path).encode())
        h.update(it.text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def build_cache(out: Path, items: list[Captioned], encode_images: Callable[[torch.Tensor], torch.Tensor],
                encode_texts: Callable[[list[str]], torch.Tensor], record: dict[str, Any], resolution: int,
                batch_size: int = 16, shard_size: int = 1024, force: bool = False) -> Path:
    """Write the cache for ``items`` at ``out`` (or reuse it when its index records the same ``record``).

    ``encode_images`` maps images in [0, 1] to scaled latents; ``encode_texts`` maps captions to embeddings;
    ``record`` names what they are (the parts' hashes, the seed), so a changed encoder rebuilds the cache.
    """
    want = {"format": FORMAT, "source": source_digest(items), "n": len(items), "resolution": resolution, **record}
    if (out / INDEX).is_file():
        have = _index(out)
        if {k: have.get(k) for k in want} == want:
            verify_cache(out)
            return out
        force = True  # built from other inputs: rebuilt whole
    shards = []
    check_output_free(out, force)  # before the encoding work (atomic_dir checks again when done)
    with atomic_dir(out, force=force) as tmp:
        from safetensors.torch import save_file

        for s, lo in enumerate(range(0, len(items), shard_size)):
            part = items[lo:lo + shard_size]
            lat, txt = [], []
            for b in range(0, len(part), batch_size):
                batch = part[b:b + batch_size]
                lat.append(encode_images(torch.stack([load_rgb(it.path, resolution) for it in batch])).float().cpu())
                txt.append(encode_texts([it.text for it in batch]).float().cpu())
            name = f"shard-{s:05d}.safetensors"
            save_file({"latents": torch.cat(lat).contiguous(), "text": torch.cat(txt).contiguous()}, str(tmp / name))
            shards.append({"file": name, "n": len(part), "sha256": sha256_file(tmp / name)})
        (tmp / INDEX).write_text(json.dumps({**want, "shards": shards}, indent=2, sort_keys=True))
    return out


def _index(out: Path) -> dict[str, Any]:
    index = loads_bounded((out / INDEX).read_bytes(), str(out / INDEX))
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list) or not all(
            isinstance(sh, dict) and isinstance(sh.get("file"), str) for sh in index["shards"]):
        raise O2MError(f"{out / INDEX}: not an o2m latent-cache index; rebuild with --force")
    return index


def verify_cache(out: Path) -> list[dict[str, Any]]:
    """The index's shard list, every shard present with its recorded sha256."""
    index = _index(out)
    for sh in index["shards"]:
        path = contained(out, sh["file"])
        if not path.is_file() or sha256_file(path) != sh["sha256"]:
            raise O2MError(f"{path}: missing or changed since the cache was built; rebuild with --force")
    return index["shards"]


def load_cache(out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, C, h, w), text embeddings (N, L, D)) of a verified cache, in the folder's order."""
    from safetensors.torch import load_file

    lat, txt = [], []
    for sh in verify_cache(out):
        t = load_file(str(contained(out, sh["file"])))
        lat.append(t["latents"])
        txt.append(t["text"])
    return torch.cat(lat), torch.cat(txt)
