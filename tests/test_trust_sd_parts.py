"""Issue #23: Stable Diffusion pipelines with broken or mismatched parts, and scheduler configs out of range, are
refused in one line (exit 2) by every stage that reads them, never an internal error and never silently accepted;
and the sampler stays inside [0, T) whatever the steps and offset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import assert_refused, cli, ok, tiny_unet
from o2mcli.errors import O2MError
from sd_tiny import save_captioned, save_tiny_sd, student_config, tiny_sd_pipeline, tiny_tokenizer

pytest.importorskip("transformers")

FAST = ["-n", "1", "--steps", "2", "--device", "cpu"]


# Parts rebuilt with other sizes: their weights match their configs, so only the cross-check can refuse them --------

def _text_encoder(folder: Path, **changes) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
               num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, max_position_embeddings=77)
    CLIPTextModel(CLIPTextConfig(**{**cfg, **changes})).save_pretrained(folder / "text_encoder",
                                                                         safe_serialization=True)


def _vae(folder: Path, **changes) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    cfg = dict(block_out_channels=(16, 32), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16)
    AutoencoderKL(**{**cfg, **changes}).save_pretrained(folder / "vae", safe_serialization=True)


def _unet(folder: Path, **changes) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = {k: v for k, v in student_config((32, 64)).items() if not k.startswith("_")}
    UNet2DConditionModel(**{**cfg, **changes}).save_pretrained(folder, safe_serialization=True)


def _edit(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _two_tokens(d: Path) -> None:
    """vocab.json and merges.txt that load (transformers builds a tokenizer of the specials alone)."""
    tok = d / "tokenizer"
    (tok / "tokenizer.json").unlink()
    (tok / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (tok / "merges.txt").write_text("#version: 0.2\n")


def _unknown_only(d: Path) -> None:
    """400 tokens, none a byte symbol: every word is unknown, so distinct prompts encode alike."""
    tok = d / "tokenizer"
    (tok / "tokenizer.json").unlink()
    (tok / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1,
                                                **{f"zz{i}</w>": i + 2 for i in range(400)}}))
    (tok / "merges.txt").write_text("#version: 0.2\n")


def _vocab_only(d: Path) -> None:
    tiny_tokenizer(d / "tokenizer")  # writes vocab.json and merges.txt beside tokenizer.json
    for name in ("tokenizer.json", "merges.txt"):
        (d / "tokenizer" / name).unlink()


def _empty_tokenizer(d: Path) -> None:
    for p in (d / "tokenizer").iterdir():
        p.unlink()


# name -> (how the pipeline is broken, words its one-line refusal must hold)
BROKEN: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "long-tokens": (lambda d: _edit(d / "tokenizer" / "tokenizer_config.json", model_max_length=100),
                    ("tokenizer", "model_max_length 100", "max_position_embeddings 77")),
    "bad-tokenizer-json": (lambda d: (d / "tokenizer" / "tokenizer.json").write_text('{"model": 5}'),
                           ("tokenizer", "not a readable CLIP tokenizer")),
    "empty-tokenizer": (_empty_tokenizer, ("tokenizer", "no vocabulary")),
    "no-tokenizer-json": (lambda d: (d / "tokenizer" / "tokenizer.json").unlink(), ("tokenizer", "no vocabulary")),
    "vocab-without-merges": (_vocab_only, ("tokenizer", "no vocabulary")),
    "two-tokens": (_two_tokens, ("tokenizer", "a vocabulary of 2 tokens")),
    "unknown-only": (_unknown_only, ("tokenizer", "to the same ids", "prompts would be ignored")),
    "vocab-past-encoder": (lambda d: _text_encoder(d, vocab_size=300), ("tokenizer", "vocab_size 300")),
    "wide-text": (lambda d: _text_encoder(d, hidden_size=64),
                  ("wide-text/text_encoder: hidden_size 64 but wide-text/unet takes cross_attention_dim 32",)),
    "latents-8": (lambda d: _vae(d, latent_channels=8),
                  ("latents-8/vae: latent_channels 8 but latents-8/unet has in_channels 4 and out_channels 4",)),
    "sdxl-unet": (lambda d: _unet(d / "unet", addition_embed_type="text_time", addition_time_embed_dim=8,
                                  projection_class_embeddings_input_dim=32 + 6 * 8),
                  ("sdxl-unet/unet", "addition_embed_type 'text_time'", "SDXL")),
    "grey-vae": (lambda d: _vae(d, out_channels=1), ("grey-vae/vae", "out_channels 1", "RGB")),
    "scheduler-offset": (lambda d: _edit(d / "scheduler" / "scheduler_config.json", steps_offset=100000),
                         ("scheduler_config.json", "steps_offset = 100000", "[0, 999]")),
}


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sdparts")
    save_tiny_sd(root / "sd")
    return root


@pytest.fixture
def sd_tmp(sd_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "sd").symlink_to(sd_root / "sd")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _broken(root: Path, name: str) -> Path:
    d = root / name
    shutil.copytree(root / "sd", d)
    BROKEN[name][0](d)
    return d


# 1. Every broken or mismatched pipeline: info and sample (and the teacher of a distill) refuse in one line ---------

@pytest.mark.parametrize("name", sorted(BROKEN))
def test_info_and_sample_refuse_a_broken_pipeline(sd_tmp: Path, name: str) -> None:
    _broken(sd_tmp, name)
    words = BROKEN[name][1]
    assert_refused(cli("info", name), *words)
    assert_refused(cli("sample", name, "--prompt", "a red cat", *FAST, "-o", "out"), *words)
    assert not (sd_tmp / "out").exists()


@pytest.mark.parametrize("name", ["wide-text", "two-tokens", "latents-8"])
def test_distill_refuses_a_broken_teacher_pipeline(sd_tmp: Path, name: str) -> None:
    _broken(sd_tmp, name)
    save_captioned(sd_tmp / "caps", n=4)
    (sd_tmp / "student.json").write_text(json.dumps(student_config()))
    assert_refused(cli("distill", "--student-config", "student.json", "--teacher", name, "--data", "caps", "-k", "1",
                       "--steps", "1", "-b", "2", "--device", "cpu", "-o", "st"), *BROKEN[name][1])
    assert not (sd_tmp / "st").exists()


def test_a_student_whose_recorded_pipeline_is_broken_is_refused(sd_tmp: Path) -> None:
    """resolve_parts: the pipeline a student's provenance names (hashes matching) is cross-checked too."""
    from o2mcli.models.configs import scheduler_config
    from o2mcli.models.families.stable_diffusion import text_conditioning
    from o2mcli.models.io import save_model_file

    bad = _broken(sd_tmp, "two-tokens")
    unet = tiny_sd_pipeline()[0]
    save_model_file(sd_tmp / "student.safetensors", unet, scheduler_config(), kind="students",
                    provenance={"conditioning": text_conditioning(bad)})
    assert_refused(cli("sample", "student.safetensors", "--prompt", "a red cat", *FAST, "-o", "out"),
                   "two-tokens/tokenizer", "a vocabulary of 2 tokens")


