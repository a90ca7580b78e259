"""The samplers users run (issue #25): pndm, euler, euler-a, unipc, dpm++2m and dpm++2m-karras in o2m's one sampler
loop equal plain diffusers on an exported pixel model and an exported Stable Diffusion pipeline, for the same seed;
their timesteps stay inside [0, T) (PNDM keeps its repeated timestep); a K-student group routes their steps; guidance
at or below 1 is one forward per step; and ``o2m sample --scheduler euler-a`` writes samples.

The references below are written against diffusers alone (no o2m code): the canonical loop on the exported UNet for
pixels (DDPMPipeline does not call ``scale_model_input``, which the sigma-based samplers need), and
``StableDiffusionPipeline`` with its scheduler swapped by ``from_config`` for Stable Diffusion.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, make_model_stage, ok, tiny_scheduler, tiny_unet
from o2mcli.diffusion.schedulers import SAMPLERS, make_scheduler, set_steps
from o2mcli.manifest import read_manifest
from o2mcli.models.configs import scheduler_config
from o2mcli.models.io import save_model_file
from o2mcli.stages.sample import SampleConfig, run_sample

NEW = ["pndm", "euler", "euler-a", "unipc", "dpm++2m", "dpm++2m-karras"]


def plain_scheduler(name: str, config):
    """The diffusers scheduler ``name`` stands for, built as a diffusers user would swap it in."""
    import diffusers as d

    cls, args = {
        "pndm": (d.PNDMScheduler, {"skip_prk_steps": True}),
        "euler": (d.EulerDiscreteScheduler, {}),
        "euler-a": (d.EulerAncestralDiscreteScheduler, {}),
        "unipc": (d.UniPCMultistepScheduler, {}),
        "dpm++2m": (d.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "dpm++2m-karras": (d.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                           "use_karras_sigmas": True}),
    }[name]
    return cls.from_config(config, **args)


def o2m_images(monkeypatch: pytest.MonkeyPatch, cfg: SampleConfig) -> np.ndarray:
    """``o2m sample``'s images as floats in [0, 1], before the stage rounds them to uint8 for samples.npz."""
    import o2mcli.diffusion.sampler as sampler

    real, got = sampler.sample_images, []

    def keep(*args, **kwargs):
        got.append(real(*args, **kwargs))
        return got[-1]

    monkeypatch.setattr(sampler, "sample_images", keep)
    run_sample(cfg)
    return got[0]


# 1. Registered, documented, built as named -------------------------------------------------------------------------

def test_the_option_offers_every_registered_sampler_and_the_help_names_each() -> None:
    choices = typing.get_args(SampleConfig.model_fields["scheduler"].annotation)
    assert list(choices) == list(SAMPLERS)
    for name in SAMPLERS:
        assert name in SampleConfig.model_fields["scheduler"].description


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", NEW + ["dpm++"])
def test_make_scheduler_builds_the_named_scheduler_without_variance_type(name: str, prediction: str) -> None:
    """Only ddpm reads a learned variance; every other sampler gets the config without ``variance_type``."""
    cfg = {**scheduler_config("learned"), "prediction_type": prediction}
    sched = make_scheduler(name, cfg)
    ref = plain_scheduler("dpm++2m" if name == "dpm++" else name,
                          {k: v for k, v in cfg.items() if k != "variance_type"})
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert type(sched) is type(ref) and public(sched.config) == public(ref.config)
    assert sched.config.prediction_type == prediction
    assert getattr(sched.config, "variance_type", None) is None


NEW_BAD_FIELDS = [("interpolation_type", "cubic"), ("timestep_type", "continuous"), ("disable_corrector", "all"),
                  ("disable_corrector", [-1]), ("solver_p", {"_class_name": "DDIMScheduler"}), ("sigma_min", 0),
                  ("sigma_max", float("inf")), ("predict_x0", "yes")]


@pytest.mark.parametrize("key,value", NEW_BAD_FIELDS, ids=[f"{k}={v!r}" for k, v in NEW_BAD_FIELDS])
def test_fields_the_new_samplers_read_are_checked_by_name(key: str, value) -> None:
    from o2mcli.errors import O2MError
    from o2mcli.models.configs import check_scheduler_config

    with pytest.raises(O2MError, match=f"where: scheduler config {key}"):
        check_scheduler_config({**scheduler_config(), key: value}, Path("where"))


