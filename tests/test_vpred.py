"""v-prediction (Salimans & Ho 2022) through every stage (issue #24, item 2): the parametrization's math, pixel UNets
trained and distilled with v targets, an eps student of a v teacher against the exact conversion, and a tiny SD 2.x
v-prediction pipeline from info to plain diffusers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_refused, cli, ok, tiny_unet
from o2mcli.diffusion.gaussian import q_sample
from o2mcli.diffusion.schedulers import schedule_terms
from o2mcli.models.configs import scheduler_config
from o2mcli.models.io import load_model, save_model_file
from o2mcli.models.parametrization import PARAMETRIZATIONS, check_prediction_type
from o2mcli.errors import O2MError

EPS, V = PARAMETRIZATIONS["epsilon"], PARAMETRIZATIONS["v_prediction"]
FAST = ["--steps", "6", "-b", "8", "--lr-warmup", "1", "--device", "cpu", "--log-every", "2", "--save-every", "100"]


def _batch(seed: int = 0, T: int = 1000):
    terms = schedule_terms(scheduler_config("fixed", T))
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((6, 1, 8, 8), generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    return terms, x0, noise, t, q_sample(terms, x0, t, noise)


# 1. The math ------------------------------------------------------------------------------------------------------

def test_v_target_recovers_eps_and_x0_exactly_and_conversion_round_trips() -> None:
    terms, x0, noise, t, x_t = _batch()
    v = V.target(terms, x0, noise, t)
    abar = terms.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(v, abar.sqrt() * noise - (1 - abar).sqrt() * x0)  # Salimans & Ho's definition
    assert torch.allclose(V.to_eps(terms, v, x_t, t), noise, atol=1e-5)
    assert torch.allclose(V.to_x0(terms, v, x_t, t), x0, atol=1e-4)
    # (eps -> x0 divides by sqrt(abar_t), 0.0064 at t = 999: float32 rounding of x_t grows ~150x there)
    assert torch.allclose(EPS.to_x0(terms, noise, x_t, t), x0, atol=2e-3)
    assert torch.allclose(EPS.convert(terms, noise, x_t, t, V), v, atol=1e-3)  # (from_eps divides by a_t too)
    assert torch.allclose(V.convert(terms, v, x_t, t, EPS), noise, atol=1e-5)
    assert EPS.convert(terms, noise, x_t, t, EPS) is noise  # the same space: no arithmetic, the same bits


def test_a_v_model_samples_as_its_exactly_converted_eps_model_in_diffusers() -> None:
    """diffusers' own v handling and o2m's conversion agree: DDIM on a v model equals DDIM on the eps model
    eps(x, t) = a_t v(x, t) + s_t x built from it (the conversion an eps student of a v teacher learns)."""
    from o2mcli.diffusion.sampler import denoise

    unet = tiny_unet()
    vcfg = {**scheduler_config("fixed"), "prediction_type": "v_prediction"}
    terms = schedule_terms(vcfg)

    class AsEps(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def forward(self, x, t, class_labels=None, return_dict=False):
            tt = t.expand(x.shape[0]) if t.ndim else t.reshape(1).expand(x.shape[0])
            out = self.inner(x, t).sample
            return (V.to_eps(terms, out, x, tt.long()),)

    from o2mcli.models.families import family_of

    fam = family_of(unet)
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    a = denoise(unet, "ddim", vcfg, 10, noise.clone())
    orig = fam.predict
    try:
        type(fam).predict = lambda self, model, x_t, t, cond=None: (
            model(x_t, t)[0] if isinstance(model, AsEps) else orig(model, x_t, t, cond))
        import o2mcli.models.denoise as dn

        real_family_of = dn.family_of
        dn.family_of = lambda m: fam if isinstance(m, AsEps) else real_family_of(m)
        b = denoise(AsEps(unet), "ddim", scheduler_config("fixed"), 10, noise.clone())
    finally:
        type(fam).predict = orig
        dn.family_of = real_family_of
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_prediction_types_outside_the_registry_are_refused_by_name() -> None:
    assert check_prediction_type(None, "x") == "epsilon"
    assert check_prediction_type("v_prediction", "x") == "v_prediction"
    for bad, word in (("sample", "x0-prediction"), ("flow_prediction", "flow-matching"), ("velocity", "unknown"),
                      (3, "expected one of")):
        with pytest.raises(O2MError, match=word):
            check_prediction_type(bad, "cfg.json")


def test_the_diffusion_loss_regresses_the_v_target() -> None:
    from o2mcli.distill.losses.base import Outputs
    from o2mcli.distill.losses.none import NoKD
    from o2mcli.distill.objective import Objective
    from o2mcli.distill.sources.base import Batch

    terms, x0, noise, t, x_t = _batch()
    pred = torch.randn(x0.shape)
    batch = Batch(x_t=x_t, t=t, x0=x0, noise=noise)
    out = Outputs(pred=pred, eps=V.to_eps(terms, pred, x_t, t))
    loss, _ = Objective(alpha=0.0, param=V)(NoKD({}, {}), out, None, batch, terms)
    want = ((pred - V.target(terms, x0, noise, t)) ** 2).mean()
    assert torch.allclose(loss, want)
    loss_eps, _ = Objective(alpha=0.0)(NoKD({}, {}), out, None, batch, terms)
    assert torch.allclose(loss_eps, ((pred - noise) ** 2).mean())


def test_kd_compares_in_the_students_space_with_the_teachers_output_converted() -> None:
    from o2mcli.distill.engine import split_outputs

    terms, x0, noise, t, x_t = _batch()
    raw_v = torch.randn((6, 2, 8, 8))  # a learned-variance v teacher's raw output
    teacher = split_outputs(raw_v, 1, True, {}, terms, x_t, t, V, EPS)
    a = terms.alphas_cumprod[t].reshape(-1, 1, 1, 1).sqrt()
    s = (1 - terms.alphas_cumprod[t].reshape(-1, 1, 1, 1)).sqrt()
    exact = a * raw_v[:, :1] + s * x_t  # eps = a v + s x_t
    assert torch.allclose(teacher.pred, exact) and torch.allclose(teacher.eps, exact)
    assert torch.equal(teacher.v, raw_v[:, 1:])
    same = split_outputs(raw_v, 1, True, {}, terms, x_t, t, V, V)
    assert torch.equal(same.pred, raw_v[:, :1])


# 2. Pixel UNets through the stages -----------------------------------------------------------------------------------

def _v_teacher(path: Path, variance: str = "fixed") -> Path:
    unet = tiny_unet(variance, seed=0, block_out_channels=(8, 16))
    save_model_file(path, unet, {**scheduler_config(variance), "prediction_type": "v_prediction"}, kind="teacher")
    return path


def test_train_learns_a_v_model_and_records_it(in_tmp: Path) -> None:
    ok("train", "--data", "digits", "--prediction-type", "v", "--channels", "8,16", "--norm-groups", "2",
       "--steps", "4", "-b", "8", "--device", "cpu", "-o", "tv.safetensors")
    loaded = load_model(in_tmp / "tv.safetensors")
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"
    assert "v_prediction" in ok("info", "tv.safetensors")
    assert_refused(cli("train", "--prediction-type", "sample", "--steps", "1", "-o", "x.safetensors"),
                   "--prediction-type")
    assert not (in_tmp / "x.safetensors").exists()


@pytest.mark.parametrize("variance", ["fixed", "learned"])
def test_a_v_teacher_through_prune_distill_merge_sample_score_export(in_tmp: Path, variance: str) -> None:
    _v_teacher(in_tmp / "t.safetensors", variance)
    ok("prune", "t.safetensors", "--ratio", "0.5", "--no-throughput", "-o", "tpl")
    assert load_model(in_tmp / "tpl").scheduler_config["prediction_type"] == "v_prediction"
    ok("distill", "tpl", "-k", "2", *FAST, "-o", "st")
    ok("distill", "tpl", "--mode", "dkdm", "--rho", "0.02", "--init-steps", "3", *FAST, "-o", "free")
    for run in ("st", "free"):
        assert load_model(in_tmp / run).scheduler_config["prediction_type"] == "v_prediction"
    ok("merge", "st", "-o", "merged.safetensors")
    for sched in ("ddpm", "ddim", "dpm++"):
        ok("sample", "st", "-n", "4", "--scheduler", sched, "--steps", "5", "--no-png", "-o", f"s-{sched}")
        images = np.load(in_tmp / f"s-{sched}" / "samples.npz")["images"]
        assert np.isfinite(images).all()
    ok("sample", "merged.safetensors", "-n", "4", "--steps", "5", "--no-png", "-o", "s-merged")
    table = ok("score", "s-ddim", "s-merged", "--ref", "digits", "--throughput-repeats", "1", "--throughput-batch",
               "2", "-o", "scores")
    assert "| merged.safetensors (ddim, 5 steps) |" in table and "| st (ddim, 5 steps) |" in table
    ok("export", "merged.safetensors", "-o", "pipe")
    cfg = json.loads((in_tmp / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["prediction_type"] == "v_prediction"
    code = ("import sys, numpy as np, torch\nfrom diffusers import DDPMPipeline\n"
            "p = DDPMPipeline.from_pretrained(sys.argv[1], local_files_only=True)\n"
            "assert p.scheduler.config.prediction_type == 'v_prediction'\n"
            "x = p(batch_size=2, num_inference_steps=3, output_type='np', generator=torch.Generator().manual_seed(0))\n"
            "assert np.isfinite(x.images).all()\n")
    res = subprocess.run([sys.executable, "-c", code, "pipe"], cwd=in_tmp, capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]


def test_an_eps_student_of_a_v_teacher_learns_the_exact_conversion(in_tmp: Path) -> None:
    """Students started from the v teacher's own weights but told to output eps: the KD target is the teacher's v
    converted (eps = a v + s x_t), so their KD loss falls from the mismatch; they record epsilon and sample."""
    _v_teacher(in_tmp / "t.safetensors")
    ok("prune", "t.safetensors", "--ratio", "0.5", "--no-throughput", "-o", "tpl")
    ok("distill", "tpl", "-k", "1", "--prediction-type", "eps", "--kd", "output", "--alpha", "1",
       "--steps", "30", "-b", "16", "--lr", "3e-3", "--lr-warmup", "1", "--device", "cpu", "--log-every", "1",
       "-o", "st")
    st = load_model(in_tmp / "st")
    assert st.scheduler_config["prediction_type"] == "epsilon"
    rows = [json.loads(line) for line in (in_tmp / "st" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if "kd" in r]
    assert kd[-1] < 0.7 * kd[0], kd
    ok("sample", "st", "-n", "2", "--steps", "4", "--no-png", "-o", "s")
    # The refusal of a parametrization the registry lacks, before anything is written.
    assert_refused(cli("distill", "tpl", "--prediction-type", "flow", *FAST, "-o", "bad"), "--prediction-type")
    assert not (in_tmp / "bad").exists()


# 3. A tiny SD 2.x v-prediction pipeline --------------------------------------------------------------------------

def _sd_v(folder: Path) -> Path:
    from sd_tiny import save_tiny_sd

    save_tiny_sd(folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(prediction_type="v_prediction", timestep_spacing="trailing")  # SD 2.x 768-v's
    cfg_path.write_text(json.dumps(cfg))
    return folder


def test_a_tiny_sd2_v_pipeline_through_every_stage(in_tmp: Path) -> None:
    pytest.importorskip("transformers")
    from sd_tiny import CAPTIONS, save_captioned

    _sd_v(in_tmp / "sd")
    save_captioned(in_tmp / "caps", n=8)
    (in_tmp / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
    assert "v_prediction" in ok("info", "sd")
    ok("prune", "sd", "--ratio", "0.5", "--no-throughput", "-o", "tpl")
    sd_fast = ["-k", "2", "--steps", "3", "-b", "4", "--lr-warmup", "1", "--device", "cpu", "--log-every", "1"]
    ok("distill", "tpl", "--data", "caps", *sd_fast, "-o", "st")
    ok("distill", "tpl", "--mode", "dkdm", "--prompts", "prompts.txt", "--rho", "0.01", "--init-steps", "2",
       *sd_fast, "-o", "free")
    assert load_model(in_tmp / "st").scheduler_config["prediction_type"] == "v_prediction"
    ok("merge", "st", "-o", "merged")
    ok("sample", "merged", "--prompt", "a red cat", "-n", "2", "--steps", "3", "--no-png", "-o", "s")
    ok("sample", "free", "--prompt", "a red cat", "-n", "2", "--steps", "3", "--no-png", "-o", "s-free")
    ok("export", "merged", "-o", "pipe")
    code = ("import sys, numpy as np, torch\nfrom diffusers import StableDiffusionPipeline\n"
            "p = StableDiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True)\n"
            "assert p.scheduler.config.prediction_type == 'v_prediction'\n"
            "x = p('a red cat', num_inference_steps=2, output_type='np', height=16, width=16,\n"
            "      generator=torch.Generator().manual_seed(0))\n"
            "assert np.isfinite(x.images).all()\n")
    res = subprocess.run([sys.executable, "-c", code, "pipe"], cwd=in_tmp, capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
