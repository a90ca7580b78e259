"""Issue 23, fidelity review: BK-SDM's own feature-KD pairs, DKDM buffer guidance, guidance at or below 1 as
diffusers has it, the sample command's small refusals and notes, and merges that would write non-finite weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import FAST_DISTILL, assert_refused, cli, ok, tiny_teacher_file
from sd_tiny import tiny_sd_unet
from o2mcli.data.labels import LabelPlan, text_plan
from o2mcli.diffusion.gaussian import DiffusionTerms, reverse_step
from o2mcli.diffusion.sampler import guided
from o2mcli.distill.sources.buffer import DynamicBuffer, cfg_eps
from o2mcli.errors import OptionError
from o2mcli.manifest import read_manifest
from o2mcli.models.configs import unet_config
from o2mcli.models.denoise import predict
from o2mcli.models.io import build_unet

SAMPLE = ["-n", "6", "--steps", "3", "--device", "cpu", "--no-png"]


# 1. BK-SDM's feature-KD pairs ---------------------------------------------------------------------------------------
# BK-SDM (Kim et al. 2023; kd_train_text_to_image.py's mapping_layers): base and small hook every down and up block
# of both U-Nets by the same name (no mid block, although bk-base keeps one); tiny hooks the outer down blocks, the
# innermost remaining stage's attention output (student attentions.0.proj_out vs teacher attentions.1.proj_out) and
# the up blocks one index lower in the student.

SD1_BASE_SMALL = {**{f"down_blocks.{i}": f"down_blocks.{i}" for i in range(4)},
                  **{f"up_blocks.{i}": f"up_blocks.{i}" for i in range(4)}}
SD1_TINY = {"down_blocks.0": "down_blocks.0", "down_blocks.1": "down_blocks.1",
            "down_blocks.2.attentions.0.proj_out": "down_blocks.2.attentions.1.proj_out",
            "up_blocks.0": "up_blocks.1", "up_blocks.1": "up_blocks.2", "up_blocks.2": "up_blocks.3"}


def _sd1_config() -> dict:
    """diffusers' default UNet2DConditionModel config (Stable Diffusion 1.x's U-Net), built on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel()
    return {**dict(unet.config), "_class_name": "UNet2DConditionModel"}


@pytest.mark.parametrize("variant,want", [("bk-base", SD1_BASE_SMALL), ("bk-small", SD1_BASE_SMALL),
                                          ("bk-tiny", SD1_TINY)])
def test_bk_feature_pairs_are_bk_sdms_on_the_sd1_unet(variant: str, want: dict) -> None:
    from o2mcli.pruning.blocks import plan_blocks
    from o2mcli.pruning.widths import reference_unet

    cfg = _sd1_config()
    assert list(cfg["block_out_channels"]) == [320, 640, 1280, 1280]
    plan = plan_blocks(cfg, variant, Path("sd"))
    assert plan.feature_pairs == want
    assert plan.record()["feature_pairs"] == want  # what the template's provenance carries to distill
    student, teacher = reference_unet(plan.config), reference_unet(cfg)
    for s, t in want.items():  # every name is a module of its side
        student.get_submodule(s)
        teacher.get_submodule(t)
    assert ("mid_block" in plan.block_map) == (variant == "bk-base")  # kept by bk-base, yet not a KD point


