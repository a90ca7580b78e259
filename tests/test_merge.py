"""o2m merge: task arithmetic over the students of one run, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_refused, cli, distilled_students, tiny_teacher_file
from o2mcli.manifest import read_manifest
from o2mcli.merge.average import weighted_average
from o2mcli.merge.task_arithmetic import task_arithmetic
from o2mcli.models.io import load_model
from o2mcli.stages.prune import PruneConfig, run_prune

FAST = ["--batch-size", "8", "--log-every", "2", "--lr", "1e-3", "--device", "cpu"]


def _teacher(path: Path, seed: int = 0) -> Path:
    return tiny_teacher_file(path, seed=seed)


@pytest.fixture
def students(in_tmp: Path) -> Path:
    return distilled_students(in_tmp, "students", k=3, steps=3)


# 1. The arithmetic ----------------------------------------------------------------------------------------

def test_task_arithmetic_known_values() -> None:
    base = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([7])}
    a, b = {"w": torch.tensor([3.0, 2.0]), "n": torch.tensor([7])}, {"w": torch.tensor([1.0, 6.0]), "n": torch.tensor([7])}
    out = task_arithmetic(base, [a, b], [1.0, 1.0], 0.5)  # theta_0 + 0.5 (d_a + d_b) = the average
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0])) and torch.equal(out["n"], torch.tensor([7]))
    out = task_arithmetic(base, [a, b], [2.0, 1.0], 1.0)  # theta_0 + 2 d_a + d_b
    assert torch.equal(out["w"], torch.tensor([5.0, 6.0]))
    assert torch.equal(weighted_average(None, [a, b], [3.0, 1.0])["w"], torch.tensor([2.5, 3.0]))


def test_identical_students_merge_to_themselves() -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(50, generator=g)}
    s = {"w": torch.randn(50, generator=g)}
    for lam, k in ((1 / 3, 3), (0.25, 4)):
        assert torch.equal(task_arithmetic(base, [s] * k, [1.0] * k, lam)["w"], s["w"])


# 2. The command -------------------------------------------------------------------------------------------

def test_merge_students_into_one_file(students: Path, in_tmp: Path) -> None:
    res = cli("merge", students, "-o", "merged.safetensors")
    assert res.exit_code == 0, res.output
    merged = load_file(str(in_tmp / "merged.safetensors"))
    parts = [load_file(str(students / f"student_{k}.safetensors")) for k in range(3)]
    for key, v in merged.items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, sum(p[key].double() for p in parts).div(3).float(), rtol=1e-6, atol=1e-7)
    m = load_model(in_tmp / "merged.safetensors")
    assert m.ranges == [(0, 1000)] and not m.is_group
    meta = json.loads(__import__("safetensors").safe_open(str(in_tmp / "merged.safetensors"), "pt").metadata()
                      ["o2m.provenance"])
    assert meta["theta_0"] == str((in_tmp / "template").resolve()) and len(meta["students"]) == 3
    # It samples like any model and exports to plain diffusers.
    assert cli("sample", "merged.safetensors", "-n", "2", "--steps", "2", "--no-png", "-o", "s").exit_code == 0
    assert cli("export", "merged.safetensors", "-o", "pipe").exit_code == 0
    assert (in_tmp / "pipe" / "unet" / "config.json").is_file()
    # Defaults never overwrite: a second merge writes merged-2.safetensors.
    assert cli("merge", students, "--lambda", "0.5", "--weights", "1,0,1").exit_code == 0
    out = load_file(str(in_tmp / "merged-2.safetensors"))
    base = load_model(in_tmp / "template").unet.state_dict()
    k = "conv_in.weight"
    want = base[k].double() + 0.5 * ((parts[0][k].double() - base[k].double()) + (parts[2][k].double() - base[k].double()))
    torch.testing.assert_close(out[k], want.float(), rtol=1e-6, atol=1e-7)


def test_merge_to_a_stage_directory(students: Path, in_tmp: Path, monkeypatch) -> None:
    assert cli("merge", "-o", "merged", "--method", "average").exit_code == 0  # the newest students here
    man = read_manifest(in_tmp / "merged")
    assert man.kind == "merged" and man.summary["students"] == 3 and man.models[0].timestep_range == (0, 1000)
    assert man.parents[0].path == str(students.resolve())
    (in_tmp / "empty").mkdir()
    monkeypatch.chdir(in_tmp / "empty")
    assert_refused(cli("merge"), "no students found here")


def test_merge_refusals(students: Path, in_tmp: Path) -> None:
    # One student.
    assert cli("distill", "template", "-k", "1", "--steps", "1", *FAST, "-o", "one").exit_code == 0
    assert_refused(cli("merge", "one", "-o", "m.safetensors"), "one", "at least 2")
    # Students of another run (another initialization).
    other_teacher = _teacher(in_tmp / "teacher2.safetensors", seed=5)
    run_prune(PruneConfig(teacher=str(other_teacher), ratio=0.5, throughput=False, out=in_tmp / "template2"))
    assert cli("distill", "template2", "-k", "2", "--steps", "1", *FAST, "-o", "other").exit_code == 0
    assert_refused(cli("merge", students / "student_0.safetensors", "other/student_0.safetensors",
                       "-o", "m.safetensors"), "different initializations")
    # A student whose shape differs from theta_0: refused naming the tensor.
    bad = load_file(str(students / "student_1.safetensors"))
    bad["conv_in.weight"] = torch.zeros(2, 1, 3, 3)
    from safetensors import safe_open
    with safe_open(str(students / "student_1.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file(bad, str(in_tmp / "odd.safetensors"), metadata=meta)
    assert_refused(cli("merge", students / "student_0.safetensors", "odd.safetensors", "-o", "m.safetensors"),
                   "conv_in.weight")
    # A missing student file.
    (students / "student_2.safetensors").rename(in_tmp / "away.safetensors")
    assert_refused(cli("merge", students, "-o", "m.safetensors"), "student_2.safetensors")
    (in_tmp / "away.safetensors").rename(students / "student_2.safetensors")
    # --lambda that is not a number; --weights of the wrong length.
    assert_refused(cli("merge", students, "--lambda", "half", "-o", "m.safetensors"), "--lambda 'half'", "not a number")
    assert_refused(cli("merge", students, "--weights", "1,2", "-o", "m.safetensors"), "--weights", "2 values for 3")
    assert not (in_tmp / "m.safetensors").exists()
