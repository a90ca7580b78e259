"""`make demo`: prune -> O2MKD K=4 -> sample teacher and students -> score, with the grids side by side."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from o2mcli.errors import O2MError
from o2mcli.viz import side_by_side

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_side_by_side_puts_panels_left_to_right_under_captions() -> None:
    a = Image.new("L", (40, 30), 255)
    b = Image.new("L", (50, 20), 0)
    out = side_by_side([("teacher", a), ("students", b)], pad=10, caption_h=20)
    assert out.size == (40 + 50 + 3 * 10, 30 + 20 + 2 * 10)
    px = np.asarray(out.convert("L"))
    assert px[30:50, 60:110].max() == 0 and px[30:60, 10:50].min() == 255  # black panel right of the white one
    assert px[0:20, 10:50].min() < 128  # the caption is drawn
    with pytest.raises(O2MError):
        side_by_side([])


def test_demo_recipe_distils_and_ends_with_the_table(tmp_path: Path) -> None:
    o2m = Path(sys.executable).parent / "o2m"
    env = {**os.environ, "O2M": str(o2m) if o2m.exists() else f"{sys.executable} -m o2mcli", "O2M_PROGRESS": "0",
           "O2M_DEMO_DIR": str(tmp_path / "demo"), "O2M_DEMO_STEPS": "3", "O2M_DEMO_N": "16"}
    res = subprocess.run(["bash", str(RECIPES / "demo.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    demo = tmp_path / "demo"
    assert (demo / "students" / "manifest.json").is_file() and len(list((demo / "students").glob("student_*"))) == 4
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    assert any("digits_teacher" in r for r in rows) and any(r.startswith("| students") for r in rows)
    grids = Image.open(demo / "scores" / "grids.png")
    assert grids.width > 2 * grids.height - 200  # two grids side by side
    assert "side by side" in res.stdout
