"""The smoke recipe: the whole chain through the CLI, as a user types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_smoke_recipe_runs_the_whole_chain(tmp_path: Path) -> None:
    o2m = Path(sys.executable).parent / "o2m"
    env = {**os.environ, "O2M": str(o2m) if o2m.exists() else f"{sys.executable} -m o2mcli", "O2M_PROGRESS": "0",
           "OMP_NUM_THREADS": "2"}
    res = subprocess.run(["bash", str(RECIPES / "smoke.sh"), str(tmp_path / "smoke")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "smoke" / "scores" / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["samples-template", "samples-students", "samples-merged",
                                                   "samples-dkdm"]
    assert all(r["fid"] == r["fid"] for r in report["rows"])  # finite numbers, not NaN
    assert (tmp_path / "smoke" / "scores" / "fid_vs_macs.png").is_file()
