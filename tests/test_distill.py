"""o2m distill --mode o2mkd: the plan, the KD losses, the engine, resume, torchrun, refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_refused, cli, kill_after_checkpoint, tiny_scheduler, tiny_teacher_file
from o2mcli.errors import O2MError
from o2mcli.manifest import read_manifest
from o2mcli.models.configs import unet_config
from o2mcli.models.io import build_unet, load_model, save_model_file
from o2mcli.distill.plan import TimestepPlan, parse_boundaries, uniform_boundaries
from o2mcli.stages.prune import PruneConfig, run_prune

FAST = ["--batch-size", "8", "--log-every", "2", "--lr", "1e-3", "--device", "cpu"]


def _teacher(path: Path, variance: str = "fixed", seed: int = 0) -> Path:
    return tiny_teacher_file(path, variance, seed)


@pytest.fixture
def template(tmp_path: Path) -> Path:
    """A (4, 8) template pruned from a random (8, 16) teacher, as o2m prune writes it."""
    teacher = _teacher(tmp_path / "teacher.safetensors")
    return run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, out=tmp_path / "template"))


def _weights(students: Path) -> list[dict[str, torch.Tensor]]:
    man = read_manifest(students)
    return [load_file(str(students / m.artifact)) for m in man.models]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# 1. The timestep plan ---------------------------------------------------------------------------------

def test_ranges_uniform_and_custom() -> None:
    assert uniform_boundaries(1000, 4) == [0, 250, 500, 750, 1000]
    assert uniform_boundaries(10, 3) == [0, 3, 7, 10]
    assert parse_boundaries("0,200,450,700,1000", 1000) == [0, 200, 450, 700, 1000]
    for bad, msg in [("0,500,400,1000", "strictly increasing"), ("0,500,500,1000", "empty range"),
                     ("100,1000", "start at 0"), ("0,900", "end at T=1000"), ("0,a,1000", "integers")]:
        with pytest.raises(O2MError, match=msg):
            parse_boundaries(bad, 1000)
    with pytest.raises(O2MError, match="students=1001: must be between 1"):
        uniform_boundaries(1000, 1001)
    with pytest.raises(O2MError, match="p_own=1.5: must be a probability"):
        TimestepPlan((0, 500, 1000), 1.5)


def test_p_own_is_the_per_step_probability_of_the_own_range() -> None:
    plan = TimestepPlan(tuple(uniform_boundaries(1000, 4)), 0.3)
    g = torch.Generator().manual_seed(0)
    n = 4000
    own = torch.zeros(4)
    for _ in range(n):
        for k, r in enumerate(plan.choose(g)):
            assert r in (plan.ranges[k], (0, 1000))
            own[k] += r == plan.ranges[k]
    sigma = math.sqrt(0.3 * 0.7 / n)
    assert ((own / n - 0.3).abs() < 4 * sigma).all(), own / n
    assert all(r == (0, 1000) for r in TimestepPlan((0, 250, 1000), 0.0).choose(g))
    assert TimestepPlan((0, 250, 1000), 1.0).choose(g) == [(0, 250), (250, 1000)]
    assert TimestepPlan((0, 1000), 1.0).choose(g) == [(0, 1000)]  # K = 1: the own range is everything


def test_image_source_draws_in_range() -> None:
    from diffusers import DDPMScheduler

    from o2mcli.diffusion.gaussian import DiffusionTerms
    from o2mcli.distill.sources import ImageSource

    terms = DiffusionTerms(DDPMScheduler().betas)
    src = ImageSource(torch.rand(10, 1, 8, 8) * 2 - 1, terms, torch.device("cpu"))
    b = src.draw(250, 500, 512, torch.Generator().manual_seed(0))
    assert b.t.min() >= 250 and b.t.max() < 500 and b.x_t.shape == (512, 1, 8, 8)
    assert b.t.float().std() > 50  # spread over the range, not a constant


# 2. KD losses on mismatched channel counts: finite, gradients reach the student only ------------------

@pytest.mark.parametrize("kd", ["output", "at", "sp", "crd", "feat"])
def test_kd_losses_with_mismatched_channels(kd: str, template: Path) -> None:
    from diffusers import DDPMScheduler

    from o2mcli.diffusion.gaussian import DiffusionTerms
    from o2mcli.distill.engine import Distiller, Hyper, Student
    from o2mcli.distill.features import matched_points
    from o2mcli.distill.losses import build_kd_loss
    from o2mcli.distill.objective import Objective
    from o2mcli.distill.sources import ImageSource
    from o2mcli.runtime.dist import DistState

    teacher = load_model(template.parent / "teacher.safetensors").unet
    student_init = load_model(template).unet
    names, s_ch, t_ch = matched_points(student_init, teacher)
    assert s_ch != t_ch and len(names) >= 3  # (4, 8) student vs (8, 16) teacher
    terms = DiffusionTerms(DDPMScheduler().betas)
    hyper = Hyper(batch_size=6, lr=1e-2)
    students = [Student(k, load_model(template).unet.train(),
                        build_kd_loss(kd, s_ch, t_ch, torch.Generator().manual_seed(k)), hyper, DistState())
                for k in range(2)]
    before = [{k: v.clone() for k, v in s.raw.state_dict().items()} for s in students]
    eng = Distiller(teacher=teacher, students=students, source=ImageSource(torch.rand(20, 1, 8, 8), terms,
                    torch.device("cpu")), plan=TimestepPlan((0, 500, 1000), 0.5),
                    objective=Objective(alpha=1.0, base="diffusion"), terms=terms, hyper=hyper,
                    device=torch.device("cpu"), dist=DistState(), gen_plan=torch.Generator().manual_seed(0),
                    gen_data=torch.Generator().manual_seed(1))
    parts = eng.step()
    for p in parts:
        assert torch.isfinite(p["kd"]) and float(p["kd"]) > 0
    assert all(p.grad is None for p in teacher.parameters())
    for s, b in zip(students, before):
        grads = [p.grad for p in s.raw.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0
        assert any(not torch.equal(v, b[k]) for k, v in s.raw.state_dict().items())


# 3. The command ----------------------------------------------------------------------------------------

def test_distill_writes_students_that_route_by_range(in_tmp: Path, template: Path) -> None:
    res = cli("distill", template, "--students", "4", "--steps", "4", *FAST)
    assert res.exit_code == 0, res.output
    man = read_manifest(in_tmp / "students")
    assert man.kind == "students" and [tuple(m.timestep_range) for m in man.models] == [
        (0, 250), (250, 500), (500, 750), (750, 1000)]
    assert man.parents[0].path == str(template.resolve()) and man.parents[1].kind == "model-file"
    rows = [json.loads(x) for x in (in_tmp / "students" / "metrics.jsonl").read_text().splitlines()]
    assert {r["student"] for r in rows} == {0, 1, 2, 3} and {r["step"] for r in rows} == {2, 4}
    assert all({"loss", "diff", "kd", "lr", "images_per_s"} <= r.keys() for r in rows)
    assert (in_tmp / "students" / "loss.png").is_file()
    assert man.models[0].denoiser_config["block_out_channels"] == [4, 8]
    # Sampling routes every step to the student that owns it.
    res = cli("sample", "students", "-n", "4", "--steps", "20", "--scheduler", "ddim", "--no-png", "-o", "s")
    assert res.exit_code == 0, res.output
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(20)
    want = [4 * sum(1 for t in sched.timesteps if lo <= int(t) < hi) for lo, hi in
            [(0, 250), (250, 500), (500, 750), (750, 1000)]]
    assert read_manifest(in_tmp / "s").summary["served"] == want


def test_k1_is_o2okd_and_p_own_zero_trains_every_student_alike(in_tmp: Path, template: Path) -> None:
    assert cli("distill", template, "-k", "1", "--p-own", "0.9", "--steps", "3", *FAST, "-o", "k1").exit_code == 0
    assert cli("distill", template, "-k", "1", "--p-own", "0", "--steps", "3", *FAST, "-o", "o2o").exit_code == 0
    assert cli("distill", template, "-k", "3", "--p-own", "0", "--steps", "3", *FAST, "-o", "k3").exit_code == 0
    assert cli("distill", template, "-k", "3", "--p-own", "1", "--steps", "3", *FAST, "-o", "own").exit_code == 0
    (k1,), (o2o,) = _weights(in_tmp / "k1"), _weights(in_tmp / "o2o")
    assert _same(k1, o2o)
    assert all(_same(s, o2o) for s in _weights(in_tmp / "k3"))  # p_own = 0: three O2OKD students
    own = _weights(in_tmp / "own")
    assert not _same(own[0], own[1])
    assert read_manifest(in_tmp / "own").summary["own_range_fraction"] == [1.0, 1.0, 1.0]


def test_kd_none_is_plain_training_without_the_teacher(in_tmp: Path, template: Path, monkeypatch) -> None:
    """The "w/o KD" row: --kd none trains on L_diff alone, exactly as --alpha 0, and never runs the teacher."""
    assert cli("distill", template, "-k", "1", "--kd", "output", "--alpha", "0", "--steps", "3", *FAST,
               "-o", "alpha0").exit_code == 0
    from o2mcli.distill.engine import Distiller

    def no_teacher(self, order, batches):
        raise AssertionError("the teacher ran under --kd none")

    monkeypatch.setattr(Distiller, "_run_teacher", no_teacher)
    res = cli("distill", template, "-k", "1", "--kd", "none", "--steps", "3", *FAST, "-o", "none")
    assert res.exit_code == 0, res.output
    (a,), (b,) = _weights(in_tmp / "alpha0"), _weights(in_tmp / "none")
    assert _same(a, b)
    s = read_manifest(in_tmp / "none").summary
    assert s["teacher_forwards_per_student_sample"] == 0 and "no KD" in s["losses"]
    assert set(json.loads((in_tmp / "none" / "metrics.jsonl").read_text().splitlines()[0])) >= {"diff", "loss"}
    assert_refused(cli("distill", template, "--mode", "dkdm", "--kd", "none", "--steps", "1", *FAST, "-o", "d"),
                   "--kd none", "dkdm")
    assert not (in_tmp / "d").exists()


def test_init_from_teacher_and_learned_variance(in_tmp: Path) -> None:
    teacher = _teacher(in_tmp / "learned.safetensors", "learned")
    run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, out=in_tmp / "tpl"))
    res = cli("distill", "tpl", "-k", "2", "--steps", "2", "--init", "teacher", "--kd", "at", *FAST)
    assert res.exit_code == 0, res.output
    man = read_manifest(in_tmp / "students")
    assert man.models[0].denoiser_config["block_out_channels"] == [8, 16]  # the teacher's own shape
    assert man.models[0].denoiser_config["out_channels"] == 2 and "vlb" in man.summary["losses"]


def test_seed_makes_runs_identical(in_tmp: Path, template: Path) -> None:
    for name in ("a", "b"):
        assert cli("distill", template, "-k", "2", "--kd", "crd", "--steps", "3", *FAST, "-o", name).exit_code == 0
    assert all(_same(x, y) for x, y in zip(_weights(in_tmp / "a"), _weights(in_tmp / "b")))


# 4. Checkpoints: SIGKILL then --resume ends where an uninterrupted run ends -------------------------------

def _cmd(template: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "o2mcli", "distill", str(template), "-k", "2", "--kd", "crd", "--steps", "16",
            "--save-every", "2", "--seed", "5", *FAST, "-o", str(out)]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path, template: Path) -> None:
    env = {**os.environ, "O2M_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cmd(template, ref), check=True, env=env, capture_output=True)
    out = tmp_path / "run"
    state = tmp_path / "run.partial" / "checkpoint.json"
    if not kill_after_checkpoint(_cmd(template, out), state, 4, env):
        pytest.skip("distillation finished before it could be killed (machine too fast for this check)")
    assert not out.exists()
    args = _cmd(template, out)[3:]
    assert_refused(cli(*args), "--resume")
    res = cli(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert all(_same(a, b) for a, b in zip(_weights(ref), _weights(out)))
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) * 2  # no duplicated log lines


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(in_tmp: Path, template: Path, monkeypatch) -> None:
    from o2mcli.distill.losses.output import OutputKD

    calls = {"n": 0}
    real = OutputKD.forward

    def poisoned(self, s, t):
        calls["n"] += 1
        loss = real(self, s, t)
        return loss * float("nan") if calls["n"] > 8 else loss  # 2 students: NaN from step 5

    monkeypatch.setattr(OutputKD, "forward", poisoned)
    res = cli("distill", template, "-k", "2", "--steps", "10", "--save-every", "2", *FAST)
    assert_refused(res, "NaN", "step 6", "last good checkpoint (step 4)", "--resume")
    assert json.loads((in_tmp / "students.partial" / "checkpoint.json").read_text())["step"] == 4
    assert not (in_tmp / "students").exists()


# 5. torchrun: 2 processes, gloo, CPU --------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["o2mkd", "dkdm"])
def test_torchrun_two_processes_gloo(tmp_path: Path, template: Path, mode: str) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this python")
    env = {**os.environ, "O2M_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "o2mcli", "distill", str(template), "-k", "2", "--kd", "crd", "--steps", "4", "--save-every", "2",
           "--mode", mode, *FAST, "-o", str(out)]
    if mode == "dkdm":
        cmd += ["--rho", "0.05", "--init-steps", "2"]  # each rank builds its own buffer shard
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1  # rank 0 alone reports and writes
    man = read_manifest(out)
    assert man.config["world_size"] == 2 and man.summary["world_size"] == 2
    assert not (tmp_path / "ddp.partial").exists()
    for w in _weights(out):
        assert all(torch.isfinite(v).all() for v in w.values())
    if mode == "dkdm":
        assert man.config["data"] is None and man.summary["buffer"]["slots"] == 400


# 6. Refusals --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["-k", "1001"], ["--students 1001"]),
    (["--p-own", "1.2"], ["--p-own 1.2"]),
    (["--p-own", "-0.1"], ["--p-own -0.1"]),
    (["--kd", "fitnets"], ["--kd 'fitnets'", "output, at, sp, crd"]),
    (["--boundaries", "0,600,500,1000", "-k", "3"], ["--boundaries"]),
    (["--boundaries", "0,500,1000", "-k", "3"], ["2 ranges"]),
    (["--resume"], ["nothing to resume"]),
    (["--init", "random"], ["--init"]),
])
def test_bad_options(in_tmp: Path, template: Path, args, words) -> None:
    assert_refused(cli("distill", template, "--steps", "1", *args, *FAST), *words)
    assert not (in_tmp / "students").exists() and not (in_tmp / "students.partial").exists()


def test_shapes_that_do_not_fit(in_tmp: Path, template: Path, monkeypatch) -> None:
    from PIL import Image

    folder = in_tmp / "rgb16"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / f"{i}.png")
    assert_refused(cli("distill", template, "--data", str(folder), "--steps", "1", *FAST), "--data", "3x16x16")
    other = _teacher(in_tmp / "rgb.safetensors")
    cfg = unet_config(sample_size=16, channels=3, block_out_channels=(8, 16), norm_num_groups=2, attention_level=None)
    save_model_file(other, build_unet(cfg, None, other), tiny_scheduler(), kind="teacher", force=True)
    assert_refused(cli("distill", template, "--teacher", other, "--steps", "1", *FAST), "template", "rgb.safetensors")
    (in_tmp / "empty").mkdir()
    monkeypatch.chdir(in_tmp / "empty")
    assert_refused(cli("distill", "--steps", "1", *FAST), "no template found here")
