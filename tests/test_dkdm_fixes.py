"""Issue 11's DKDM and diffusion-math fixes: disjoint buffer draws, diffusers' variance types and clipping,
students' own variance type, DKDM's default K, the buffer build's cost, and distill's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from conftest import assert_refused, cli, tiny_teacher_file, tiny_unet
from o2mcli.diffusion.gaussian import DiffusionTerms, reverse_step
from o2mcli.distill.sources.buffer import DynamicBuffer
from o2mcli.errors import O2MError
from o2mcli.manifest import read_manifest
from o2mcli.stages.prune import PruneConfig, run_prune

T_SMALL = 20
FAST = ["--batch-size", "8", "--log-every", "2", "--lr", "1e-3", "--device", "cpu", "--rho", "0.1",
        "--init-steps", "2"]


@pytest.fixture
def template(tmp_path: Path) -> Path:
    teacher = tiny_teacher_file(tmp_path / "teacher.safetensors", "learned", T=T_SMALL)
    return run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, out=tmp_path / "template"))


# 1. One step's buffer draws are disjoint; each write-back uses the t the teacher saw --------------------------

def test_one_step_draws_are_disjoint_and_every_slot_moves_one_step() -> None:
    """K=2 data-free O2MKD at p_own 0.5 on a buffer just big enough: the draws would overlap if independent."""
    terms = DiffusionTerms(DDPMScheduler(num_train_timesteps=T_SMALL).betas)
    teacher = tiny_unet("learned", block_out_channels=(8, 16)).eval()
    buf = DynamicBuffer((1, 8, 8), 24, terms, torch.device("cpu"), "learned_range", learned=True)
    g = torch.Generator().manual_seed(0)
    buf.initialize(teacher, g, 2, batch_size=64)
    buf.t[:4] = 0  # slots at t=0 must restart once, not restart and then be written back
    for step in range(20):
        t_before, done_before = buf.t.clone(), buf.steps_done.clone()
        buf.begin_step()
        batches = [buf.draw(0, T_SMALL, 8, g), buf.draw(0, 10, 8, g), buf.draw(10, 20, 8, g)]
        used = torch.cat([b.slots for b in batches])
        assert used.unique().numel() == used.numel(), f"step {step}: a slot was drawn twice"
        for b in batches:
            assert torch.equal(b.t, t_before[b.slots])
            with torch.no_grad():
                out = teacher(b.x_t, b.t).sample
            buf.after_teacher(b, out, g)
        moved = buf.steps_done - done_before
        assert set(moved[used].tolist()) == {1} and int(moved.sum()) == used.numel()
        want = torch.where(t_before[used] == 0, torch.full_like(used, T_SMALL - 1), t_before[used] - 1)
        assert torch.equal(buf.t[used], want)
        assert torch.isfinite(buf.x).all()


def test_draws_that_outrun_the_buffer_are_refused_not_reused() -> None:
    terms = DiffusionTerms(DDPMScheduler(num_train_timesteps=T_SMALL).betas)
    buf = DynamicBuffer((1, 4, 4), 8, terms, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    buf.begin_step()
    buf.draw(0, T_SMALL, 8, g)
    with pytest.raises(O2MError, match="already drawn"):
        buf.draw(0, 10, 8, g)


def test_buffer_holds_one_disjoint_batch_per_range(in_tmp: Path, template: Path) -> None:
    """rho 1e-9 would make 8 slots; K=4, p_own 0.5 needs 5 disjoint batches: 40 slots, and says so."""
    res = cli("distill", template, "--mode", "dkdm", "-k", "4", "--steps", "2", *FAST[:-4], "--init-steps", "2",
              "--rho", "1e-9", "-o", "st")
    assert res.exit_code == 0, res.output
    assert "using 40" in res.stderr and "disjoint" in res.stderr
    assert read_manifest(in_tmp / "st").summary["buffer"]["slots"] == 40


# 2. Variance types and clipping as diffusers' DDPMScheduler.step defines them ---------------------------------

@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip", [(True, 1.0), (True, 0.5), (False, 1.0)])
def test_reverse_step_matches_diffusers_ddpm_step(variance_type: str, clip: tuple[bool, float]) -> None:
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type=variance_type, clip_sample=clip[0],
                          clip_sample_range=clip[1])
    terms = DiffusionTerms(sched.betas)
    g = torch.Generator().manual_seed(0)
    c = 2
    learned = variance_type == "learned_range"
    for t in (999, 500, 37, 1, 0):
        x = torch.randn(3, c, 4, 4, generator=g) * 2
        out = torch.randn(3, 2 * c if learned else c, 4, 4, generator=g) * 2
        if learned:
            out[:, c:] = out[:, c:].tanh()  # v in [-1, 1]
        # diffusers draws its noise from its generator: give both the same z.
        gen = torch.Generator().manual_seed(123)
        z = torch.randn(3, c, 4, 4, generator=torch.Generator().manual_seed(123))
        want = sched.step(out, t, x, generator=gen).prev_sample
        tt = torch.full((3,), t, dtype=torch.long)
        got = reverse_step(terms, x, tt, out[:, :c], out[:, c:] if learned else None, z, variance_type,
                           clip=clip[1] if clip[0] else None)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{variance_type} t={t} clip={clip}")


@pytest.mark.parametrize("variance_type", ["fixed_large_log", "learned", "bogus"])
def test_unsupported_variance_types_are_refused_by_name(variance_type: str) -> None:
    terms = DiffusionTerms(DDPMScheduler(num_train_timesteps=T_SMALL).betas)
    with pytest.raises(O2MError, match=variance_type):
        DynamicBuffer((1, 4, 4), 8, terms, torch.device("cpu"), variance_type=variance_type, learned=True)


def _teacher_with_scheduler(path: Path, **changes) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    sched = json.loads(meta["o2m.scheduler_config"])
    sched.update(changes)
    meta["o2m.scheduler_config"] = json.dumps(sched)
    out = path.with_name("teacher_" + "_".join(map(str, changes.values())) + ".safetensors")
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("changes,words", [({"variance_type": "learned"}, ["'learned'", "not supported"]),
                                           ({"prediction_type": "sample"}, ["'sample'", "x0-prediction"]),
                                           ({"clip_sample_range": -1}, ["clip_sample_range"])])
def test_dkdm_refuses_teachers_it_cannot_step(in_tmp: Path, template: Path, changes, words) -> None:
    teacher = _teacher_with_scheduler(template.parent / "teacher.safetensors", **changes)
    assert_refused(cli("distill", template, "--teacher", teacher, "--mode", "dkdm", "--steps", "1", *FAST,
                       "-o", "x"), *words)
    assert not (in_tmp / "x").exists() and not (in_tmp / "x.partial").exists()


def test_dkdm_honours_clip_sample_false(in_tmp: Path, template: Path) -> None:
    """The buffer's reverse step follows the teacher's clip_sample: another config gives another buffer."""
    teacher = template.parent / "teacher.safetensors"
    noclip = _teacher_with_scheduler(teacher, clip_sample=False)
    args = ["distill", template, "--mode", "dkdm", "--steps", "2", *FAST]
    assert cli(*args, "--teacher", teacher, "-o", "a").exit_code == 0
    assert cli(*args, "--teacher", noclip, "-o", "b").exit_code == 0
    la = [json.loads(x)["loss"] for x in (in_tmp / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (in_tmp / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la != lb


# 3. A student's scheduler config matches its own outputs --------------------------------------------------------

@pytest.fixture
def fixed_student_of_learned_teacher(in_tmp: Path, template: Path) -> Path:
    cfg = {**dict(tiny_unet("fixed").config), "_class_name": "UNet2DModel"}
    (in_tmp / "s.json").write_text(json.dumps(cfg, default=list))
    teacher = template.parent / "teacher.safetensors"
    res = cli("distill", "--mode", "dkdm", "--student-config", "s.json", "--teacher", teacher, "--steps", "2",
              *FAST, "-o", "st")
    assert res.exit_code == 0, res.output
    return in_tmp / "st"


def test_c_channel_student_is_saved_fixed_small(fixed_student_of_learned_teacher: Path) -> None:
    from o2mcli.models.io import load_model

    man = read_manifest(fixed_student_of_learned_teacher)
    assert man.scheduler_config["variance_type"] == "fixed_small"
    assert load_model(fixed_student_of_learned_teacher).scheduler_config["variance_type"] == "fixed_small"


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm++"])
def test_c_channel_student_samples_with_every_scheduler(in_tmp: Path, fixed_student_of_learned_teacher: Path,
                                                        scheduler: str) -> None:
    res = cli("sample", fixed_student_of_learned_teacher, "-n", "2", "--steps", "3", "--scheduler", scheduler,
              "--device", "cpu", "-o", f"s-{scheduler}")
    assert res.exit_code == 0, res.output


def test_c_channel_student_exports_to_a_working_ddpm_pipeline(in_tmp: Path, template: Path) -> None:
    from diffusers import DDPMPipeline

    cfg = {**dict(tiny_unet("fixed").config), "_class_name": "UNet2DModel"}
    (in_tmp / "s.json").write_text(json.dumps(cfg, default=list))
    res = cli("distill", "--mode", "dkdm", "--student-config", "s.json", "--teacher",
              template.parent / "teacher.safetensors", "--steps", "2", *FAST, "-o", "st")
    assert res.exit_code == 0, res.output
    res = cli("export", in_tmp / "st" / "student_0.safetensors", "-o", "pipe")
    assert res.exit_code == 0, res.output
    pipe = DDPMPipeline.from_pretrained(in_tmp / "pipe", local_files_only=True)
    assert pipe.scheduler.config.variance_type == "fixed_small"
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and (images == images).all()


# 5. --mode dkdm means DKDM: K = 1 unless -k says otherwise ---------------------------------------------------------

def test_dkdm_defaults_to_one_student_and_o2mkd_to_four(in_tmp: Path, template: Path) -> None:
    assert cli("distill", template, "--mode", "dkdm", "--steps", "1", *FAST, "-o", "d").exit_code == 0
    assert len(read_manifest(in_tmp / "d").models) == 1
    assert read_manifest(in_tmp / "d").config["students"] == 1
    res = cli("distill", template, "--mode", "o2mkd", "--steps", "1", *FAST[:-4], "-o", "o")
    assert res.exit_code == 0, res.output
    assert len(read_manifest(in_tmp / "o").models) == 4
    assert "1 with --mode dkdm" in " ".join(cli("distill", "--help").output.split())


# 6. The buffer build says what it costs ---------------------------------------------------------------------------

def test_buffer_build_prints_its_cost_and_progress(in_tmp: Path, template: Path) -> None:
    args = ["distill", template, "--mode", "dkdm", "--steps", "1", "--batch-size", "8", "--rho", "1",
            "--init-batch", "8", "--device", "cpu"]
    res = cli(*args, "-o", "exact")
    assert res.exit_code == 0, res.output
    err = res.stderr
    forwards = read_manifest(in_tmp / "exact").summary["buffer"]["teacher_forwards"]
    assert f"{forwards:,} teacher forwards" in err  # announced before the build, exactly
    assert "--init-steps 10 would need about" in err
    assert "forwards took" in err and "in all" in err  # the estimate, from the first seconds
    assert err.count("%), ") >= 3 and "left" in err  # periodic lines (no terminal here)
    res = cli(*args, "--init-steps", "3", "-o", "ddim")
    assert res.exit_code == 0 and "3-step DDIM jumps" in res.stderr and "would need" not in res.stderr


# Distill's refusals: options before the filesystem, bounds, non-finite numbers -------------------------------------

def test_init_steps_beyond_T_is_refused(in_tmp: Path, template: Path) -> None:
    assert_refused(cli("distill", template, "--mode", "dkdm", "--steps", "1", *FAST[:-2], "--init-steps", "5000",
                       "-o", "x"), "--init-steps 5000", f"T={T_SMALL}")
    assert not (in_tmp / "x").exists() and not (in_tmp / "x.partial").exists()


@pytest.mark.parametrize("bad,word", [(["--kd", "bogus"], "bogus"), (["--device", "tpu"], "tpu")])
def test_bad_options_are_named_before_an_interrupted_run(in_tmp: Path, template: Path, bad, word) -> None:
    (in_tmp / "st.partial").mkdir()
    res = cli("distill", template, "--steps", "1", *FAST[:-4], *bad, "-o", "st")
    assert_refused(res, word)
    assert "interrupted" not in res.stderr


@pytest.mark.parametrize("opt,value", [("--rho", "nan"), ("--rho", "inf"), ("--p-own", "1.5"), ("--p-own", "nan"),
                                       ("--lr", "nan"), ("--alpha", "inf"), ("--kl-weight", "nan"),
                                       ("--seed", str(2 ** 64))])
def test_non_finite_and_out_of_range_numbers_are_refused(in_tmp: Path, template: Path, opt: str, value: str) -> None:
    fast = FAST[:-4] + FAST[-2:] if opt == "--rho" else FAST  # without FAST's own --rho
    res = cli("distill", template, "--mode", "dkdm", "--steps", "1", *fast, opt, value, "-o", "x")
    assert_refused(res, opt)
    assert not (in_tmp / "x").exists()