THREE = dict(block_out_channels=(16, 32, 32),
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


@pytest.mark.parametrize("variant,kw,want", [
    ("bk-base", {}, {"down_blocks.0": "down_blocks.0", "down_blocks.1": "down_blocks.1",
                     "up_blocks.0": "up_blocks.0", "up_blocks.1": "up_blocks.1"}),
    ("bk-small", {}, {"down_blocks.0": "down_blocks.0", "down_blocks.1": "down_blocks.1",
                      "up_blocks.0": "up_blocks.0", "up_blocks.1": "up_blocks.1"}),
    ("bk-tiny", THREE, {"down_blocks.0": "down_blocks.0",
                        "down_blocks.1.attentions.0.proj_out": "down_blocks.1.attentions.1.proj_out",
                        "up_blocks.0": "up_blocks.1", "up_blocks.1": "up_blocks.2"}),
    ("bk-tiny", {**THREE, "use_linear_projection": True},  # SD 2.x: proj_out gives tokens, laid on the grid
     {"down_blocks.0": "down_blocks.0",
      "down_blocks.1.attentions.0.proj_out": "down_blocks.1.attentions.1.proj_out",
      "up_blocks.0": "up_blocks.1", "up_blocks.1": "up_blocks.2"}),
])
def test_bk_feature_pairs_on_the_tiny_sd_unet_are_all_matched(variant: str, kw: dict, want: dict) -> None:
    """The exact pairs, and feature KD compares every one of them (same spatial size), the mid block never."""
    from o2mcli.distill.features import FeatureTap, feature_match
    from o2mcli.distill.losses import build_kd_loss
    from o2mcli.distill.losses.base import Outputs
    from o2mcli.pruning.blocks import remove_blocks

    teacher = tiny_sd_unet(**kw)
    student, plan = remove_blocks(teacher, variant, Path("t"))
    assert plan.feature_pairs == want
    names, s_ch, t_ch, pairs = feature_match(student, teacher, plan.feature_pairs)
    assert names == list(want) and pairs == want and s_ch == t_ch
    # One feature-KD loss over them, as the engine taps them: finite, and zero for the teacher's own features.
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 32)
    s_tap, t_tap = FeatureTap(student, names), FeatureTap(teacher, [pairs[n] for n in names])
    with torch.no_grad():
        s_eps, t_eps = predict(student, x, t, text), predict(teacher, x, t, text)
    s_f, t_f = s_tap.pop(), t_tap.pop()
    assert all(s_f[n].dim() == 4 and s_f[n].shape == t_f[pairs[n]].shape for n in names)
    kd = build_kd_loss("feat", s_ch, t_ch, torch.Generator().manual_seed(0))
    t_out = Outputs(eps=t_eps, features={n: t_f[pairs[n]] for n in names})
    assert torch.isfinite(kd(Outputs(eps=s_eps, features=s_f), t_out))
    assert float(kd(t_out, t_out)) == 0.0


def test_bk_template_records_bk_sdms_pairs(tmp_path: Path) -> None:
    """``o2m prune --blocks`` writes BK-SDM's pairs into the template, where ``o2m distill`` reads them."""
    from o2mcli.distill.inputs import template_feature_pairs
    from o2mcli.models.io import load_model
    from sd_tiny import save_tiny_sd

    pipe = save_tiny_sd(tmp_path / "pipe")
    tiny_sd_unet().save_pretrained(pipe / "unet", safe_serialization=True)
    for variant in ("bk-base", "bk-small"):
        ok("prune", pipe, "--blocks", variant, "--no-throughput", "-o", tmp_path / variant)
        assert template_feature_pairs(load_model(tmp_path / variant, "cpu")) == {
            "down_blocks.0": "down_blocks.0", "down_blocks.1": "down_blocks.1",
            "up_blocks.0": "up_blocks.0", "up_blocks.1": "up_blocks.1"}


# 2. DKDM buffer guidance --------------------------------------------------------------------------------------------

def _terms(T: int = 1000) -> DiffusionTerms:
    return DiffusionTerms(DDPMScheduler(num_train_timesteps=T).betas)


def _class_unet(variance: str = "fixed"):
    torch.manual_seed(0)
    return build_unet(unet_config(sample_size=8, channels=1, variance=variance, block_out_channels=(4, 8),
                                  norm_num_groups=2, num_classes=3), None, Path("m")).eval()


def _filled(buf: DynamicBuffer, seed: int = 5) -> None:
    """Slots with random images, timesteps in [1, T) and labels (one of them the null class)."""
    g = torch.Generator().manual_seed(seed)
    buf.x = torch.randn(buf.n, *buf.shape, generator=g)
    buf.t = torch.randint(1, buf.T, (buf.n,), generator=g)
    buf.y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])[: buf.n]


