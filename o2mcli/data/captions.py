"""Captioned images in the ecosystem's convention (issue #13): a folder with ``metadata.jsonl``, one JSON object per
line naming an image (``file_name``, relative to the folder) and its caption (``text``).

Only the list is read here; images are decoded later, batch by batch, when their latents are cached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from o2mcli.data.folder import IMAGE_SUFFIXES
from o2mcli.errors import O2MError
from o2mcli.fsutil import contained

METADATA = "metadata.jsonl"
MAX_LINES = 10_000_000
MAX_LINE_BYTES = 1 << 16  # a caption of tens of thousands of characters is a crafted file, not a caption


@dataclass(frozen=True)
class Captioned:
    """One image file (inside the folder) and its caption."""

    path: Path
    text: str


def read_captions(folder: Path) -> list[Captioned]:
    """Every (image, caption) pair ``folder/metadata.jsonl`` lists, in its order; refused with one line naming the
    file and line for a bad line, a missing key, a path outside the folder, a missing or non-image file."""
    folder = Path(folder)
    meta = folder / METADATA
    if not meta.is_file():
        raise O2MError(f"{folder}: no {METADATA} (one JSON object per line: file_name and text)")
    out: list[Captioned] = []
    with meta.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if n > MAX_LINES:
                raise O2MError(f"{meta}: more than {MAX_LINES:,} lines")
            if len(raw) > MAX_LINE_BYTES:
                raise O2MError(f"{meta}:{n}: line of {len(raw):,} bytes (at most {MAX_LINE_BYTES:,})")
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise O2MError(f"{meta}:{n}: not JSON ({e})") from e
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) \
                    or not isinstance(row.get("text"), str):
                raise O2MError(f"{meta}:{n}: expected an object with string file_name and text")
            try:
                path = contained(folder, row["file_name"])
            except O2MError as e:
                raise O2MError(f"{meta}:{n}: {row['file_name']!r} is outside the folder") from e
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise O2MError(f"{meta}:{n}: {row['file_name']} is not an image ({', '.join(IMAGE_SUFFIXES)})")
            if not path.is_file():
                raise O2MError(f"{meta}:{n}: {row['file_name']} does not exist")
            out.append(Captioned(path, row["text"]))
    if not out:
        raise O2MError(f"{meta}: lists no images")
    return out