def test_a_config_a_scheduler_rejects_when_setting_its_steps_is_one_line() -> None:
    """Past the load-time checks (a config built in code), diffusers' own refusal is an O2MError naming the sampler."""
    from o2mcli.diffusion.sampler import denoise
    from o2mcli.errors import O2MError

    with pytest.raises(O2MError, match="--scheduler euler: .*cubic"):
        denoise(tiny_unet(), "euler", {**scheduler_config(), "interpolation_type": "cubic"}, 2, torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("name", NEW)
def test_configs_diffusers_writes_for_each_sampler_are_accepted(name: str) -> None:
    """A pipeline that ships any of these schedulers' saved configs loads (SDXL ships Euler's, SD 1.x PNDM's)."""
    from o2mcli.models.configs import check_scheduler_config

    cfg = {k: v for k, v in plain_scheduler(name, scheduler_config()).config.items() if k != "_use_default_values"}
    assert check_scheduler_config({"_class_name": "X", **cfg}, Path("w")) == 1000


# 2. Timesteps: inside [0, T), distinct unless by design, step i is timestep i ------------------------------------

CONFIGS = {"o2m's DDPM": {}, "SD 1.x (leading, offset 1)": {"timestep_spacing": "leading", "steps_offset": 1},
           "leading, offset 9": {"timestep_spacing": "leading", "steps_offset": 9},
           "linspace": {"timestep_spacing": "linspace"}, "trailing": {"timestep_spacing": "trailing"}}


@pytest.mark.parametrize("name", NEW)
def test_set_steps_keeps_timesteps_in_range_and_distinct_unless_by_design(name: str) -> None:
    for label, extra in CONFIGS.items():
        for steps in (1, 2, 7, 25, 333, 999, 1000):
            sched = make_scheduler(name, {**tiny_scheduler(), **extra})
            set_steps(sched, steps)
            ts = [float(t) for t in sched.timesteps]
            where = (label, steps)
            assert 0 <= min(ts) and max(ts) <= 999, where
            if name == "pndm":  # PLMS's second timestep twice: provisional step, then the averaged eps
                assert len(ts) == steps + (steps > 1), where
                if steps > 1:
                    assert ts[1] == ts[2], where
                    ts = ts[:2] + ts[3:]
            else:
                assert len(ts) == steps, where
            assert ts == sorted(ts, reverse=True), where
            if name != "dpm++2m-karras":  # Karras sigmas round to repeated timesteps at many steps, by design
                assert len(set(ts)) == len(ts), where
            if hasattr(sched, "begin_index"):
                assert sched.begin_index == 0, where


@pytest.mark.parametrize("name", NEW)
def test_every_sampler_finishes_at_as_many_steps_as_T(name: str) -> None:
    """A repeated or out-of-range timestep is 0/0 in a multistep update or an IndexError: every step stays finite,
    with SD's leading spacing and offset too (UniPC's leading grid put all 1000 steps at one timestep)."""
    T = 50
    for extra in ({}, {"timestep_spacing": "leading", "steps_offset": 1}):
        sched = make_scheduler(name, {**tiny_scheduler(T=T), **extra})
        set_steps(sched, T)
        x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
        for t in sched.timesteps:
            model_in = sched.scale_model_input(x, t)
            x = sched.step(0.1 * model_in, t, x).prev_sample
        assert torch.isfinite(x).all() and max(float(t) for t in sched.timesteps) <= T - 1, (name, extra)


@pytest.mark.parametrize("name", ["unipc", "euler-a"])
def test_retiming_by_sigmas_reproduces_diffusers_own_grid(name: str) -> None:
    """UniPC and Euler ancestral take no custom timesteps: set_steps interpolates their sigmas at the wanted
    timesteps as their ``set_timesteps`` does. Given diffusers' own grid, that gives diffusers' own sigmas."""
    from o2mcli.diffusion.schedulers import _use_timesteps

    for steps in (7, 25):
        sched = make_scheduler(name, tiny_scheduler())
        sched.set_timesteps(steps)
        ts, sigmas = sched.timesteps.clone(), sched.sigmas.clone()
        _use_timesteps(sched, [float(t) for t in ts])
        assert torch.equal(sched.timesteps, ts) and torch.equal(sched.sigmas, sigmas)


# 3. o2m's sampling equals plain diffusers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pixel_exports(tmp_path_factory) -> dict[str, Path]:
    """Exported DDPMPipeline directories: the shipped digits teacher (eps, learned variance, clip_sample) and a tiny
    random v-prediction teacher (fixed variance)."""
    root = tmp_path_factory.mktemp("pixel")
    save_model_file(root / "v.safetensors", tiny_unet(seed=3, block_out_channels=(8, 16)),
                    {**scheduler_config("fixed"), "prediction_type": "v_prediction"}, kind="teacher")
    ok("export", "digits-teacher", "-o", root / "digits")
    ok("export", root / "v.safetensors", "-o", root / "v")
    return {"digits-teacher": root / "digits", "v-tiny": root / "v"}


def plain_pixel_loop(pipe_dir: Path, name: str, steps: int, n: int, batch: int, seed: int) -> np.ndarray:
    """Plain diffusers on the exported pipeline: the canonical sampling loop, batch i from seed + i, the final
    sample clamped to [-1, 1] and mapped to [0, 1] (as DDPMPipeline and o2m do)."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(pipe_dir / "unet", local_files_only=True).eval()
    base = DDPMScheduler.from_pretrained(pipe_dir / "scheduler", local_files_only=True).config
    c, size = unet.config.in_channels, unet.config.sample_size
    out = []
    for i, start in enumerate(range(0, n, batch)):
        sched = plain_scheduler(name, base)
        sched.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed + i)
        latents = torch.randn((min(batch, n - start), c, size, size), generator=g) * sched.init_noise_sigma
        kw = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
        with torch.no_grad():
            for t in sched.timesteps:
                model_in = sched.scale_model_input(latents, t)
                eps = unet(model_in, t).sample[:, :c]  # a learned-variance model's eps half
                latents = sched.step(eps, t, latents, **kw).prev_sample
        out.append(((latents.clamp(-1, 1) + 1) / 2).numpy())
    return np.concatenate(out)


@pytest.mark.parametrize("model", ["digits-teacher", "v-tiny"])
@pytest.mark.parametrize("name", NEW)
def test_pixel_sampling_equals_plain_diffusers(monkeypatch, tmp_path, pixel_exports, name: str, model: str) -> None:
    """Bit for bit on CPU: the same UNet calls on the same inputs, the same scheduler steps, the same generators.
    Max |difference| measured: 0 for every sampler on both models."""
    steps, n, batch, seed = 25, 4, 2, 3
    ours = o2m_images(monkeypatch, SampleConfig(model=str(pixel_exports[model]), scheduler=name, steps=steps, n=n,
                                                batch_size=batch, seed=seed, device="cpu", png=False,
                                                out=tmp_path / "s"))
    theirs = plain_pixel_loop(pixel_exports[model], name, steps, n, batch, seed)
    diff = float(np.abs(ours - theirs).max())
    print(f"pixel {model} {name}: max |o2m - diffusers| = {diff:.3g}")
    assert ours.shape == theirs.shape == (n, 1, 8, 8) and ours.std() > 0.05
    assert diff == 0.0


@pytest.fixture(scope="module")
def sd_export(tmp_path_factory) -> Path:
    """The tiny SD 1.x pipeline, exported by o2m as a StableDiffusionPipeline directory."""
    pytest.importorskip("transformers")
    from sd_tiny import save_tiny_sd

    root = tmp_path_factory.mktemp("sd")
    save_tiny_sd(root / "sd")
    ok("export", root / "sd", "-o", root / "pipe")
    return root / "pipe"


@pytest.mark.parametrize("guidance", [7.5, 1.0])
@pytest.mark.parametrize("name", NEW)
def test_sd_sampling_equals_plain_diffusers(monkeypatch, tmp_path, sd_export: Path, name: str,
                                            guidance: float) -> None:
    """Two prompts, 5 steps, guidance 7.5 against the empty prompt (or 1: none, in both): o2m's ``sample`` against
    plain ``StableDiffusionPipeline`` with the scheduler swapped by ``from_config``, the same seed. Bit for bit on
    CPU although the guided batch is stacked the other way round (o2m: cond then uncond; diffusers: uncond then cond):
    each sample's UNet output does not depend on its place in the batch. Max |difference| measured: 0 for every
    sampler, at both weights."""
    from diffusers import StableDiffusionPipeline

    prompts, steps, seed = ("a red cat", "a blue dog"), 5, 4
    ours = o2m_images(monkeypatch, SampleConfig(model=str(sd_export), scheduler=name, steps=steps, n=2, batch_size=2,
                                                seed=seed, prompt=prompts, guidance=guidance, device="cpu", png=False,
                                                out=tmp_path / "s"))
    pipe = StableDiffusionPipeline.from_pretrained(sd_export, local_files_only=True)
    pipe.scheduler = plain_scheduler(name, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                  generator=torch.Generator().manual_seed(seed)).images  # (N, H, W, 3)
    diff = float(np.abs(ours.transpose(0, 2, 3, 1) - theirs).max())
    print(f"sd {name} guidance {guidance}: max |o2m - diffusers| = {diff:.3g}")
    assert ours.shape == (2, 3, 16, 16) and ours.std() > 0.01
    assert diff == 0.0


# 4. Guidance at or below 1: one forward per step, no unconditional branch -----------------------------------------

@pytest.mark.parametrize("name", NEW)
def test_guidance_at_or_below_one_is_one_forward_per_step(name: str) -> None:
    from o2mcli.diffusion.sampler import denoise
    from sd_tiny import tiny_sd_unet

    unet = tiny_sd_unet(layers_per_block=1)
    batches: list[int] = []
    unet.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    cfg = tiny_scheduler()
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, 32, generator=g), torch.randn(1, 3, 32, generator=g)
    sched = make_scheduler(name, cfg)
    set_steps(sched, 3)
    calls = len(sched.timesteps)  # PNDM: 4 calls for 3 steps
    for w, per_call in ((1.0, 2), (0.5, 2), (0.0, 2), (7.5, 4)):
        batches.clear()
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        x = denoise(unet, name, cfg, 3, noise, generator=torch.Generator().manual_seed(2), cond=cond, guidance=w,
                    uncond=uncond, clamp=False)
        assert batches == [per_call] * calls, (w, batches)
        assert torch.isfinite(x).all()


# 5. A group of K = 2 students routes every sampler's steps --------------------------------------------------------

def test_a_group_routes_fractional_timesteps_by_value() -> None:
    """Euler's linspace grid has fractional timesteps (999 / 6 = 166.5 apart at 7 steps): t = 499.5 lies in [0, 500)."""
    from o2mcli.models.group import StudentGroup

    group = StudentGroup([tiny_unet(), tiny_unet(seed=1)], ((0, 500), (500, 1000)))
    for t, k in ((0.0, 0), (499.5, 0), (499.99, 0), (500.0, 1), (832.5, 1), (999.0, 1)):
        assert group.take(torch.tensor(t, dtype=torch.float32), 1) == k, t


@pytest.mark.parametrize("name", NEW)
def test_two_students_serve_their_ranges_under_every_sampler(monkeypatch, tmp_path, name: str) -> None:
    import o2mcli.models.io as mio

    ranges = ((0, 500), (500, 1000))
    students = make_model_stage(tmp_path / "students", "students", ranges)
    seen: dict[int, list[float]] = {0: [], 1: []}
    real_load = mio.load_model

    def load_and_watch(path, device="cpu"):
        loaded = real_load(path, device)
        for k, unet in enumerate(loaded.unet.students):
            unet.register_forward_pre_hook(
                lambda mod, args, k=k: seen[k].append(float(torch.as_tensor(args[1]).reshape(-1)[0])))
        return loaded

    monkeypatch.setattr(mio, "load_model", load_and_watch)
    steps, n = 7, 2
    out = run_sample(SampleConfig(model=str(students), scheduler=name, steps=steps, n=n, batch_size=n, device="cpu",
                                  png=False, out=tmp_path / "s"))
    sched = make_scheduler(name, tiny_scheduler())
    set_steps(sched, steps)
    ts = [float(t) for t in sched.timesteps]
    for k, (lo, hi) in enumerate(ranges):
        assert seen[k] == [t for t in ts if lo <= t < hi] and seen[k], (k, ts)
    assert read_manifest(out).summary["served"] == [n * len(seen[0]), n * len(seen[1])]
    assert np.isfinite(np.load(out / "samples.npz")["images"]).all()


# 6. The CLI -------------------------------------------------------------------------------------------------------

def test_cli_sample_with_euler_a_writes_samples_and_dpmpp_is_dpmpp2m(in_tmp: Path, tiny_model_file: Path) -> None:
    out = ok("sample", tiny_model_file, "--scheduler", "euler-a", "--steps", "4", "-n", "3", "--device", "cpu",
             "-o", "s")
    assert out.startswith("wrote s: 3 images")
    with np.load(in_tmp / "s" / "samples.npz") as z:
        images = z["images"]
    assert images.shape == (3, 8, 8, 1) and images.std() > 0
    assert len(list((in_tmp / "s" / "png").iterdir())) == 3
    assert read_manifest(in_tmp / "s").config["scheduler"] == "euler-a"
    for name in ("dpm++", "dpm++2m"):
        ok("sample", tiny_model_file, "--scheduler", name, "--steps", "4", "-n", "2", "--device", "cpu", "--no-png",
           "-o", name)
    a, b = (np.load(in_tmp / name / "samples.npz")["images"] for name in ("dpm++", "dpm++2m"))
    assert np.array_equal(a, b)
    res = cli("sample", tiny_model_file, "--scheduler", "euler_a", "-n", "1", "-o", "bad")
    assert res.exit_code == 2 and "euler_a" in res.stderr and not (in_tmp / "bad").exists()
