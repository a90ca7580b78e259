"""Captioned images in the ecosystem's convention (issue #13): a folder with ``metadata.jsonl``, one JSON object per
line naming an image (``file_name``, relative to the folder) and its caption (``text``).

Only the list is read here; images are decoded later, batch by batch, when their latents are cached. Every line is
a file o2m did not write: its JSON is parsed with bounded size and nesting, and its two values are checked before
they touch a path or an encoder, so a crafted line is a one-line refusal naming the file and line.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from o2mcli.data.folder import IMAGE_SUFFIXES
from o2mcli.errors import O2MError
from o2mcli.fsutil import contained, loads_bounded

METADATA = "metadata.jsonl"
MAX_LINES = 10_000_000
MAX_LINE_BYTES = 1 << 16  # a caption of tens of thousands of characters is a crafted file, not a caption
MAX_DEPTH = 32  # a row is a flat object (extra columns may nest a little); deeper is a crafted line
CAPTION_WHITESPACE = "\t\n\r"  # the only control characters a caption may hold


@dataclass(frozen=True)
class Captioned:
    """One image file (inside the folder) and its caption."""

    path: Path
    text: str


def _string_problem(value: Any, allowed: str = "") -> Optional[str]:
    """Why ``value`` is not a usable string (None when it is): not a string, a control character other than
    ``allowed`` (a NUL in a path, escapes in a caption), or a lone surrogate (not encodable as UTF-8)."""
    if not isinstance(value, str):
        return f"is {type(value).__name__}, not a string"
    for i, ch in enumerate(value):
        cat = unicodedata.category(ch)
        if (cat == "Cc" and ch not in allowed) or cat == "Cs":
            what = "a lone surrogate" if cat == "Cs" else "a control character"
            return f"holds {what} ({ch!r}) at character {i}"
    return None


def _row(meta: Path, n: int, raw: bytes) -> Optional[tuple[str, str]]:
    """(file_name, text) of line ``n``, or None for a blank line; a malformed line is refused."""
    if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark some editors write
    if not raw.strip():
        return None
    where = f"{meta}:{n}"
    try:
        row = loads_bounded(raw, where, max_bytes=MAX_LINE_BYTES, max_depth=MAX_DEPTH)
    except O2MError as e:
        raise O2MError(f"{where}: not JSON ({str(e).removeprefix(where + ': ')})") from e
    if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
        raise O2MError(f"{where}: expected an object with string file_name and text")
    for key, allowed in (("file_name", ""), ("text", CAPTION_WHITESPACE)):
        problem = _string_problem(row[key], allowed)
        if problem:
            raise O2MError(f"{where}: {key} {problem}; expected an object with string file_name and text")
    return row["file_name"], row["text"]


def _image_path(folder: Path, where: str, name: str) -> Path:
    """The file ``name`` names inside ``folder``: refused outside it, not an image, missing or not a file."""
    try:
        path = contained(folder, name)
    except O2MError as e:
        raise O2MError(f"{where}: {name!r} is outside the folder") from e
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long for the file system
        raise O2MError(f"{where}: {name!r} cannot be resolved ({getattr(e, 'strerror', None) or e})") from e
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise O2MError(f"{where}: {name} is not an image ({', '.join(IMAGE_SUFFIXES)})")
    try:
        found = path.is_file()
    except OSError as e:
        raise O2MError(f"{where}: {name!r} cannot be read ({e.strerror or e})") from e
    if not found:
        raise O2MError(f"{where}: {name} does not exist" + (" as a file" if path.exists() else ""))
    return path


def read_captions(folder: Path) -> list[Captioned]:
    """Every (image, caption) pair ``folder/metadata.jsonl`` lists, in its order; refused with one line naming the
    file and line for a bad line (not JSON, nested too deep, a value that is not a clean string), a missing key, a
    path outside the folder, a missing or non-image file."""
    folder = Path(folder)
    meta = folder / METADATA
    if not meta.is_file():
        raise O2MError(f"{folder}: no {METADATA} (one JSON object per line: file_name and text)")
    out: list[Captioned] = []
    try:
        with meta.open("rb") as f:
            n = 0
            # readline with a bound: a file without newlines is never read whole into memory
            while raw := f.readline(MAX_LINE_BYTES + 1):
                n += 1
                if n > MAX_LINES:
                    raise O2MError(f"{meta}: more than {MAX_LINES:,} lines")
                if len(raw) > MAX_LINE_BYTES:
                    raise O2MError(f"{meta}:{n}: line of more than {MAX_LINE_BYTES:,} bytes")
                row = _row(meta, n, raw)
                if row is not None:
                    out.append(Captioned(_image_path(folder, f"{meta}:{n}", row[0]), row[1]))
    except OSError as e:
        raise O2MError(f"{meta}: unreadable ({e.strerror or e})") from e
    if not out:
        raise O2MError(f"{meta}: lists no images")
    return out
