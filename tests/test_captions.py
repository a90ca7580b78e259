"""Captioned image folders (metadata.jsonl with file_name and text): the list, and its refusals (issue #13)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from o2mcli.data.captions import read_captions
from o2mcli.errors import O2MError


def _folder(tmp_path: Path, rows: list) -> Path:
    d = tmp_path / "caps"
    (d / "sub").mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "sub/b.jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / name)
    (d / "metadata.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return d


def test_reads_pairs_in_order(tmp_path: Path) -> None:
    d = _folder(tmp_path, [{"file_name": "sub/b.jpg", "text": "a blue dog"}, "",
                           {"file_name": "a.png", "text": "a red cat", "extra": 1}])
    got = read_captions(d)
    assert [(c.path.name, c.text) for c in got] == [("b.jpg", "a blue dog"), ("a.png", "a red cat")]


@pytest.mark.parametrize("rows, words", [
    ([{"file_name": "a.png", "text": "x"}, "{not json"], ["metadata.jsonl:2: not JSON"]),
    ([{"file_name": "a.png"}], ["metadata.jsonl:1: expected an object with string file_name and text"]),
    ([{"file_name": "../a.png", "text": "x"}], ["metadata.jsonl:1: '../a.png' is outside the folder"]),
    ([{"file_name": "/etc/passwd.png", "text": "x"}], ["metadata.jsonl:1: '/etc/passwd.png' is outside the folder"]),
    ([{"file_name": "gone.png", "text": "x"}], ["metadata.jsonl:1: gone.png does not exist"]),
    ([{"file_name": "metadata.jsonl", "text": "x"}], ["metadata.jsonl:1: metadata.jsonl is not an image"]),
    ([""], ["lists no images"]),
])
def test_refusals_name_the_file_and_line(tmp_path: Path, rows, words) -> None:
    with pytest.raises(O2MError) as e:
        read_captions(_folder(tmp_path, rows))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_folder_without_metadata_is_refused(tmp_path: Path) -> None:
    with pytest.raises(O2MError, match="no metadata.jsonl"):
        read_captions(tmp_path)
