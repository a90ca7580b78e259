"""o2m distill --mode dkdm: the buffer, the KL, data-free runs, resume of the buffer, data-free O2MKD."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from conftest import assert_refused, cli, crash_at_step, tiny_teacher_file, tiny_unet
from o2mcli.diffusion.gaussian import DiffusionTerms, normal_kl, reverse_kl
from o2mcli.distill.sources.base import Batch
from o2mcli.distill.sources.buffer import DynamicBuffer, buffer_slots
from o2mcli.errors import O2MError
from o2mcli.manifest import read_manifest
from o2mcli.stages.prune import PruneConfig, run_prune

FAST = ["--batch-size", "8", "--log-every", "2", "--lr", "1e-3", "--device", "cpu", "--rho", "0.1",
        "--init-steps", "2"]
T_SMALL = 20


def _unet(variance: str, seed: int = 0, channels=(8, 16)):
    return tiny_unet(variance, seed=seed, block_out_channels=channels)


def _teacher_file(path: Path, variance: str = "learned") -> Path:
    return tiny_teacher_file(path, variance, T=T_SMALL)


@pytest.fixture
def template(tmp_path: Path) -> Path:
    teacher = _teacher_file(tmp_path / "teacher.safetensors")
    return run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, out=tmp_path / "template"))


def _terms(T: int = T_SMALL) -> DiffusionTerms:
    return DiffusionTerms(DDPMScheduler(num_train_timesteps=T).betas)


# 1. The KL, against closed form --------------------------------------------------------------------------

def test_normal_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    lv1, lv2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-5, atol=1e-6)


def test_reverse_kl_closed_form() -> None:
    terms = _terms(1000)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    eps = torch.randn(4, 1, 8, 8, generator=g)
    v = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    # Where no clip binds (small x0), the same prediction gives KL 0 (clip=None: neither side clips).
    assert torch.allclose(reverse_kl(terms, x, t, eps, v, eps, v, clip=None), torch.zeros(4), atol=1e-7)
    # Same mean, variances beta_t and beta~_t (v = 1 and v = -1): KL = 0.5 (r - 1 - log r) per pixel, r = beta~/beta.
    kl = reverse_kl(terms, x, t, eps, torch.ones_like(v), eps, -torch.ones_like(v), clip=None)
    lb = torch.log(terms.betas[t].double())
    lpost = terms.posterior_log_variance_clipped[t].double()
    r = torch.exp(lb - lpost)
    want = 0.5 * (r - 1 - torch.log(r)) / math.log(2.0)
    torch.testing.assert_close(kl.double(), want, rtol=1e-4, atol=1e-6)


def test_reverse_kl_clips_the_teacher_mean_not_the_student_mean() -> None:
    """DKDM's official KL: teacher mean from its clipped x0, student mean from its eps unclipped (issue 11, item 2)."""
    terms = _terms(1000)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 4, 4, generator=g) * 1.5
    t = torch.tensor([3, 40, 700])
    eps_t, eps_s = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g) * 3
    v_t, v_s = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1, torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
    # By hand, in float64, with the improved-DDPM formulas written out.
    b = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - b, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = b * (1 - abar_prev) / (1 - abar)
    log_post = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    sh = (-1, 1, 1, 1)
    a, ap, bt = abar[t].view(sh), abar_prev[t].view(sh), b[t].view(sh)

    def mean(eps: torch.Tensor, clip: bool) -> torch.Tensor:
        x0 = (x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()
        x0 = x0.clamp(-1, 1) if clip else x0
        return bt * ap.sqrt() / (1 - a) * x0 + (1 - ap) * (1 - bt).sqrt() / (1 - a) * x.double()

    def logvar(v: torch.Tensor) -> torch.Tensor:
        frac = (v.double() + 1) / 2
        return frac * torch.log(bt) + (1 - frac) * log_post[t].view(sh)

    m1, l1, m2, l2 = mean(eps_t, True), logvar(v_t), mean(eps_s, False), logvar(v_s)
    want = (0.5 * (-1 + l2 - l1 + torch.exp(l1 - l2) + (m1 - m2) ** 2 * torch.exp(-l2))).mean((1, 2, 3)) / math.log(2)
    got = reverse_kl(terms, x, t, eps_t, v_t, eps_s, v_s)
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-5)
    # Clipping the student too (the old behaviour) gives another, smaller number here.
    m2c = mean(eps_s, True)
    old = (0.5 * (-1 + l2 - l1 + torch.exp(l1 - l2) + (m1 - m2c) ** 2 * torch.exp(-l2))).mean((1, 2, 3)) / math.log(2)
    assert not torch.allclose(got.double(), old, rtol=1e-3)


def test_kl_trains_the_variance_only() -> None:
    from o2mcli.distill.losses.base import Outputs
    from o2mcli.distill.objective import dkdm_kl

    terms = _terms(1000)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 300, 900])
    eps_s = torch.randn(3, 1, 8, 8, requires_grad=True)
    v_s = torch.zeros(3, 1, 8, 8, requires_grad=True)
    teacher = Outputs(eps=torch.randn(3, 1, 8, 8), v=torch.rand(3, 1, 8, 8))
    dkdm_kl(Outputs(eps=eps_s, v=v_s), teacher, Batch(x_t=x, t=t), terms).backward()
    assert eps_s.grad is None and v_s.grad is not None and v_s.grad.abs().sum() > 0