# 2. A model against the parts of the pipeline it is given (--pipeline): sample and export ---------------------------

def test_a_unet_that_does_not_fit_its_pipeline_is_refused_by_sample_and_export(sd_tmp: Path) -> None:
    """A foreign UNet (no o2m record, so no hashes) takes 32-wide text; pipe64 is consistent in itself (64-wide
    text encoder and UNet) but not with it. A broken pipeline given as --pipeline is refused too."""
    shutil.copytree(sd_tmp / "sd" / "unet", sd_tmp / "foreign")
    pipe64 = sd_tmp / "pipe64"
    shutil.copytree(sd_tmp / "sd", pipe64)
    _text_encoder(pipe64, hidden_size=64)
    _unet(pipe64 / "unet", cross_attention_dim=64)
    ok("info", "pipe64")  # consistent on its own
    want = "pipe64/text_encoder: hidden_size 64 but foreign takes cross_attention_dim 32"
    assert_refused(cli("sample", "foreign", "--pipeline", "pipe64", "--prompt", "a cat", *FAST, "-o", "out"), want)
    assert_refused(cli("export", "foreign", "--pipeline", "pipe64", "-o", "ex"),
                   "pipe64/text_encoder: hidden_size 64 but the UNet to export takes cross_attention_dim 32")
    _broken(sd_tmp, "latents-8")
    assert_refused(cli("export", "foreign", "--pipeline", "latents-8", "-o", "ex"), *BROKEN["latents-8"][1])
    assert not (sd_tmp / "out").exists() and not (sd_tmp / "ex").exists()
    ok("export", "foreign", "--pipeline", "sd", "-o", "ex")  # the matching pipeline still serves it


