"""Text conditioning in a distillation run (issue #13): prompts or captions turned into the embedding table a
``TextPlan`` indexes, and a captioned folder turned into cached latents.

A training step never runs the VAE encoder, and runs the text encoder only where the prompts' embeddings exceed the
text-memory budget: O2MKD trains on the latent cache (``data/latent_cache.py``) with each image's caption
embedding; DKDM gives every buffer slot a prompt of ``--prompts``. Either condition is replaced by the empty
prompt's embedding with the caption dropout (the teacher's recorded one, else SD's 0.1), so the students learn the
unconditional branch that classifier-free guidance needs. An embedding table that fits the budget
(``O2M_TEXT_MEMORY``, 1 GiB by default) is computed once and held; a larger one is a :class:`ChunkedTable`, whose
rows are made (prompts) or read (captions, from the cache) in fixed chunks when used, with the same values.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from o2mcli.data.base import ImageSet
from o2mcli.data.labels import TextPlan, text_plan_over
from o2mcli.errors import O2MError
from o2mcli.fsutil import human_bytes
from o2mcli.models.codec import Codec
from o2mcli.outputs import notice

DEFAULT_CAPTION_DROPOUT = 0.1  # Stable Diffusion 1.x's training drops 10% of the captions


@dataclass(frozen=True)
class LatentSet(ImageSet):
    """Cached latents (N, C, h, w), already in the model's range, with caption ``i`` labelling latent ``i``."""

    def to_model_range(self) -> torch.Tensor:
        """Scaled VAE latents are what the UNet denoises: no change."""
        return self.images


def caption_dropout(conditioning: dict[str, Any], override: Optional[float]) -> float:
    """``--label-dropout`` if given, else the teacher's recorded caption dropout, else SD's 0.1."""
    if override is not None:
        return float(override)
    found = conditioning.get("caption_dropout")
    return DEFAULT_CAPTION_DROPOUT if found is None else float(found)


# Text embeddings in bounded memory --------------------------------------------------------------------------------

DEFAULT_TEXT_MEMORY = 1 << 30  # CLIP-L's 77 x 768 floats: about 4,500 prompts' embeddings held whole
CHUNK_ROWS = 64  # encode_prompts' batch: a chunk is embedded exactly as the whole list would be, batch by batch
BUDGET_ENV = "O2M_TEXT_MEMORY"


def text_memory_budget() -> int:
    """The bytes of text embeddings a run holds in memory: ``O2M_TEXT_MEMORY`` (bytes, or 512M, 4G...), else 1 GiB."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_TEXT_MEMORY
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", raw, re.IGNORECASE)
    if m is None:
        raise O2MError(f"{BUDGET_ENV}={raw!r}: not a byte count (e.g. 512M, 4G)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


@contextlib.contextmanager
def _plain_precision() -> Iterator[None]:
    """No autocast and no autograd: a chunk made inside a bf16 training step is the chunk made anywhere else."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