@pytest.mark.parametrize("variance", ["fixed", "learned"])
def test_guided_buffer_step_is_the_hand_computed_cfg_step(variance: str) -> None:
    """W > 1: the slot's next state is the teacher's reverse step with eps_u + W (eps_c - eps_u) (the conditional
    variance channel), while the KD target the engine passes in stays the conditional prediction."""
    unet, W = _class_unet(variance), 3.0
    plan = LabelPlan(("a", "b", "c"), 3, 0.0)
    vt = "learned_range" if variance == "learned" else "fixed_small"
    buf = DynamicBuffer((1, 8, 8), 8, _terms(), torch.device("cpu"), variance_type=vt,
                        learned=variance == "learned", labels=plan, guidance=W, teacher=unet)
    _filled(buf)
    buf.begin_step()
    batch = buf.draw(0, 1000, 8, torch.Generator().manual_seed(1))
    x0, t0 = batch.x_t.clone(), batch.t_host.clone()
    with torch.no_grad():
        out_c = predict(unet, batch.x_t, batch.t, batch.cond)
        out_u = predict(unet, x0, batch.t, torch.full((8,), 3))
    buf.after_teacher(batch, out_c, torch.Generator().manual_seed(7))
    eps = out_u[:, :1] + W * (out_c[:, :1] - out_u[:, :1])
    v = out_c[:, 1:2] if variance == "learned" else None
    z = torch.randn((8, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    want = reverse_step(buf.terms, x0, t0, eps, v, z, vt, 1.0)
    assert torch.equal(buf.x[buf._loc(batch.slots)], want)
    assert torch.equal(buf.t[batch.slots], t0 - 1) and buf.guide_forwards == 8
    assert torch.equal(cfg_eps(out_c[:, :1], out_u[:, :1], W), eps)


@pytest.mark.parametrize("w", [1.0, 0.5, 0.0])
def test_unguided_buffer_step_is_bit_identical_and_runs_no_extra_forward(w: float) -> None:
    """W <= 1: the plain reverse step from the conditional prediction, no unconditional forward (bit for bit the
    buffer without the option)."""
    unet = _class_unet()
    plan = LabelPlan(("a", "b", "c"), 3, 0.0)
    calls = {"n": 0}
    unet.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    states = []
    for kw in ({}, {"guidance": w, "teacher": unet}):
        buf = DynamicBuffer((1, 8, 8), 8, _terms(), torch.device("cpu"), labels=plan, **kw)
        _filled(buf)
        buf.begin_step()
        batch = buf.draw(0, 1000, 8, torch.Generator().manual_seed(1))
        x0, t0 = batch.x_t.clone(), batch.t_host.clone()
        with torch.no_grad():
            out = predict(unet, batch.x_t, batch.t, batch.cond)
        before = calls["n"]
        buf.after_teacher(batch, out, torch.Generator().manual_seed(7))
        assert calls["n"] == before and buf.guide_forwards == 0
        z = torch.randn((8, 1, 8, 8), generator=torch.Generator().manual_seed(7))
        assert torch.equal(buf.x[buf._loc(batch.slots)], reverse_step(buf.terms, x0, t0, out, None, z))
        states.append(buf.state_tensors())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_guided_buffer_step_under_a_text_teacher_guides_against_the_empty_prompt() -> None:
    unet, W = tiny_sd_unet(layers_per_block=1), 2.5
    g = torch.Generator().manual_seed(3)
    emb, null = torch.randn(2, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    plan = text_plan(["a cat", "a dog"], emb, null, 0.0, {})
    buf = DynamicBuffer((4, 8, 8), 4, _terms(), torch.device("cpu"), labels=plan, guidance=W, teacher=unet)
    buf.x = torch.randn(4, 4, 8, 8, generator=g)
    buf.t = torch.tensor([5, 300, 600, 999])
    buf.y = torch.tensor([0, 1, 2, 0])  # 2: the empty prompt (the null condition)
    buf.begin_step()
    batch = buf.draw(0, 1000, 4, g)
    x0, t0 = batch.x_t.clone(), batch.t_host.clone()
    with torch.no_grad():
        out_c = predict(unet, x0, batch.t, batch.cond)
        out_u = predict(unet, x0, batch.t, null.expand(4, -1, -1))
    buf.after_teacher(batch, out_c, torch.Generator().manual_seed(9))
    z = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(9))
    want = reverse_step(buf.terms, x0, t0, out_u + W * (out_c - out_u), None, z)
    assert torch.equal(buf.x[buf._loc(batch.slots)], want)


def test_guided_buffer_build_runs_both_branches() -> None:
    """The shuffle-denoise build (DDIM jumps here) is guided too: two forwards per move, the second on the null
    class, and its cost estimate counts both."""
    unet, W = _class_unet(), 4.0
    plan = LabelPlan(("a", "b", "c"), 3, 0.0)
    seen: list[torch.Tensor] = []
    unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"].clone()), with_kwargs=True)
    built = {}
    for w in (1.0, W):
        buf = DynamicBuffer((1, 8, 8), 8, _terms(), torch.device("cpu"), labels=plan, guidance=w,
                            teacher=unet if w > 1 else None)
        seen.clear()
        buf.initialize(unet, torch.Generator().manual_seed(0), 2, 64)
        built[w] = (buf.x.clone(), buf.init_forwards, len(seen), buf.planned_forwards(buf.t, 2))
        if w > 1:
            assert all((s == 3).all() for s in seen[1::2]) and seen[0].tolist() == buf.y[buf.t < 999].tolist()
    assert built[W][1] == 2 * built[1.0][1] == built[W][3] and built[W][2] == 2 * built[1.0][2]
    assert not torch.equal(built[W][0], built[1.0][0])
    # The build's guided eps, directly.
    buf = DynamicBuffer((1, 8, 8), 8, _terms(), torch.device("cpu"), labels=plan, guidance=W, teacher=unet)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([100, 500, 900]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        eps, _ = buf._eps(unet, x, t, y)
        c, u = predict(unet, x, t, y), predict(unet, x, t, torch.full((3,), 3))
    assert torch.equal(eps, u + W * (c - u))


def test_buffer_guidance_refusals_and_fingerprint() -> None:
    from o2mcli.distill.fit import settings_diff
    from o2mcli.distill.modes.dkdm import DKDM
    from o2mcli.stages.distill import DistillConfig, _fingerprint

    # A buffer cannot guide without a null condition.
    with pytest.raises(OptionError, match="buffer_guidance"):
        DynamicBuffer((1, 8, 8), 8, _terms(), torch.device("cpu"), guidance=2.0, teacher=_class_unet())
    with pytest.raises(OptionError, match="buffer_guidance"):
        DynamicBuffer((1, 8, 8), 8, _terms(), torch.device("cpu"), labels=LabelPlan(("a", "b"), None, 0.0),
                      guidance=2.0, teacher=_class_unet())
    # The mode refuses W != 1 under an unconditional teacher or one without a null class, in one line.
    mode = DKDM(DistillConfig(mode="dkdm", buffer_guidance=2.0))
    for labels, word in ((None, "unconditional"), (LabelPlan(("a", "b"), None, 0.0), "no null class")):
        mode.labels = labels
        with pytest.raises(OptionError, match=word) as e:
            mode._check_guidance(Path("teacher.safetensors"))
        assert "\n" not in str(e.value)
    mode.labels = LabelPlan(("a", "b"), 2, 0.1)
    mode._check_guidance(Path("teacher.safetensors"))
    # Another mode has no buffer to guide.
    with pytest.raises(OptionError, match="no buffer"):
        DistillConfig(mode="o2mkd", buffer_guidance=2.0)
    with pytest.raises(Exception):
        DistillConfig(mode="dkdm", buffer_guidance=-1.0)
    # The checkpoint fingerprint holds W (a resume with another W is refused by name); W = 1 keeps the old one.
    plain, w1, w2 = (_fingerprint(DistillConfig(mode="dkdm", **kw)) for kw in ({}, {"buffer_guidance": 1.0},
                                                                                 {"buffer_guidance": 2.0}))
    assert plain == w1 and "buffer_guidance" not in w1 and w2["buffer_guidance"] == 2.0 and w2 != w1
    assert "--buffer-guidance" in settings_diff(w1, w2)


def _student_json(path: Path) -> Path:
    path.write_text(json.dumps(unet_config(sample_size=8, channels=1, variance="learned", block_out_channels=(8, 16),
                                           norm_num_groups=2, num_classes=10)))
    return path


DKDM_FAST = ["--mode", "dkdm", "--rho", "0.01", "--init-steps", "2", "--steps", "2", "--batch-size", "8",
             "--device", "cpu", "--lr-warmup", "0"]


def test_buffer_guidance_through_the_cli(in_tmp: Path) -> None:
    """--buffer-guidance W runs, is recorded (config and summary), changes the run; W = 1 is the default run."""
    spec = _student_json(in_tmp / "s.json")
    base = ["--student-config", spec, "--teacher", "digits-cond-teacher", *DKDM_FAST]
    ok("distill", *base, "-o", "plain")
    ok("distill", *base, "--buffer-guidance", "1", "-o", "w1")
    ok("distill", *base, "--buffer-guidance", "3", "-o", "w3")
    for out, w in (("plain", 1.0), ("w1", 1.0), ("w3", 3.0)):
        man = read_manifest(in_tmp / out)
        assert man.config["buffer_guidance"] == w and man.summary["buffer"]["guidance"] == w
    plain, w1, w3 = (load_file(str(in_tmp / o / "student_0.safetensors")) for o in ("plain", "w1", "w3"))
    assert all(torch.equal(plain[k], w1[k]) for k in plain)
    assert any(not torch.equal(plain[k], w3[k]) for k in plain)
    assert read_manifest(in_tmp / "w3").summary["buffer"]["teacher_forwards"] == \
        2 * read_manifest(in_tmp / "plain").summary["buffer"]["teacher_forwards"]
    assert_refused(cli("distill", "--student-config", _plain_json(in_tmp / "p.json"), "--teacher", "digits-teacher",
                       *DKDM_FAST, "--buffer-guidance", "2", "-o", "x"), "--buffer-guidance 2.0", "unconditional")
    assert_refused(cli("distill", *base[:4], "--buffer-guidance", "2", "--steps", "2", "--device", "cpu", "-o", "y"),
                   "--buffer-guidance 2.0", "--mode o2mkd")
    assert not (in_tmp / "x").exists() and not (in_tmp / "y").exists()


def _plain_json(path: Path) -> Path:
    path.write_text(json.dumps(unet_config(sample_size=8, channels=1, variance="learned", block_out_channels=(8, 16),
                                           norm_num_groups=2)))
    return path


# 3. Guidance at or below 1: no guidance -----------------------------------------------------------------------------

@pytest.mark.parametrize("w", [1.0, 0.5, 0.0])
def test_guidance_at_or_below_one_is_one_conditional_forward(w: float) -> None:
    unet = _class_unet("learned")
    calls: list[torch.Tensor] = []
    unet.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["class_labels"]), with_kwargs=True)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor(500), torch.tensor([0, 2])
    with torch.no_grad():
        c = unet(x, t, class_labels=y).sample
        calls.clear()
        got = guided(unet, x, t, y, w, 3, 1)
    assert len(calls) == 1 and calls[0].tolist() == [0, 2] and torch.equal(got, c)
    text = tiny_sd_unet(layers_per_block=1)
    calls.clear()
    text.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["encoder_hidden_states"]), with_kwargs=True)
    z, e, neg = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.randn(1, 5, 32)
    with torch.no_grad():
        c = predict(text, z, t, e)
        calls.clear()
        got = guided(text, z, t, e, w, neg, 4)
    assert len(calls) == 1 and torch.equal(calls[0], e) and torch.equal(got, c)


