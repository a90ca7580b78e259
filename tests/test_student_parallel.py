"""Student-parallel distillation under torchrun (2 CPU processes, gloo): placement does not change results.

W <= K: each rank trains its own students; the weights must equal a 1-process run bit for bit. W > K: a
student's group of ranks splits its batch (DDP within the group); equal up to float summation order.
The reference is always an independent 1-process run of the same command, not the code under test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import kill_after_checkpoint, tiny_teacher_file
from o2mcli.manifest import read_manifest
from o2mcli.stages.prune import PruneConfig, run_prune

FAST = ["--batch-size", "8", "--log-every", "2", "--lr", "1e-3", "--device", "cpu", "--seed", "3"]
ENV = {**os.environ, "O2M_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this python")


@pytest.fixture
def template(tmp_path: Path) -> Path:
    teacher = tiny_teacher_file(tmp_path / "teacher.safetensors")
    return run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, out=tmp_path / "template"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(nproc: int, args: list) -> list[str]:
    tail = ["-m", "o2mcli", "distill", *map(str, args)]
    if nproc == 1:
        return [sys.executable, *tail]
    return [TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(_port()),
            *tail]


def _run(nproc: int, args: list) -> subprocess.CompletedProcess:
    res = subprocess.run(_cmd(nproc, args), env=ENV, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _weights(out: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(out / m.artifact)) for m in read_manifest(out).models]


def _equal(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return len(wa) == len(wb) and all(x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
                                      for x, y in zip(wa, wb))


@pytest.mark.parametrize("k, kd", [(2, "crd"), (4, "output")])
def test_two_processes_write_the_one_process_weights(tmp_path: Path, template: Path, k: int, kd: str) -> None:
    args = [template, "-k", k, "--kd", kd, "--steps", 4, "--save-every", 2, *FAST]
    _run(1, [*args, "-o", tmp_path / "one"])
    res = _run(2, [*args, "-o", tmp_path / "two"])
    assert res.stdout.count("wrote ") == 1  # rank 0 alone writes
    assert _equal(tmp_path / "one", tmp_path / "two")
    man = read_manifest(tmp_path / "two")
    assert len(man.models) == k and man.summary["world_size"] == 2
    # every student's log rows reach rank 0's metrics.jsonl, whichever rank trained it
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["student"] for r in rows}) == list(range(k))
    one = read_manifest(tmp_path / "one").summary
    assert man.summary["own_range_fraction"] == one["own_range_fraction"]


def test_group_of_two_ranks_trains_one_student_data_parallel(tmp_path: Path, template: Path) -> None:
    args = [template, "-k", 1, "--steps", 4, "--save-every", 2, *FAST]
    _run(1, [*args, "-o", tmp_path / "one"])
    _run(2, [*args, "-o", tmp_path / "two"])
    (a,), (b,) = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    # the halves' gradients are averaged: the sum order differs from the whole batch's, nothing else
    assert a.keys() == b.keys() and all(torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-6) for n in a)


ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate (the optional launcher) is not installed")
def test_accelerate_launch_is_the_same_run(tmp_path: Path, template: Path) -> None:
    """`accelerate launch --multi_gpu` starts torch.distributed's launcher (on a CPU-only machine too): the same
    environment as torchrun, so the same placement and the same weights as one process."""
    args = [template, "-k", 2, "--steps", 4, *FAST]
    _run(1, [*args, "-o", tmp_path / "one"])
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(_port()), "-m", "o2mcli", "distill",
           *map(str, [*args, "-o", tmp_path / "acc"])]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_manifest(tmp_path / "acc").summary["world_size"] == 2
    assert _equal(tmp_path / "one", tmp_path / "acc")


def test_dkdm_two_students_on_two_processes(tmp_path: Path, template: Path) -> None:
    """Data-free O2MKD: each rank builds and advances the buffer shards of its own students only."""
    args = [template, "--mode", "dkdm", "-k", 2, "--steps", 4, "--save-every", 2, "--rho", "0.05", "--init-steps", 2,
            *FAST]
    res = _run(2, [*args, "-o", tmp_path / "two"])
    assert res.stdout.count("wrote ") == 1
    man = read_manifest(tmp_path / "two")
    assert [m.artifact for m in man.models] == ["student_0.safetensors", "student_1.safetensors"]
    assert man.summary["buffer"]["slots"] == 400
    _run(1, [*args, "-o", tmp_path / "one"])
    assert _equal(tmp_path / "one", tmp_path / "two")  # the shards do not depend on the placement either


def test_sigkill_under_two_processes_then_resume(tmp_path: Path, template: Path) -> None:
    args = [template, "-k", 2, "--kd", "crd", "--steps", 10, "--save-every", 2, *FAST]
    _run(2, [*args, "-o", tmp_path / "ref"])
    out = tmp_path / "run"
    if not kill_after_checkpoint(_cmd(2, [*args, "-o", out]), tmp_path / "run.partial" / "checkpoint.json", 4, ENV,
                                 tree=True, timeout=180):
        pytest.skip("distillation finished before it could be killed (machine too fast for this check)")
    assert not out.exists()
    _run(2, [*args, "-o", out, "--resume"])
    assert _equal(tmp_path / "ref", out)


def test_checkpoint_of_two_processes_resumes_on_one(tmp_path: Path, template: Path) -> None:
    """The checkpoint does not depend on the placement: a killed 2-process run resumed by 1 process ends with
    the weights of an uninterrupted 1-process run."""
    args = [template, "-k", 2, "--steps", 10, "--save-every", 2, *FAST]
    _run(1, [*args, "-o", tmp_path / "ref"])
    out = tmp_path / "run"
    if not kill_after_checkpoint(_cmd(2, [*args, "-o", out]), tmp_path / "run.partial" / "checkpoint.json", 4, ENV,
                                 tree=True, timeout=180):
        pytest.skip("distillation finished before it could be killed (machine too fast for this check)")
    _run(1, [*args, "-o", out, "--resume"])
    assert _equal(tmp_path / "ref", out)


def test_three_processes_for_two_students_are_refused(tmp_path: Path, template: Path) -> None:
    res = subprocess.run(_cmd(3, [template, "-k", 2, "--steps", 2, *FAST, "-o", tmp_path / "s"]), env=ENV,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode != 0 and not (tmp_path / "s").exists()
    lines = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert lines and all(x == lines[0] for x in lines)  # each rank says the same one line
    assert "3 processes for 2 students" in lines[0] and "multiple of K" in lines[0]
