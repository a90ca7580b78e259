"""Latents and text embeddings of a captioned folder, computed once and cached as safetensors shards (issue #13).

A training step of a latent model never runs the VAE encoder or the text encoder: the cache holds, per image,
the scaled mean of the VAE posterior for the image (resized on its short side and centre-cropped to
``resolution``; the mean, not a draw, so the cache is deterministic) and the text embedding of its caption. Its
index (``o2m_latent_cache.json``) records what the cache was built from (the images' and captions' digest, the
VAE's, text encoder's and tokenizer's sha256, the resolution, the shapes) and each shard's size and sha256.

Runs share a cache under its lock (``outputs.wait_for_lock``): the first run builds it, a second one waits and then
reuses it, and whatever a killed build left beside it is cleaned by the next run that takes the lock. A cache is
verified whole before use (index, every shard's sha256, tensor names, dtypes, shapes and counts against what the
run needs). One made from other inputs, or incomplete or changed, is rebuilt when it is o2m's own (its index and
shards and nothing else); anything else at its path is refused, never replaced. The cache directory appears
whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from o2mcli.data.captions import Captioned
from o2mcli.data.folder import MAX_PIXELS, read_image
from o2mcli.errors import O2MError
from o2mcli.fsutil import check_output_free, contained, loads_bounded, save_safetensors, sha256_file
from o2mcli.outputs import atomic_dir, ensure_space, notice, wait_for_lock

INDEX = "o2m_latent_cache.json"  # also marks the folder as o2m's (fsutil.O2M_DIR_MARKERS)
FORMAT = "o2m-latent-cache/1"
KEYS = ("latents", "text")
SHARD = re.compile(r"^shard-\d{5}\.safetensors$")
MAX_INDEX_BYTES = 16 << 20
MAX_HEADER_BYTES = 1 << 20  # a shard's header names two tensors: a few hundred bytes
# What a differing index key means, for the note that says why a cache is rebuilt.
_WHAT = {"format": "format", "source": "images or captions", "n": "number of images", "resolution": "resolution",
         "vae": "VAE", "text_encoder": "text encoder", "tokenizer": "tokenizer", "latent": "latent kind",
         "latent_shape": "latent shape", "text_shape": "text-embedding shape"}


def load_rgb(path: Path, resolution: int) -> torch.Tensor:
    """One image as (3, resolution, resolution) in [0, 1]: RGB, short side resized, centre-cropped (read through
    ``folder.read_image``, o2m's one guarded image reader)."""
    from PIL import Image

    im = read_image(path, rgb=True)
    w, h = im.size
    s = resolution / min(w, h)
    size = (max(resolution, round(w * s)), max(resolution, round(h * s)))
    if size[0] * size[1] > MAX_PIXELS:  # a thin strip is a bomb too once its short side is scaled up
        raise O2MError(f"{path}: a {w}x{h} image would be resized to {size[0]}x{size[1]} before its centre crop, "
                       f"more than the {MAX_PIXELS:,} pixels o2m decodes; crop it nearer to square")
    im = im.resize(size, Image.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    arr = np.asarray(im.crop((left, top, left + resolution, top + resolution)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def crop_geometry(path: Path, resolution: int) -> tuple[int, int, int, int]:
    """(height, width, crop top, crop left) of :func:`load_rgb`'s centre crop of ``path``: the image's own size and
    where the crop starts in the resized image (SDXL's original-size and crop time ids). Reads the header only."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError) as e:
        raise O2MError(f"{path}: unreadable image ({e})") from e
    s = resolution / min(w, h)
    size = (max(resolution, round(w * s)), max(resolution, round(h * s)))
    return h, w, (size[1] - resolution) // 2, (size[0] - resolution) // 2


def source_digest(items: list[Captioned]) -> str:
    """sha256 over every image file's bytes and every caption, in order."""
    h = hashlib.sha256()
    for it in items:
        try:
            h.update(sha256_file(it.path).encode())
        except OSError as e:
            raise O2MError(f"{it.path}: unreadable ({e.strerror or e})") from e
        h.update(it.text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


# 1. A verified cache --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """One verified shard file: its rows ``[start, start + n)`` of the cache, where each tensor's bytes begin, and
    the identity of the file that was verified (a later read refuses a file that is no longer that one)."""

    path: Path
    start: int
    n: int
    offsets: dict[str, int]  # byte offset of each tensor's data in the file
    ident: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


@dataclass(frozen=True)
class LatentCache:
    """A cache whose index and shards were verified whole: ``n`` rows of latents and text embeddings."""

    root: Path
    n: int
    latent_shape: tuple[int, ...]  # (C, h, w)
    text_shape: tuple[int, ...]  # (L, D) text tokens, or (R,) a codec's packed rows (SDXL: tokens, pooled text)
    shards: tuple[Shard, ...]
    index_sha256: str

    @property
    def text_bytes(self) -> int:
        """What every caption's embedding takes in memory (float32)."""
        return self.n * math.prod(self.text_shape) * 4

    def latents(self) -> torch.Tensor:
        """Every latent (n, C, h, w), float32; refused if one is not finite."""
        out = torch.empty((self.n, *self.latent_shape), dtype=torch.float32)
        for sh in self.shards:
            out[sh.start:sh.start + sh.n] = self._read(sh, "latents", 0, sh.n)
        return out

    def text(self, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """The text embeddings of rows ``[lo, hi)`` (hi - lo, L, D), read from the shards that hold them."""
        hi = self.n if hi is None else hi
        if not 0 <= lo <= hi <= self.n:
            raise IndexError(f"rows [{lo}, {hi}) of a cache of {self.n}")
        out = torch.empty((hi - lo, *self.text_shape), dtype=torch.float32)
        for sh in self.shards:
            a, b = max(lo, sh.start), min(hi, sh.start + sh.n)
            if a < b:
                out[a - lo:b - lo] = self._read(sh, "text", a - sh.start, b - sh.start)
        return out

    def _read(self, sh: Shard, key: str, lo: int, hi: int) -> torch.Tensor:
        """Rows ``[lo, hi)`` of one shard's tensor, from the very file that was verified."""
        row = self.latent_shape if key == "latents" else self.text_shape
        row_bytes = math.prod(row) * 4
        buf = bytearray((hi - lo) * row_bytes)
        try:
            with open(sh.path, "rb") as f:
                st = os.fstat(f.fileno())
                if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != sh.ident:
                    raise O2MError(f"{sh.path}: replaced or changed since this run verified the latent cache (another "
                                   "run rebuilt it for other inputs?); run again")
                f.seek(sh.offsets[key] + lo * row_bytes)
                got = f.readinto(buf)
        except OSError as e:
            raise O2MError(f"{sh.path}: unreadable ({e.strerror or e})") from e
        if got != len(buf):
            raise O2MError(f"{sh.path}: cut short while it was read")
        t = torch.frombuffer(buf, dtype=torch.float32).reshape(hi - lo, *row) if buf else torch.empty((0, *row))
        if not bool(torch.isfinite(t).all()):
            raise O2MError(f"{sh.path}: {key} holds non-finite values; the latent cache {self.root} is not one o2m "
                           "wrote: delete it to rebuild it")
        return t


def _positive_ints(v: Any, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(type(x) is int and x > 0 for x in v)


def _read_index(out: Path) -> tuple[dict[str, Any], str]:
    """The index (checked to be o2m's format) and its sha256."""
    path = out / INDEX
    try:
        if not path.is_file():
            raise O2MError(f"{out}: no {INDEX} (not an o2m latent cache)")
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise O2MError(f"{path}: {path.stat().st_size:,} bytes, not an o2m latent-cache index")
        raw = path.read_bytes()
    except OSError as e:
        raise O2MError(f"{path}: unreadable ({e.strerror or e})") from e
    index = loads_bounded(raw, str(path), max_bytes=MAX_INDEX_BYTES)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise O2MError(f"{path}: not an o2m latent-cache index ({FORMAT})")
    return index, hashlib.sha256(raw).hexdigest()


def _check_index(path: Path, index: dict[str, Any]) -> None:
    """Every key a cache needs, with values of the right type and sizes that add up."""
    n = index.get("n")
    if type(n) is not int or n < 1:
        raise O2MError(f"{path}: n is {n!r}, not a positive count")
    text = index.get("text_shape")
    text_ok = any(_positive_ints(text, k) for k in (1, 2))  # (L, D) tokens, or a codec's packed rows (R,)
    if not _positive_ints(index.get("latent_shape"), 3) or not text_ok:
        raise O2MError(f"{path}: latent_shape {index.get('latent_shape')!r} / text_shape {index.get('text_shape')!r} "
                       "are not (C, h, w) / (L, D) or (R,)")
    shards = index.get("shards")
    if not isinstance(shards, list) or not 1 <= len(shards) <= n:
        raise O2MError(f"{path}: shards is not a list of 1 to {n} shards")
    seen = set()
    for i, sh in enumerate(shards):
        ok = isinstance(sh, dict) and isinstance(sh.get("file"), str) and SHARD.match(sh["file"]) \
            and type(sh.get("n")) is int and sh["n"] > 0 and isinstance(sh.get("sha256"), str) \
            and re.fullmatch(r"[0-9a-f]{64}", sh["sha256"]) is not None
        if not ok:
            raise O2MError(f"{path}: shard {i} is not {{file: shard-NNNNN.safetensors, n: count, sha256: hex}}")
        if sh["file"] in seen:
            raise O2MError(f"{path}: shard {sh['file']} is listed twice")
        seen.add(sh["file"])
    total = sum(sh["n"] for sh in shards)
    if total != n:
        raise O2MError(f"{path}: its shards hold {total} rows, but n is {n}")


def _verify_shard(out: Path, rec: dict[str, Any], start: int, latent_shape: tuple[int, ...],
                  text_shape: tuple[int, ...]) -> Shard:
    """A shard whose bytes have the recorded sha256 and whose header holds exactly float32 ``latents``
    (n, C, h, w) and ``text`` (n, L, D) filling the file."""
    path = contained(out, rec["file"])
    changed = f"{path}: missing or changed since the cache was built"
    try:
        if not path.is_file():  # (also keeps a FIFO from blocking the open below)
            raise O2MError(changed)
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise O2MError(changed)
            h = hashlib.sha256()
            while block := f.read(1 << 20):
                h.update(block)
            if h.hexdigest() != rec["sha256"]:
                raise O2MError(changed)
            f.seek(0)
            head = f.read(8)
            hlen = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= hlen <= min(MAX_HEADER_BYTES, st.st_size - 8):
                raise O2MError(f"{path}: not a safetensors file (header length {hlen})")
            header = loads_bounded(f.read(hlen), str(path), max_bytes=MAX_HEADER_BYTES)
    except OSError as e:
        raise O2MError(f"{path}: unreadable ({e.strerror or e})") from e
    if not isinstance(header, dict) or set(header) - {"__metadata__"} != set(KEYS):
        names = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise O2MError(f"{path}: holds {names}, not exactly the tensors latents and text")
    n, data = rec["n"], 8 + hlen
    spans, offsets = [], {}
    for key, row in (("latents", latent_shape), ("text", text_shape)):
        t, want = header[key], [n, *row]
        if not isinstance(t, dict) or t.get("dtype") != "F32":
            raise O2MError(f"{path}: {key} is {t.get('dtype') if isinstance(t, dict) else t!r}, not float32 (F32)")
        if t.get("shape") != want:
            raise O2MError(f"{path}: {key} has shape {t.get('shape')}, the cache's index says {want}")
        span = t.get("data_offsets")
        if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)
                and 0 <= span[0] and span[1] - span[0] == math.prod(want) * 4):
            raise O2MError(f"{path}: {key}'s data_offsets {span!r} do not hold {want} float32 values")
        spans.append(span)
        offsets[key] = data + span[0]
    spans.sort()
    if spans[0][0] != 0 or spans[0][1] != spans[1][0] or data + spans[1][1] != st.st_size:
        raise O2MError(f"{path}: its tensors do not fill the file ({st.st_size:,} bytes); corrupt")
    return Shard(path, start, n, offsets, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


def open_cache(out: Path, want: Optional[dict[str, Any]] = None) -> LatentCache:
    """The cache at ``out``, verified whole: its index is o2m's, records ``want`` (when given: what the run needs),
    and every shard has its recorded sha256, exactly the tensors and shapes the index says, and the counts add up.
    Any failure is an ``O2MError`` naming the file and the problem."""
    out = Path(out)
    index, index_sha = _read_index(out)
    if want is not None:
        differ = [k for k in want if index.get(k) != want[k]]
        if differ:
            what = ", ".join(_WHAT.get(k, k) for k in differ)
            raise O2MError(f"{out}: made from other inputs than this run's ({what})")
    _check_index(out / INDEX, index)
    latent_shape, text_shape = tuple(index["latent_shape"]), tuple(index["text_shape"])
    shards, start = [], 0
    for rec in index["shards"]:
        shards.append(_verify_shard(out, rec, start, latent_shape, text_shape))
        start += rec["n"]
    return LatentCache(out, index["n"], latent_shape, text_shape, tuple(shards), index_sha)


def load_cache(out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, C, h, w), text embeddings (N, L, D)) of a verified cache, in the folder's order."""
    cache = open_cache(out)
    return cache.latents(), cache.text()


# 2. Building, and sharing ---------------------------------------------------------------------------------------

def _not_replaceable(out: Path) -> Optional[str]:
    """Why what is at ``out`` is not o2m's cache to replace (None when it is: an empty directory, or one holding
    only a cache index and shards)."""
    if out.is_symlink():
        return "it is a symbolic link"
    if not out.is_dir():
        return "it is a file"
    try:
        entries = list(out.iterdir())
    except OSError as e:
        return f"it cannot be listed ({e.strerror or e})"
    if not entries:
        return None
    if not (out / INDEX).is_file() or (out / INDEX).is_symlink():
        return f"it has no {INDEX}"
    for p in entries:
        if p.name != INDEX and not (SHARD.match(p.name) and p.is_file() and not p.is_symlink()):
            return f"it holds {p.name}, which an o2m latent cache never holds"
    return None


def check_apart(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse a cache that is, contains or lies inside what the run reads or writes, before even its lock file is
    made there."""
    o = out.resolve()
    for inp in inputs:
        i = Path(inp).resolve()
        how = "is" if o == i else "contains" if o in i.parents else "lies inside" if i in o.parents else None
        if how:
            raise O2MError(f"{out}: the latent cache {how} {inp}, which this run reads or writes; choose another "
                           "--latent-cache")


def _checked_batch(out: Path, first: Path, what: str, t: torch.Tensor, n: int, row: Optional[list[int]],
                   ndim: int) -> None:
    """An encoder's output for a batch of ``n``: (n, *row) (the shape the run needs), all finite."""
    if t.ndim != ndim or t.shape[0] != n or (row is not None and list(t.shape[1:]) != row):
        raise O2MError(f"{out}: the {what} gave {tuple(t.shape)} for {n} images from {first}, not "
                       f"({n}, {', '.join(map(str, row)) if row else '...'})")
    if not bool(torch.isfinite(t).all()):
        raise O2MError(f"{first}: the {what} gave non-finite values for its batch; nothing was cached")


def _build(out: Path, items: list[Captioned], encode_images: Callable[[torch.Tensor], torch.Tensor],
           encode_texts: Callable[[list[str]], torch.Tensor], want: dict[str, Any], resolution: int,
           batch_size: int, shard_size: int, force: bool, inputs: Iterable[Path]) -> None:
    """Encode every item and put the cache at ``out`` in one step (a full disk leaves nothing)."""
    check_output_free(out, force, inputs)  # before the encoding work (atomic_dir checks again when done)
    lat_row, txt_row = want.get("latent_shape"), want.get("text_shape")
    if lat_row and txt_row:
        ensure_space(out, len(items) * (math.prod(lat_row) + math.prod(txt_row)) * 4)
    shards = []
    with atomic_dir(out, force=force) as tmp:
        for s, lo in enumerate(range(0, len(items), shard_size)):
            part = items[lo:lo + shard_size]
            lat, txt = [], []
            for b in range(0, len(part), batch_size):
                batch = part[b:b + batch_size]
                x = encode_images(torch.stack([load_rgb(it.path, resolution) for it in batch])).float().cpu()
                _checked_batch(out, batch[0].path, "VAE", x, len(batch), lat_row, 4)
                e = encode_texts([it.text for it in batch]).float().cpu()
                # (N, L, D) text tokens, or a codec's packed rows (N, R): the run's own row when it names one
                _checked_batch(out, batch[0].path, "text encoder", e, len(batch), txt_row,
                               1 + len(txt_row) if txt_row else e.ndim)
                lat_row, txt_row = list(x.shape[1:]), list(e.shape[1:])
                lat.append(x)
                txt.append(e)
            name = f"shard-{s:05d}.safetensors"
            save_safetensors({"latents": torch.cat(lat).contiguous(), "text": torch.cat(txt).contiguous()},
                             tmp / name)
            shards.append({"file": name, "n": len(part), "sha256": sha256_file(tmp / name)})
        index = {**want, "latent_shape": lat_row, "text_shape": txt_row, "shards": shards}
        (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def cached(out: Path, items: list[Captioned], encode_images: Callable[[torch.Tensor], torch.Tensor],
           encode_texts: Callable[[list[str]], torch.Tensor], record: dict[str, Any], resolution: int,
           shapes: Optional[tuple[tuple[int, ...], tuple[int, ...]]] = None, inputs: Iterable[Path] = (),
           text_budget: Optional[int] = None, batch_size: int = 16, shard_size: int = 1024, force: bool = False
           ) -> tuple[LatentCache, torch.Tensor, Optional[torch.Tensor]]:
    """The verified cache for ``items`` at ``out``, its latents and (when they take at most ``text_budget`` bytes;
    None: always) its text embeddings: reused when complete and made from the same inputs, else built, under
    ``out``'s lock (a run building it makes this one wait, then reuse it).

    ``encode_images`` maps images in [0, 1] to scaled latents; ``encode_texts`` maps captions to embeddings;
    ``record`` names what they are (the parts' hashes), and ``shapes`` ((C, h, w), (L, D)) what the run needs, so
    another encoder or shape rebuilds the cache. A stale or broken cache is rebuilt (with a note) when it is o2m's
    (only an index and shards), refused otherwise; ``inputs`` are paths the cache must not touch.
    """
    out = Path(out)
    inputs = [Path(p) for p in inputs]
    check_apart(out, inputs)
    want = {"format": FORMAT, "source": source_digest(items), "n": len(items), "resolution": resolution, **record}
    if shapes is not None:
        want.update(latent_shape=[int(v) for v in shapes[0]], text_shape=[int(v) for v in shapes[1]])

    def load() -> tuple[LatentCache, torch.Tensor, Optional[torch.Tensor]]:
        cache = open_cache(out, want)
        whole = text_budget is None or cache.text_bytes <= text_budget
        return cache, cache.latents(), cache.text() if whole else None

    def waiting(holder: str) -> None:
        notice(f"waiting for the latent cache {out}: another o2m run is building it ({holder}); this run reuses it "
               "when it is done")

    try:
        lock = wait_for_lock(out, waiting)
    except O2MError:
        if not (out / INDEX).is_file():
            raise
        # A cache where this process cannot write (a shared, read-only copy): used as it is, never rebuilt.
        try:
            return load()
        except O2MError as e:
            raise O2MError(f"{e}; and o2m cannot write beside {out} to rebuild it: choose another "
                           "--latent-cache") from e
    try:
        if out.exists() or out.is_symlink():
            try:
                return load()  # verified and read under the lock, so no run replaces it meanwhile
            except O2MError as e:
                why_not = _not_replaceable(out)
                if why_not:
                    raise O2MError(f"{e}; o2m will not replace {out} ({why_not}): move it away or choose another "
                                   "--latent-cache") from e
                if (out / INDEX).exists():
                    notice(f"{e}; rebuilding the latent cache")
                force = True
        _build(out, items, encode_images, encode_texts, want, resolution, batch_size, shard_size, force, inputs)
        return load()
    finally:
        lock.release()


def build_cache(out: Path, items: list[Captioned], encode_images: Callable[[torch.Tensor], torch.Tensor],
                encode_texts: Callable[[list[str]], torch.Tensor], record: dict[str, Any], resolution: int,
                batch_size: int = 16, shard_size: int = 1024, force: bool = False) -> Path:
    """Write the cache for ``items`` at ``out`` (or reuse it when it is complete and records the same ``record``):
    :func:`cached` without the shapes a run needs."""
    cached(out, items, encode_images, encode_texts, record, resolution, text_budget=0, batch_size=batch_size,
           shard_size=shard_size, force=force)
    return out