def test_a_standalone_sdxl_unet_is_refused_under_an_sd_pipeline(sd_tmp: Path) -> None:
    """An SDXL UNet loads (o2m serves SDXL), but not with a Stable Diffusion 1.x pipeline's parts."""
    _unet(sd_tmp / "xl", addition_embed_type="text_time", addition_time_embed_dim=8,
          projection_class_embeddings_input_dim=32 + 6 * 8)
    assert "its pipeline not recorded" in ok("info", "xl")
    assert_refused(cli("sample", "xl", "--pipeline", "sd", "--prompt", "a cat", *FAST, "-o", "out"),
                   "addition_embed_type 'text_time'", "StableDiffusionXLPipeline")


def test_working_tokenizer_layouts_still_load(sd_tmp: Path) -> None:
    """The hub's older layout (vocab.json, merges.txt and a config, no tokenizer.json) is a working tokenizer."""
    d = sd_tmp / "hub"
    shutil.copytree(sd_tmp / "sd", d)
    (d / "tokenizer" / "tokenizer.json").unlink()
    tiny_tokenizer(d / "tokenizer")
    ok("sample", "hub", "--prompt", "a red cat", *FAST, "-o", "out")


# 3. Scheduler configs: every field o2m's samplers read, in range; and no timestep outside [0, T) -------------------

def _sched_file(path: Path, T: int = 1000, **changes) -> Path:
    """A tiny o2m model file whose metadata carries the scheduler config with ``changes`` (not validated)."""
    from safetensors.torch import save_file

    from o2mcli.models.configs import scheduler_config
    from o2mcli.models.io import unet_config_of

    unet = tiny_unet()
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    meta = {"format": "o2m-denoiser/2", "o2m.kind": "teacher", "o2m.denoiser_config": json.dumps(unet_config_of(unet)),
            "o2m.scheduler_config": json.dumps({**scheduler_config("fixed", T), **changes}),
            "o2m.timestep_range": json.dumps([0, T]), "o2m.provenance": "{}"}
    save_file(state, str(path), metadata=meta)
    return path


def test_steps_offset_past_T_in_file_metadata_is_refused(in_tmp: Path) -> None:
    _sched_file(in_tmp / "m.safetensors", steps_offset=100000)
    for args in (["info", "m.safetensors"], ["sample", "m.safetensors", *FAST, "-o", "out"]):
        assert_refused(cli(*args), "m.safetensors", "steps_offset = 100000", "[0, 999]")


BAD_FIELDS = [
    ("steps_offset", -1), ("steps_offset", 1000), ("steps_offset", 1.5), ("steps_offset", True),
    ("timestep_spacing", "spread"), ("timestep_spacing", None), ("clip_sample_range", 0),
    ("clip_sample_range", float("inf")), ("clip_sample_range", float("nan")), ("clip_sample", "false"),
    ("thresholding", "yes"), ("dynamic_thresholding_ratio", 1.5), ("dynamic_thresholding_ratio", 0),
    ("sample_max_value", 0.5), ("sample_max_value", float("inf")), ("set_alpha_to_one", 1),
    ("variance_type", "wide"), ("rescale_betas_zero_snr", True), ("use_flow_sigmas", True),
    ("solver_type", "euler"), ("final_sigmas_type", "one"), ("algorithm_type", "ddim"), ("solver_order", 9),
    ("lambda_min_clipped", float("nan")), ("lambda_min_clipped", float("inf")), ("lambda_min_clipped", 3),
    ("_class_name", ["DDPMScheduler"]),
]


