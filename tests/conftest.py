"""Shared fixtures: tiny random UNets (channels (4, 8), 2 GroupNorm groups), no downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("O2M_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: thread overhead dominates, and CI has 2 cores

from o2mcli.models.configs import scheduler_config, unet_config  # noqa: E402
from o2mcli.outputs import atomic_dir  # noqa: E402
from o2mcli.manifest import write_manifest  # noqa: E402
from o2mcli.models.io import build_unet, model_record, save_model_file  # noqa: E402


def tiny_unet(variance: str = "fixed", channels: int = 1, size: int = 8, attention: bool = True, seed: int = 0,
              block_out_channels: tuple[int, ...] = (4, 8), head_dim: int | None = 4):
    """A random UNet2DModel with block_out_channels (4, 8) by default and 2 GroupNorm groups."""
    torch.manual_seed(seed)
    cfg = unet_config(sample_size=size, channels=channels, variance=variance, block_out_channels=block_out_channels,
                      layers_per_block=1, norm_num_groups=2, attention_level=1 if attention else None)
    cfg["attention_head_dim"] = head_dim
    return build_unet(cfg, None, Path("tiny"))


def tiny_teacher_file(path: Path, variance: str = "fixed", seed: int = 0, T: int = 1000) -> Path:
    """A (8, 16) teacher on 1x8x8 images saved as an o2m file: room to prune to (4, 8)."""
    unet = tiny_unet(variance, seed=seed, block_out_channels=(8, 16))
    save_model_file(path, unet, scheduler_config(variance, T), kind="teacher")
    return path


def cli(*args):
    """Invoke the o2m CLI in-process, as a user would type it."""
    from typer.testing import CliRunner

    from o2mcli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args) -> str:
    """Run ``o2m *args``; it must exit 0. Its output (stdout and stderr)."""
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return r.output


def assert_refused(result, *words: str) -> None:
    """Exit 2 with exactly one ``error: ...`` line naming ``words``, and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for w in words:
        assert w in lines[0], lines[0]


def crash_at_step(monkeypatch: pytest.MonkeyPatch, n: int):
    """Make the engine's ``n``-th step raise (a crash mid-run); returns a function that undoes it."""
    from o2mcli.distill.engine import Distiller

    real, calls = Distiller.step, {"n": 0}

    def crash(self):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated crash")
        return real(self)

    monkeypatch.setattr(Distiller, "step", crash)
    return lambda: monkeypatch.setattr(Distiller, "step", real)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_after_checkpoint(cmd: list[str], state: Path, min_step: int, env: dict, tree: bool = False,
                          timeout: float = 120) -> bool:
    """Run ``cmd``; SIGKILL it once ``state`` (a checkpoint JSON) reaches ``min_step``. False if it finished first.

    ``tree``: kill every process below it too (torchrun starts its ranks in sessions of their own, so killing its
    process group would let them finish the run)."""
    import json
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=tree)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text() or "{}").get("step", 0) >= min_step:
                break
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    if proc.poll() is not None:
        return False
    for pid in [proc.pid, *(descendants(proc.pid) if tree else [])]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    if tree:
        time.sleep(0.5)  # the ranks' files are closed by the kernel
    return True


def tiny_scheduler(variance: str = "fixed", T: int = 1000) -> dict:
    return scheduler_config(variance, T)


def make_model_stage(path: Path, kind: str, ranges=((0, 1000),)) -> Path:
    """A model stage directory (e.g. ``students``) of tiny UNets, model k serving ``ranges[k]``."""
    sc = tiny_scheduler()
    with atomic_dir(path) as tmp:
        models = []
        for k, r in enumerate(ranges):
            u = tiny_unet(seed=k + 1)
            save_model_file(tmp / f"model_{k}.safetensors", u, sc, kind=kind, timestep_range=r)
            models.append(model_record(f"{kind}_{k}", f"model_{k}.safetensors", u, r))
        write_manifest(tmp, kind, {"test": True}, models=models, scheduler_config=sc, summary={"note": "hi"})
    return path


FAST_DISTILL = ["--batch-size", "8", "--log-every", "2", "--lr", "1e-3", "--device", "cpu"]


def distilled_students(root: Path, out: str, k: int, steps: int, teacher_seed: int = 0) -> Path:
    """A tiny teacher under ``root``, its ratio-0.5 template, and K students distilled from it into ``out``."""
    from o2mcli.stages.prune import PruneConfig, run_prune

    teacher = tiny_teacher_file(root / "teacher.safetensors", seed=teacher_seed)
    run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, out=root / "template"))
    result = cli("distill", "template", "-k", str(k), "--steps", str(steps), *FAST_DISTILL, "-o", out)
    assert result.exit_code == 0, result.output
    return root / out


@pytest.fixture
def tiny_model_file(tmp_path: Path) -> Path:
    """A tiny teacher saved as a self-describing o2m .safetensors file."""
    path = tmp_path / "tiny.safetensors"
    save_model_file(path, tiny_unet(), tiny_scheduler(), kind="teacher")
    return path


@pytest.fixture
def tiny_learned_file(tmp_path: Path) -> Path:
    """A tiny learned-variance (2C outputs) teacher file."""
    path = tmp_path / "tiny_learned.safetensors"
    save_model_file(path, tiny_unet("learned"), tiny_scheduler("learned"), kind="teacher")
    return path


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside an empty working directory (for chaining defaults)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _release_outputs():
    """Output names reserved by a stage called in-process are given up after each test (the CLI does it itself)."""
    yield
    from o2mcli.outputs import release_all

    release_all()