# 2. Buffer invariants ------------------------------------------------------------------------------------

def _chi2_uniform(t: torch.Tensor, T: int) -> float:
    counts = torch.bincount(t, minlength=T).double()
    expected = t.numel() / T
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("init_steps", [None, 3])
def test_buffer_initialization_is_uniform(init_steps) -> None:
    teacher = _unet("learned").eval()
    buf = DynamicBuffer((1, 8, 8), 2000, _terms(), torch.device("cpu"), "learned_range", learned=True)
    g = torch.Generator().manual_seed(0)
    buf.initialize(teacher, g, init_steps, batch_size=4096)
    assert buf.t.min() >= 0 and buf.t.max() <= T_SMALL - 1 and torch.isfinite(buf.x).all()
    assert _chi2_uniform(buf.t, T_SMALL) < 43.8  # chi-square, 19 degrees of freedom, p = 0.001
    if init_steps is None:
        assert buf.init_forwards == int((T_SMALL - 1 - buf.t).sum())  # exact: T-1-t ancestral steps per slot
    else:
        assert buf.init_forwards <= 2000 * init_steps


def test_slots_advance_one_step_per_use_and_restart_at_zero() -> None:
    buf = DynamicBuffer((1, 8, 8), 64, _terms(), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    buf.t = torch.arange(64) % T_SMALL
    buf.x = torch.randn(64, 1, 8, 8)
    before_t, before_x = buf.t.clone(), buf.x.clone()
    batch = buf.draw(0, T_SMALL, 16, g)
    assert batch.slots.unique().numel() == 16 and torch.equal(batch.t, before_t[batch.slots])
    buf.after_teacher(batch, torch.zeros(16, 1, 8, 8), g)
    used = torch.zeros(64, dtype=torch.bool)
    used[batch.slots] = True
    was0 = used & (before_t == 0)
    assert torch.equal(buf.t[~used], before_t[~used]) and torch.equal(buf.x[~used], before_x[~used])
    assert torch.equal(buf.t[used & ~was0], before_t[used & ~was0] - 1)
    assert (buf.t[was0] == T_SMALL - 1).all() and buf.restarts == int(was0.sum())
    assert torch.equal(buf.steps_done, used.long())
    sub = buf.draw(5, 10, 8, g)
    assert ((sub.t >= 5) & (sub.t < 10)).all()


def test_buffer_size_and_checkpoint_mismatch() -> None:
    assert buffer_slots(0.4, 1000, 64) == 25600
    with pytest.raises(O2MError, match="rho=0.0: must be positive"):
        buffer_slots(0.0, 1000, 64)
    buf = DynamicBuffer((1, 8, 8), 32, _terms(), torch.device("cpu"))
    with pytest.raises(O2MError, match="checkpoint buffer is 16x1x8x8"):
        buf.load_state_tensors({"x": torch.zeros(16, 1, 8, 8)})
    with pytest.raises(O2MError, match="GiB"):
        DynamicBuffer((3, 1024, 1024), 10 ** 9, _terms(), torch.device("cpu"))


# 3. The command -------------------------------------------------------------------------------------------

def test_dkdm_reads_no_data(in_tmp: Path, template: Path, monkeypatch) -> None:
    import o2mcli.data

    def no_data(*a, **k):
        raise AssertionError("DKDM must not read any data")

    monkeypatch.setattr(o2mcli.data, "load_dataset", no_data)
    res = cli("distill", template, "--mode", "dkdm", "-k", "2", "--steps", "4", *FAST)
    assert res.exit_code == 0, res.output
    man = read_manifest(in_tmp / "students")
    assert man.config["data"] is None and man.summary["buffer"]["data"] == "none (teacher only)"
    assert "KL(p_T || p_S)" in man.summary["losses"]
    rows = [json.loads(x) for x in (in_tmp / "students" / "metrics.jsonl").read_text().splitlines()]
    assert all({"simple", "kl"} <= r.keys() and "diff" not in r for r in rows)


def test_fixed_variance_teacher_trains_on_mse_alone(in_tmp: Path) -> None:
    teacher = _teacher_file(in_tmp / "fixed.safetensors", "fixed")
    run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, out=in_tmp / "tpl"))
    res = cli("distill", "tpl", "--mode", "dkdm", "-k", "1", "--steps", "2", "--kd", "at", *FAST)
    assert res.exit_code == 0, res.output
    man = read_manifest(in_tmp / "students")
    assert "no KL term" in man.summary["losses"] and "L_KD(at)" in man.summary["losses"]
    # A learned-variance student under this fixed-variance teacher has nothing to learn its variance from.
    (in_tmp / "learned.json").write_text(json.dumps({**dict(_unet("learned").config), "_class_name": "UNet2DModel"},
                                                    default=list))
    assert_refused(cli("distill", "--mode", "dkdm", "--student-config", in_tmp / "learned.json", "--teacher",
                       teacher, "--steps", "1", *FAST, "-o", "x"), "no teacher variance")


def test_student_config_any_shape(in_tmp: Path, template: Path) -> None:
    cfg = {**dict(_unet("learned", channels=(4, 8)).config), "_class_name": "UNet2DModel"}
    cfg["down_block_types"], cfg["up_block_types"] = ["DownBlock2D", "DownBlock2D"], ["UpBlock2D", "UpBlock2D"]
    (in_tmp / "s.json").write_text(json.dumps(cfg, default=list))
    teacher = template.parent / "teacher.safetensors"
    res = cli("distill", "--mode", "dkdm", "--student-config", "s.json", "--teacher", teacher, "-k", "1",
              "--steps", "2", *FAST)
    assert res.exit_code == 0, res.output
    man = read_manifest(in_tmp / "students")
    assert man.models[0].denoiser_config["down_block_types"] == ["DownBlock2D", "DownBlock2D"]
    assert [p.kind for p in man.parents] == ["model-file"]
    assert_refused(cli("distill", "--mode", "dkdm", "--student-config", "s.json", "--steps", "1", *FAST, "-o", "y"),
                   "--teacher")


def test_data_free_o2mkd_routes_each_student_to_its_range(template: Path) -> None:
    from o2mcli.distill.plan import TimestepPlan
    from o2mcli.runtime.dist import DistState
    from o2mcli.models.io import load_model
    from o2mcli.distill.build import make_distiller
    from o2mcli.stages.distill import DistillConfig

    cfg = DistillConfig(template=str(template), mode="dkdm", students=2, p_own=1.0, batch_size=8, rho=0.5)
    teacher = load_model(template.parent / "teacher.safetensors")
    plan = TimestepPlan((0, 10, T_SMALL), 1.0)
    eng = make_distiller(cfg, load_model(template).unet, teacher, plan, torch.device("cpu"), DistState(),
                         lambda terms, dev: DynamicBuffer((1, 8, 8), 80, terms, dev, "learned_range", True))
    eng.source.initialize(eng.teacher, eng.gen_data, 2, 1024)
    seen = {0: [], 1: []}
    for st in eng.students:
        st.raw.register_forward_pre_hook(lambda m, args, k=st.k: seen[k].append(args[1].clone()))
    for _ in range(5):
        eng.step()
    assert torch.cat(seen[0]).max() < 10 and torch.cat(seen[1]).min() >= 10
    assert eng.own_steps == [5, 5]


def test_buffer_survives_resume(in_tmp: Path, template: Path, monkeypatch) -> None:
    args = ["distill", template, "--mode", "dkdm", "-k", "2", "--steps", "6", "--save-every", "2", *FAST]
    assert cli(*args, "-o", "ref").exit_code == 0
    undo = crash_at_step(monkeypatch, 4)
    assert cli(*args, "-o", "run").exit_code == 1
    ck = json.loads((in_tmp / "run.partial" / "checkpoint.json").read_text())
    # rho 0.1 * T 20 * b 8 = 16 slots, raised to 24: three disjoint batches of 8 per step (K=2, p_own 0.5)
    assert ck["step"] == 2 and ck["init_info"]["slots"] == 24
    undo()
    assert_refused(cli(*[a if a != "0.1" else "0.2" for a in args], "-o", "run", "--resume"), "other settings")
    res = cli(*args, "-o", "run", "--resume")
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    for k in range(2):
        a = load_file(str(in_tmp / "ref" / f"student_{k}.safetensors"))
        b = load_file(str(in_tmp / "run" / f"student_{k}.safetensors"))
        assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("args, words", [
    (["--data", "digits"], ["DKDM takes no data"]),
    (["--rho", "0"], ["--rho 0.0"]),
    (["--rho", "-1"], ["--rho -1.0"]),
])
def test_dkdm_bad_options(in_tmp: Path, template: Path, args, words) -> None:
    base = [a for a in FAST if a not in ("--rho", "0.1")]
    assert_refused(cli("distill", template, "--mode", "dkdm", "--steps", "1", *base, *args), *words)
    assert not (in_tmp / "students").exists()


def test_dkdm_paper_baseline_from_existing_stages(in_tmp: Path) -> None:
    """The paper's baseline: sample a synthetic dataset from the teacher, then train on it."""
    teacher = _teacher_file(in_tmp / "t.safetensors", "fixed")
    assert cli("sample", teacher, "-n", "12", "--scheduler", "ddpm", "--steps", str(T_SMALL), "--no-png",
               "-o", "synthetic").exit_code == 0
    res = cli("train", "--data", "synthetic", "--steps", "2", "--batch-size", "4", "--channels", "8,16",
              "--norm-groups", "2", "--timesteps", str(T_SMALL), "--device", "cpu", "-o", "baseline")
    assert res.exit_code == 0, res.output
    assert read_manifest(in_tmp / "baseline").summary["data"]["n"] == 12