@pytest.mark.parametrize("key,value", BAD_FIELDS, ids=[f"{k}={v!r}" for k, v in BAD_FIELDS])
def test_scheduler_fields_out_of_range_are_refused_by_name(key: str, value) -> None:
    from o2mcli.models.configs import scheduler_config
    from o2mcli.models.io import check_scheduler_config

    with pytest.raises(O2MError, match=f"where: scheduler config (sets )?{key}"):
        check_scheduler_config({**scheduler_config(), key: value}, Path("where"))


def test_scheduler_combinations_diffusers_refuses_are_refused() -> None:
    from o2mcli.models.configs import scheduler_config
    from o2mcli.models.io import check_scheduler_config

    with pytest.raises(O2MError, match="use_karras_sigmas and use_beta_sigmas"):
        check_scheduler_config({**scheduler_config(), "use_karras_sigmas": True, "use_beta_sigmas": True}, Path("w"))
    with pytest.raises(O2MError, match="final_sigmas_type 'sigma_min'"):
        check_scheduler_config({**scheduler_config(), "algorithm_type": "dpmsolver"}, Path("w"))
    # what diffusers itself writes stays accepted: SD 1.x's DDPM, PNDM and DPM-Solver configs
    for extra in ({"steps_offset": 1, "timestep_spacing": "leading", "set_alpha_to_one": False,
                   "skip_prk_steps": True, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
                   "sample_max_value": 1.0, "clip_sample_range": 1.0, "rescale_betas_zero_snr": False},
                  {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                   "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": True,
                   "final_sigmas_type": "zero", "lambda_min_clipped": float("-inf"), "variance_type": None,
                   "use_flow_sigmas": False, "flow_shift": 1.0}):
        assert check_scheduler_config({**scheduler_config(), **extra}, Path("w")) == 1000


@pytest.mark.parametrize("scheduler,offset,steps", [(s, o, n) for s in ("ddpm", "ddim") for o, n in
                                                    ((1, 10), (9, 5), (9, 10))] + [("dpm++", 9, 5)])
def test_a_legal_offset_with_many_steps_samples_inside_the_schedule(in_tmp: Path, scheduler: str, offset: int,
                                                                   steps: int) -> None:
    """diffusers' "leading" grid plus steps_offset reaches T (SD's offset 1 at steps = T): an IndexError in DDPM and
    DDIM, and timesteps past T (NaN images) in DPM-Solver. Sampling now stays inside [0, T) and finishes."""
    from o2mcli.diffusion.schedulers import make_scheduler, set_steps
    from o2mcli.models.configs import scheduler_config

    model = _sched_file(in_tmp / "m.safetensors", T=10, steps_offset=offset, timestep_spacing="leading")
    ok("sample", model, "-n", "1", "--steps", str(steps), "--scheduler", scheduler, "--device", "cpu", "-o", "out")
    sched = make_scheduler(scheduler, {**scheduler_config("fixed", 10), "steps_offset": offset,
                                       "timestep_spacing": "leading"})
    set_steps(sched, steps)
    ts = [int(t) for t in sched.timesteps]
    assert 0 <= min(ts) and max(ts) == 9 and len(set(ts)) == len(ts)


@pytest.mark.parametrize("spacing", ["use_karras_sigmas", "use_beta_sigmas"])
def test_dpm_solver_sigma_spacings_at_many_steps_finish(spacing: str) -> None:
    """Rounded timesteps repeat under Karras or beta sigmas at many steps: diffusers refuses custom timesteps for
    them (the old fallback crashed), and a repeated first timestep made DPM-Solver step past its last sigma."""
    from o2mcli.diffusion.schedulers import make_scheduler, set_steps

    sched = make_scheduler("dpm++", {"num_train_timesteps": 1000, spacing: True})
    set_steps(sched, 999)
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x = sched.step(0.1 * torch.ones_like(x), t, x).prev_sample
    assert torch.isfinite(x).all()


def test_a_beta_schedule_a_sampler_lacks_is_refused_by_name(in_tmp: Path) -> None:
    _sched_file(in_tmp / "m.safetensors", beta_schedule="sigmoid")
    assert_refused(cli("sample", "m.safetensors", *FAST, "--scheduler", "ddim", "-o", "out"),
                   "--scheduler ddim", "sigmoid")
    ok("sample", "m.safetensors", *FAST, "--scheduler", "ddpm", "-o", "out")