class ChunkedTable:
    """``table[idx] -> (*idx.shape, L, D)`` over ``n`` rows of embeddings that are never all in memory: rows are
    made ``chunk`` at a time by ``make(lo, hi)`` when first asked for, and at most ``budget`` bytes of chunks are
    kept (the least recently used dropped). A chunk is always made whole, as one fixed batch, so a row's values do
    not depend on the order rows are asked in: a run is deterministic and a resumed run bit-exact, whatever the
    budget. Indexing a ``torch.Tensor`` table the same way gives the same rows."""

    def __init__(self, n: int, row_shape: tuple[int, ...], make: Callable[[int, int], torch.Tensor], budget: int,
                 chunk: int = CHUNK_ROWS, what: str = "text embeddings") -> None:
        self.n, self.row_shape, self.chunk, self.what = int(n), tuple(row_shape), int(chunk), what
        self.row_bytes = math.prod(self.row_shape) * 4
        self.max_rows = max(0, int(budget) // self.row_bytes)
        if self.max_rows < min(self.chunk, self.n):
            raise O2MError(f"{what}: one chunk of {min(self.chunk, self.n)} text embeddings needs "
                           f"{human_bytes(min(self.chunk, self.n) * self.row_bytes)}, more than the "
                           f"{human_bytes(budget)} text-memory budget ({BUDGET_ENV}); raise it")
        self._make = make
        self._held: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.held_rows = self.peak_rows = self.made = 0  # rows in memory now and at most; chunks made

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, *self.row_shape))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def numel(self) -> int:
        """The most elements it holds at once (what it costs in memory), not the whole table's."""
        return min(self.n, self.max_rows) * math.prod(self.row_shape)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        idx = torch.as_tensor(idx)
        if idx.dtype in (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise IndexError(f"{self.what}: rows are indexed by integers, not {idx.dtype}")
        flat = idx.reshape(-1).to("cpu", torch.int64)
        if flat.numel() and (int(flat.min()) < -self.n or int(flat.max()) >= self.n):
            raise IndexError(f"{self.what}: index out of range for {self.n} rows")
        flat = torch.where(flat < 0, flat + self.n, flat)
        out = torch.empty((flat.numel(), *self.row_shape), dtype=torch.float32)
        which = torch.div(flat, self.chunk, rounding_mode="floor")
        for c in torch.unique(which).tolist():
            rows = self._chunk(c)
            sel = which == c
            out[sel] = rows[flat[sel] - c * self.chunk]
        return out.reshape(*idx.shape, *self.row_shape)

    def _chunk(self, c: int) -> torch.Tensor:
        if c in self._held:
            self._held.move_to_end(c)
            return self._held[c]
        lo, hi = c * self.chunk, min(self.n, (c + 1) * self.chunk)
        with _plain_precision():
            rows = self._make(lo, hi).detach().to("cpu", torch.float32).contiguous()
        if tuple(rows.shape) != (hi - lo, *self.row_shape):
            raise O2MError(f"{self.what}: rows {lo}..{hi - 1} came out {tuple(rows.shape)}, not "
                           f"({hi - lo}, {', '.join(map(str, self.row_shape))})")
        while self._held and self.held_rows + (hi - lo) > self.max_rows:
            self.held_rows -= len(self._held.popitem(last=False)[1])
        self._held[c] = rows
        self.held_rows += hi - lo
        self.peak_rows = max(self.peak_rows, self.held_rows)
        self.made += 1
        return rows


def embedding_table(n: int, row_shape: tuple[int, ...], make: Callable[[int, int], torch.Tensor], what: str,
                    budget: Optional[int] = None) -> torch.Tensor | ChunkedTable:
    """``n`` rows made ``CHUNK_ROWS`` at a time by ``make(lo, hi)``: one tensor, filled chunk by chunk, when it fits
    ``budget`` (default: :func:`text_memory_budget`), else a :class:`ChunkedTable` over the same chunks (with a
    note), so both give the same values."""
    budget = text_memory_budget() if budget is None else int(budget)
    row_bytes = math.prod(row_shape) * 4
    if n * row_bytes > budget:
        table = ChunkedTable(n, row_shape, make, budget, what=what)
        notice(f"{what}: {n:,} rows of text embeddings need {human_bytes(n * row_bytes)}, more than the "
               f"{human_bytes(budget)} text-memory budget ({BUDGET_ENV}); they are made {CHUNK_ROWS} at a time when "
               f"used, at most {human_bytes(table.max_rows * row_bytes)} held (slower; the same numbers)")
        return table
    out = torch.empty((n, *row_shape), dtype=torch.float32)
    for lo in range(0, n, CHUNK_ROWS):
        hi = min(n, lo + CHUNK_ROWS)
        with _plain_precision():
            rows = make(lo, hi)
        if tuple(rows.shape) != (hi - lo, *row_shape):
            raise O2MError(f"{what}: rows {lo}..{hi - 1} came out {tuple(rows.shape)}, not "
                           f"({hi - lo}, {', '.join(map(str, row_shape))})")
        out[lo:hi] = rows
    return out


def prompt_table(codec: Codec, prompts: list[str], what: str, budget: Optional[int] = None
                 ) -> torch.Tensor | ChunkedTable:
    """The codec's embeddings of ``prompts`` (n, ...): whole, or made on demand in bounded memory."""
    prompts = list(prompts)
    with _plain_precision():
        row_shape = tuple(codec.encode_prompts(prompts[:1]).shape[1:])
    return embedding_table(len(prompts), row_shape, lambda lo, hi: codec.encode_prompts(prompts[lo:hi]), what,
                           budget)


def prompts_flag(prompts: list[str], flag: str = "--prompts") -> str:
    """How messages name the prompts: ``--prompts FILE`` for a file's, else ``--prompt``."""
    path = getattr(prompts, "path", None)
    return f"{flag} {path}" if path is not None else "--prompt"


def prompt_plan(codec: Codec, prompts: list[str], dropout: float, conditioning: dict[str, Any],
                device: torch.device | str = "cpu", budget: Optional[int] = None) -> TextPlan:
    """A plan over ``prompts``: their embeddings and the empty prompt's (last), from the codec's text encoder(s),
    held whole when they fit the text-memory budget, else made in chunks as the run uses them (the text encoder
    then stays on ``device``)."""
    rows = list(prompts) + [""]
    codec.prompts_to(device)
    table = prompt_table(codec, rows, prompts_flag(prompts), budget)
    if not isinstance(table, ChunkedTable):
        codec.prompts_to("cpu")
    return text_plan_over(list(prompts), table, dropout, conditioning, codec.unpack)


def default_cache_dir(data: Path, out: Path, resolution: int) -> Path:
    """Beside the run: ``<out's folder>/<data folder>.latents-<resolution>`` (runs in one folder share it)."""
    return Path(out).resolve().parent / f"{Path(data).resolve().name}.latents-{resolution}"


def captioned_latents(data: Path, codec: Codec, latent_size: int, dropout: float, conditioning: dict[str, Any],
                      cache: Optional[Path], out: Path, device: torch.device | str = "cpu",
                      budget: Optional[int] = None) -> tuple[LatentSet, TextPlan]:
    """The folder's latents (from the cache, built first if missing or made from other inputs; shared with runs
    that use the same cache) and the plan over its captions; each image is resized and centre-cropped to
    ``latent_size`` times the VAE's factor. The captions' embeddings are held whole when they fit the text-memory
    ``budget``, else read from the cache in chunks as the run uses them."""
    from o2mcli.data.captions import read_captions
    from o2mcli.data.latent_cache import cached, check_apart, crop_geometry
    data = Path(data)
    if not data.is_dir():
        raise O2MError(f"--data {data}: not a folder; a Stable Diffusion teacher distils on a folder of images with "
                       "captions (metadata.jsonl: file_name and text)")
    items = read_captions(data)
    resolution = latent_size * codec.factor
    cache = Path(cache) if cache is not None else default_cache_dir(data, out, resolution)
    record = codec.cache_record()
    budget = text_memory_budget() if budget is None else int(budget)
    codec.to(device)
    with torch.no_grad():
        null = codec.encode_prompts([""]).float().cpu()
    # What this run needs of the cache: the UNet's latent size with the VAE's channels, the text encoder's (L, D).
    shapes = (codec.latent_shape(latent_size), tuple(null.shape[1:]))
    inputs = [data, Path(codec.root), Path(out)]
    check_apart(cache, inputs)  # before this run announces it
    print(f"latent cache {cache}: {len(items)} captioned images at {resolution}px (built once, then reused)",
          file=sys.stderr)
    store, latents, text = cached(cache, items, lambda x: codec.encode_images(x.to(device)),
                                  codec.encode_prompts, record, resolution, shapes, inputs,
                                  text_budget=max(0, budget - null.numel() * 4))
    codec.to("cpu")
    captions = [it.text for it in items]
    n = len(items)
    if text is not None:
        table: Any = torch.cat([text, null]).contiguous()
    else:
        def rows(lo: int, hi: int) -> torch.Tensor:
            # captions from the cache's shards, the null condition (row n) after them
            got = store.text(min(lo, n), min(hi, n))
            return torch.cat([got, null]) if hi > n else got

        table = embedding_table(n + 1, tuple(null.shape[1:]), rows, f"--data {data}", budget)
    latent_set = LatentSet(images=latents, name=data.name, source=str(data.resolve()), sha256=store.index_sha256,
                           labels=torch.arange(n), classes=tuple(captions))
    # Added ids from each image's own size and crop (SDXL); the empty caption's row (dropout) takes the target size's
    geometry = torch.tensor([crop_geometry(it.path, resolution) for it in items] + [(resolution, resolution, 0, 0)])
    ids = codec.time_ids(geometry, resolution)
    return latent_set, text_plan_over(captions, table, dropout, conditioning, codec.unpack, ids)
