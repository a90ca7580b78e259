"""``o2m train``: digits and folders, fixed and learned variance, checkpoints that survive SIGKILL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import kill_after_checkpoint
from o2mcli.cli import app
from o2mcli.manifest import read_manifest
from o2mcli.models import load_model

runner = CliRunner()
TINY = ["--channels", "4,8", "--norm-groups", "2", "--batch-size", "8", "--device", "cpu"]


def _train(*args: str):
    return runner.invoke(app, ["train", *TINY, *args])


@pytest.mark.parametrize("variance", ["fixed", "learned"])
def test_train_digits_writes_teacher_stage(tmp_path: Path, variance: str) -> None:
    out = tmp_path / "teacher"
    res = _train("--steps", "3", "--variance", variance, "-o", str(out))
    assert res.exit_code == 0, res.output
    man = read_manifest(out)
    assert man.kind == "teacher" and man.config["variance"] == variance
    assert {a.path for a in man.artifacts} == {"model.safetensors", "metrics.jsonl", "loss.png"}
    rec = man.models[0]
    assert rec.timestep_range == (0, 1000) and rec.params > 0 and rec.macs > 0
    assert rec.denoiser_config["out_channels"] == (2 if variance == "learned" else 1)
    assert man.scheduler_config["variance_type"] == ("learned_range" if variance == "learned" else "fixed_small")
    assert list(load_model(out).unet.config.block_out_channels) == [4, 8]
    assert not (tmp_path / "teacher.partial").exists()


def test_train_to_single_file_and_refuse_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    assert _train("--steps", "2", "-o", str(out)).exit_code == 0
    before = out.read_bytes()
    res = _train("--steps", "2", "-o", str(out))
    assert res.exit_code == 2 and "already exists" in res.output and out.read_bytes() == before
    assert _train("--steps", "2", "--seed", "1", "-o", str(out), "--force").exit_code == 0
    assert out.read_bytes() != before


def test_train_on_image_folder(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "rgb"
    assert _train("--steps", "2", "--data", str(folder), "-o", str(out)).exit_code == 0
    assert load_model(out).unet.config.in_channels == 3
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "big.png")
    res = _train("--steps", "2", "--data", str(folder), "-o", str(tmp_path / "x"))
    assert res.exit_code == 2 and "big.png" in res.output and "must share size" in res.output
    (folder / "big.png").write_bytes(b"not an image")
    res = _train("--steps", "2", "--data", str(folder), "-o", str(tmp_path / "x"))
    assert res.exit_code == 2 and "big.png: unreadable image" in res.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "nowhere"], "no such data folder"),
    (["--channels", "4,x"], "comma-separated integers"),
    (["--channels", "5,8"], "multiples of norm_num_groups"),
    (["--steps", "0"], "--steps"),
    (["--variance", "maybe"], "--variance"),
    (["--device", "cuda:0"], "CUDA is not available"),
    (["--resume"], "nothing to resume"),
])
def test_train_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    res = _train("-o", str(tmp_path / "t"), "--steps", "2", *args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert not (tmp_path / "t").exists()


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "o2mcli", "train", *TINY, "--steps", "24", "--save-every", "4",
            "--seed", "3", "-o", str(out), *extra]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    env = {**os.environ, "O2M_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref.safetensors"
    subprocess.run(_cmd(ref), check=True, env=env, capture_output=True)

    out = tmp_path / "run.safetensors"
    state = tmp_path / "run.safetensors.partial" / "checkpoint.json"
    if not kill_after_checkpoint(_cmd(out), state, 8, env):
        pytest.skip("training finished before it could be killed (machine too fast for this check)")
    assert not out.exists()
    res = runner.invoke(app, ["train", *TINY, "--steps", "24", "--save-every", "4", "--seed", "3", "-o", str(out)])
    assert res.exit_code == 2 and "--resume" in res.output
    res = runner.invoke(app, ["train", *TINY, "--steps", "24", "--save-every", "4", "--seed", "3", "-o", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    a, b = load_file(str(ref)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_is_the_engine_under_torchrun(tmp_path: Path) -> None:
    """`o2m train` runs the distillation engine's loop: two gloo processes write one teacher (rank 0)."""
    import shutil
    import socket

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this python")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "O2M_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "t"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
           "-m", "o2mcli", "train", *TINY, "--variance", "learned", "--steps", "4", "--save-every", "2",
           "--log-every", "2", "-o", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1 and not (tmp_path / "t.partial").exists()
    rows = [__import__("json").loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and {"loss", "diff", "mse", "vlb"} <= set(rows[0])
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "model.safetensors")).values())