def test_sample_guidance_zero_is_plain_conditional_and_class_null_is_the_null_class(in_tmp: Path) -> None:
    for g, out in (("0", "g0"), ("0.5", "g05"), ("1", "g1")):
        ok("sample", "digits-cond-teacher", "--class", "3", "--guidance", g, *SAMPLE, "-o", out)
    imgs = {o: np.load(in_tmp / o / "samples.npz")["images"] for o in ("g0", "g05", "g1")}
    assert np.array_equal(imgs["g0"], imgs["g1"]) and np.array_equal(imgs["g05"], imgs["g1"])
    assert read_manifest(in_tmp / "g0").summary["guidance"] == 0.0
    # The null class (the unconditional branch) has its own spelling now: no labels saved, nothing to guide.
    ok("sample", "digits-cond-teacher", "--class", "null", *SAMPLE, "-o", "null")
    with np.load(in_tmp / "null" / "samples.npz") as z:
        assert "labels" not in z.files and not np.array_equal(z["images"], imgs["g1"])
    s = read_manifest(in_tmp / "null").summary
    assert s["classes"] == {"null": 6} and s["guidance"] == 1.0
    assert_refused(cli("sample", "digits-cond-teacher", "--class", "null", "--guidance", "2", *SAMPLE, "-o", "x"),
                   "--guidance 2.0", "null class")
    assert_refused(cli("sample", "digits-teacher", "--class", "null", *SAMPLE, "-o", "x"),
                   "--class 'null'", "not class-conditional")


def test_score_counts_one_call_per_step_at_guidance_one(tmp_path: Path) -> None:
    """A text model's MACs per sampling step: x2 only where guidance ran (w > 1)."""
    from o2mcli.manifest import parent_ref, write_manifest
    from o2mcli.outputs import atomic_dir
    from o2mcli.stages.score import ScoreConfig, measure_model
    from sd_tiny import save_tiny_sd

    pipe = save_tiny_sd(tmp_path / "pipe")
    rows = {}
    for w in (1.0, 0.0, 7.5):
        d = tmp_path / f"s{w}"
        with atomic_dir(d) as tmp:
            np.savez(tmp / "samples.npz", images=np.zeros((2, 16, 16, 3), np.uint8), prompts=np.array(["a", "b"]))
            write_manifest(tmp, "samples", {"model": str(pipe), "scheduler": "ddim", "steps": 2, "guidance": w},
                           parents=[parent_ref(pipe)], summary={"n": 2, "guidance": w})
        rows[w] = measure_model(read_manifest(d), d, torch.device("cpu"),
                                ScoreConfig(samples=[d], throughput_batch=1, throughput_repeats=1, device="cpu"))
    assert rows[1.0]["macs_cfg"] == rows[1.0]["macs"] == rows[0.0]["macs_cfg"]
    assert rows[7.5]["macs_cfg"] == 2 * rows[7.5]["macs"] and "x2" in rows[7.5]["macs_what"]
    assert "x2" not in rows[1.0]["macs_what"] and "one call" in rows[1.0]["macs_what"]


