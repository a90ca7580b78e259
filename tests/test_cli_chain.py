"""The CLI as users type it: chaining defaults, entry points, the debug traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from o2mcli.cli import app
from o2mcli.manifest import read_manifest

runner = CliRunner()


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


def test_train_sample_score_chain_with_defaults(in_tmp: Path) -> None:
    _ok(["train", "--channels", "4,8", "--norm-groups", "2", "--steps", "2", "--batch-size", "8", "--device", "cpu"])
    assert read_manifest(in_tmp / "teacher").kind == "teacher"
    _ok(["sample", "--steps", "2", "-n", "70", "--batch-size", "35", "--device", "cpu", "--no-png"])
    samples = read_manifest(in_tmp / "samples")
    assert samples.kind == "samples" and Path(samples.parents[0].path) == (in_tmp / "teacher").resolve()
    out = _ok(["score", "--device", "cpu", "--throughput-batch", "2"])
    report = json.loads((in_tmp / "scores" / "report.json").read_text())
    assert read_manifest(in_tmp / "scores").kind == "scores"
    assert "FID" in out and report["rows"][0]["n_samples"] == 70
    # A newer model wins the default; outputs never clobber earlier ones.
    _ok(["train", "--channels", "4,8", "--norm-groups", "2", "--steps", "2", "--batch-size", "8", "--device", "cpu",
         "-o", "second.safetensors"])
    _ok(["sample", "--steps", "2", "-n", "4", "--device", "cpu", "--no-png"])
    assert Path(read_manifest(in_tmp / "samples-2").parents[0].path) == (in_tmp / "second.safetensors").resolve()


def test_python_dash_m_and_debug_traceback(tmp_path: Path) -> None:
    help_ = subprocess.run([sys.executable, "-m", "o2mcli", "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and all(c in help_.stdout for c in
                                         ("train", "prune", "distill", "merge", "sample", "score", "info"))
    missing = str(tmp_path / "missing.safetensors")
    quiet = subprocess.run([sys.executable, "-m", "o2mcli", "info", missing], capture_output=True, text=True)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().count("\n") == 0 and "missing.safetensors" in quiet.stderr
    loud = subprocess.run([sys.executable, "-m", "o2mcli", "--debug", "info", missing], capture_output=True, text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr
