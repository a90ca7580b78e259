"""Small pieces every stage's run uses: seeding, progress bars, JSONL logs."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator that owns all of a run's sampling."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def progress(iterable: Iterable | None = None, **kw: Any):
    """tqdm on stderr; shown on a terminal or with O2M_PROGRESS=1, silent in logs and tests."""
    from tqdm.auto import tqdm

    show = os.environ.get("O2M_PROGRESS") == "1" or (os.environ.get("O2M_PROGRESS") != "0" and sys.stderr.isatty())
    return tqdm(iterable, disable=not show, dynamic_ncols=True, file=sys.stderr, **kw)


class JsonlLog:
    """Append-only metrics log; each line is flushed so a killed run keeps what it logged."""

    def __init__(self, path: Path, keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        if keep_until_step is not None and self.path.exists():
            # On resume drop lines past the checkpoint, so the log matches an uninterrupted run.
            lines = [ln for ln in self.path.read_text().splitlines()
                     if ln.strip() and json.loads(ln).get("step", 0) <= keep_until_step]
            self.path.write_text("".join(ln + "\n" for ln in lines))
        self.f = open(self.path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps(row, sort_keys=True) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