# 4. The sample command's small things ------------------------------------------------------------------------------

def test_refusals_name_the_flag_and_value_as_typed(in_tmp: Path) -> None:
    for value in ("10", "-1"):
        res = cli("sample", "digits-cond-teacher", "--class", value, *SAMPLE, "-o", "x")
        assert_refused(res, f"--class {value}:", "0..9")
        assert "--classes" not in res.stderr
    res = cli("sample", "digits-cond-teacher", "--class", "three", *SAMPLE, "-o", "x")
    assert_refused(res, "--class 'three'")
    assert "--classes" not in res.stderr
    assert_refused(cli("sample", "digits-cond-teacher", "--class", "1,2", *SAMPLE, "-o", "x"), "--class", "--classes")
    assert_refused(cli("sample", "digits-cond-teacher", "--classes", "10", *SAMPLE, "-o", "x"), "--classes 10:")
    res = cli("sample", "digits-teacher", "--prompt", "a cat", *SAMPLE, "-o", "x")
    assert_refused(res, "--prompt 'a cat':", "not text-conditioned")
    assert "('a cat',)" not in res.stderr
    assert not (in_tmp / "x").exists()


@pytest.mark.parametrize("w", ["1e300", "1e10", "101"])
def test_absurd_guidance_is_refused_up_front(in_tmp: Path, w: str) -> None:
    res = cli("sample", "digits-cond-teacher", "--guidance", w, *SAMPLE, "-o", "x")
    assert_refused(res, "--guidance", "at most 100")
    assert "model is broken" not in res.stderr and not (in_tmp / "x").exists()


def test_non_finite_samples_blame_guidance_when_it_ran(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import o2mcli.diffusion.sampler as sampler

    monkeypatch.setattr(sampler, "sample_images", lambda *a, **k: np.full((6, 1, 8, 8), np.nan, np.float32))
    res = cli("sample", "digits-cond-teacher", "--guidance", "40", *SAMPLE, "-o", "x")
    assert_refused(res, "--guidance 40.0", "non-finite", "likely cause")
    assert "model is broken" not in res.stderr
    assert_refused(cli("sample", "digits-cond-teacher", *SAMPLE, "-o", "x"), "non-finite", "model is broken")


def test_deepcache_at_or_above_the_steps_says_so(in_tmp: Path) -> None:
    res = cli("sample", "digits-teacher", "--deepcache", "10", *SAMPLE, "-o", "dc")
    assert res.exit_code == 0, res.output
    notes = [ln for ln in res.stderr.splitlines() if ln.startswith("note: ")]
    assert len(notes) == 1 and "--deepcache 10" in notes[0] and "only full step" in notes[0]
    dc = read_manifest(in_tmp / "dc").summary["deepcache"]
    assert (dc["full_calls"], dc["partial_calls"]) == (1, 2)  # one batch: step 0 full, the rest reuse its cache
    res = cli("sample", "digits-teacher", "--deepcache", "2", *SAMPLE, "-o", "dc2")
    assert res.exit_code == 0 and "note:" not in res.stderr
    res = cli("sample", "digits-teacher", "--deepcache", "4", "-n", "2", "--steps", "1", "--device", "cpu",
              "--no-png", "-o", "dc1")
    assert res.exit_code == 0 and "no step is partial" in res.stderr


# 5. Merges that would write non-finite weights ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def students(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two students of a tiny teacher's ratio-0.5 template (as conftest's distilled_students, for the module)."""
    from o2mcli.outputs import release_all
    from o2mcli.stages.prune import PruneConfig, run_prune

    root = tmp_path_factory.mktemp("merge")
    teacher = tiny_teacher_file(root / "teacher.safetensors")
    run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, out=root / "template"))
    release_all()  # what the in-process prune reserved (the CLI gives up its own)
    ok("distill", root / "template", "-k", "2", "--steps", "2", *FAST_DISTILL, "-o", root / "st")
    return root / "st"


@pytest.mark.parametrize("args,flag", [(["--lambda", "1e308"], "--lambda 1e+308"),
                                       (["--lambda", "1e300"], "--lambda 1e+300"),
                                       (["--weights", "1e308,1e308"], "--weights 1e+308,1e+308"),
                                       (["--lambda", "-1e300", "--weights", "1,1"], "--lambda -1e+300")])
def test_merge_refuses_non_finite_results_naming_option_and_tensor(students: Path, tmp_path: Path, args, flag) -> None:
    for out in ("m.safetensors", "mdir"):
        res = cli("merge", students, *args, "-o", tmp_path / out)
        assert_refused(res, flag, "merged tensor", "overflows")
        assert not (tmp_path / out).exists()


def test_merge_average_is_scale_free_and_finite_checks_any_cause(students: Path, tmp_path: Path) -> None:
    from o2mcli.merge.average import weighted_average

    ok("merge", students, "--method", "average", "-o", tmp_path / "a.safetensors")
    ok("merge", students, "--method", "average", "--weights", "1e308,1e308", "-o", tmp_path / "b.safetensors")
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    x, y = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}
    assert torch.equal(weighted_average(None, [x, y], [3e307, 1e307])["w"],
                       weighted_average(None, [x, y], [3.0, 1.0])["w"])
    # A student holding a NaN: refused naming that file and tensor, nothing written.
    src = students / "student_0.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    state = load_file(str(src))
    key = next(k for k, v in state.items() if v.dtype.is_floating_point)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata=meta)
    for method in ("task-arithmetic", "average"):
        res = cli("merge", bad, students / "student_1.safetensors", "--method", method, "-o", tmp_path / "m.safetensors")
        assert_refused(res, str(bad), key, "non-finite")
        assert not (tmp_path / "m.safetensors").exists()
