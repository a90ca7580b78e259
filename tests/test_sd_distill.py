"""o2m distill under a Stable Diffusion teacher (issue #13): O2MKD on a captioned folder's cached latents with caption
dropout, DKDM from a prompt list, the refusals, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_refused, cli, crash_at_step
from sd_tiny import CAPTIONS, save_captioned, save_tiny_sd, student_config

pytest.importorskip("transformers")

FAST = ["--steps", "3", "-b", "4", "--device", "cpu", "--log-every", "1"]


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sd")
    save_tiny_sd(root / "sd")
    save_captioned(root / "caps")
    (root / "student.json").write_text(json.dumps(student_config()))
    (root / "prompts.txt").write_text("a red cat\n\n  a blue dog  \n")
    return root


@pytest.fixture
def sd_tmp(sd_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("sd", "caps", "student.json", "prompts.txt"):
        (tmp_path / name).symlink_to(sd_root / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _student_args() -> list[str]:
    return ["--student-config", "student.json", "--teacher", "sd"]


# O2MKD on captions --------------------------------------------------------------------------------------------------

def test_o2mkd_trains_on_cached_latents_with_their_captions(sd_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from o2mcli.models.families import stable_diffusion as sd
    from o2mcli.models.families.stable_diffusion import encode_prompts, load_sd_parts

    # 1. The teacher sees each batch's captions' embeddings (or the empty prompt's): recorded at every call.
    seen = []
    from o2mcli.models.families.unet2d_condition import UNet2DCondition

    real_predict = UNet2DCondition.predict

    def spy(self, model, x_t, t, cond=None):
        seen.append(None if cond is None else cond.tokens.detach().clone())  # the Condition's text tokens
        return real_predict(self, model, x_t, t, cond)

    monkeypatch.setattr(UNet2DCondition, "predict", spy)
    r = cli("distill", *_student_args(), "--data", "caps", "-k", "2", "--label-dropout", "0.5", *FAST, "-o", "st")
    assert r.exit_code == 0, r.output
    monkeypatch.setattr(UNet2DCondition, "predict", real_predict)
    parts = load_sd_parts(Path("sd"), unet=False)
    allowed = encode_prompts(parts, CAPTIONS + [""])
    rows = torch.cat([c.reshape(-1, *allowed.shape[1:]) for c in seen if c is not None and c.shape[1] == 77])
    # every condition is one of the captions' embeddings or the empty prompt's; both kinds occur at dropout 0.5
    match = ((rows[:, None] - allowed[None]).abs().amax(dim=(2, 3)) < 1e-5)
    assert bool(match.any(1).all())
    assert match[:, -1].any() and match[:, :-1].any()

    # 2. The students record the text conditioning: the pipeline by path and hashes, the dropout used.
    man = json.loads(Path("st/manifest.json").read_text())
    cond = man["summary"]["conditioning"]
    assert cond["type"] == "text" and cond["caption_dropout"] == 0.5
    assert cond["pipeline"] == str(Path("sd").resolve()) and set(cond["hashes"]) == {"vae", "text_encoder", "tokenizer"}
    from o2mcli.models.io import load_model

    assert load_model(Path("st")).conditioning == cond

    # 3. The cache: built once beside the run, reused by the next run (the encoders never run again).
    cache = sd_tmp / "caps.latents-16"
    assert (cache / "o2m_latent_cache.json").is_file()
    calls = {"n": 0}
    real_encode = sd.encode_images

    def counting(*a, **k):
        calls["n"] += 1
        return real_encode(*a, **k)

    monkeypatch.setattr(sd, "encode_images", counting)
    r = cli("distill", *_student_args(), "--data", "caps", "-k", "1", *FAST, "-o", "st2")
    assert r.exit_code == 0, r.output
    assert calls["n"] == 0
    # Default dropout: SD's 0.1 for a teacher that records none.
    assert json.loads(Path("st2/manifest.json").read_text())["summary"]["conditioning"]["caption_dropout"] == 0.1


def test_caption_dropout_replaces_captions_with_the_empty_prompt_at_its_rate() -> None:
    from o2mcli.data.labels import text_plan
    from o2mcli.diffusion.schedulers import schedule_terms
    from o2mcli.distill.sources import ImageSource
    from o2mcli.models.configs import scheduler_config

    n = 400
    emb = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1).expand(n, 3, 2).contiguous()
    plan = text_plan([f"c{i}" for i in range(n)], emb, torch.full((1, 3, 2), -1.0), 0.25, {"pipeline": "p"})
    src = ImageSource(torch.zeros(n, 4, 2, 2), schedule_terms(scheduler_config("fixed")), torch.device("cpu"),
                      torch.arange(n), plan.null_class, plan.dropout, plan.cond)
    b = src.draw(0, 1000, 4000, torch.Generator().manual_seed(0))
    assert b.cond.tokens.shape == (4000, 3, 2)  # the text condition: tokens of the drawn captions
    dropped = (b.cond.tokens[:, 0, 0] == -1).float().mean()
    assert 0.22 < float(dropped) < 0.28
    assert plan.record() == {"pipeline": "p", "type": "text", "caption_dropout": 0.25}


# DKDM from prompts --------------------------------------------------------------------------------------------------

def test_dkdm_slots_carry_prompts_and_resume_bit_for_bit(sd_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    args = ["distill", *_student_args(), "--mode", "dkdm", "--prompts", "prompts.txt", "--rho", "0.01",
            "--init-steps", "3", "--steps", "4", "-b", "4", "--device", "cpu", "--save-every", "2"]
    r = cli(*args, "-o", "full")
    assert r.exit_code == 0, r.output
    assert "each with one of 2 prompts" in r.output
    man = json.loads(Path("full/manifest.json").read_text())
    assert man["summary"]["conditioning"]["type"] == "text"
    undo = crash_at_step(monkeypatch, 4)
    assert cli(*args, "-o", "cut").exit_code != 0
    undo()
    r = cli(*args, "-o", "cut", "--resume")
    assert r.exit_code == 0, r.output
    a, b = load_file("full/student_0.safetensors"), load_file("cut/student_0.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# Refusals -----------------------------------------------------------------------------------------------------------

def test_refusals(sd_tmp: Path, tiny_model_file: Path) -> None:
    Path("empty.txt").write_text("\n  \n")
    Path("nocaps").mkdir()
    (Path("nocaps") / "a.png").write_bytes(Path("caps/000.png").read_bytes())
    cases = [
        (["--mode", "dkdm", "--prompts", "empty.txt"], ("empty.txt", "no prompt")),
        (["--mode", "dkdm", "--prompts", "missing.txt"], ("missing.txt", "no such prompt file")),
        (["--mode", "dkdm"], ("--prompts", "prompt list")),
        (["--data", "nocaps"], ("nocaps", "metadata.jsonl")),
        ([], ("--data", "captions")),
        (["--data", "caps", "--prompts", "prompts.txt"], ("--prompts", "dkdm")),
    ]
    for extra, words in cases:
        assert_refused(cli("distill", *_student_args(), *extra, *FAST, "-o", "x"), *words)
    # A pixel teacher takes no prompts; an SD teacher takes no pixel student.
    assert_refused(cli("distill", str(tiny_model_file), "--teacher", str(tiny_model_file), "--mode", "dkdm",
                       "--prompts", "prompts.txt", *FAST, "-o", "x"), "prompts", "not text-conditioned")
    pixel = {"_class_name": "UNet2DModel", "block_out_channels": [8, 16], "sample_size": 8, "in_channels": 4,
             "out_channels": 4, "norm_num_groups": 4, "down_block_types": ["DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D"], "layers_per_block": 1}
    Path("pixel.json").write_text(json.dumps(pixel))
    assert_refused(cli("distill", "--student-config", "pixel.json", "--teacher", "sd", "--data", "caps", *FAST,
                       "-o", "x"), "pixel.json", "not text-conditioned")
    wide = {**student_config(), "cross_attention_dim": 16}
    Path("wide.json").write_text(json.dumps(wide))
    assert_refused(cli("distill", "--student-config", "wide.json", "--teacher", "sd", "--data", "caps", *FAST,
                       "-o", "x"), "cross_attention_dim 16", "width 32")
    assert not Path("x").exists()


def test_latent_cache_and_pipeline_options(sd_tmp: Path) -> None:
    """--latent-cache puts the cache where asked; --pipeline must hold the teacher's own parts (sha256), and is
    refused for a pixel teacher."""
    r = cli("distill", *_student_args(), "--data", "caps", "-k", "1", "--latent-cache", "my-cache", *FAST, "-o", "st")
    assert r.exit_code == 0, r.output
    assert (sd_tmp / "my-cache" / "o2m_latent_cache.json").is_file()
    assert not (sd_tmp / "caps.latents-16").exists()
    other = save_tiny_sd(sd_tmp / "other", seed=1)  # another pipeline: other VAE and text encoder weights
    assert_refused(cli("distill", *_student_args(), "--data", "caps", "--pipeline", str(other), *FAST, "-o", "x"),
                   "other", "differs")
    assert_refused(cli("distill", "digits-teacher", "--teacher", "digits-teacher", "--pipeline", "sd", *FAST,
                       "-o", "x"), "pipeline", "not text-conditioned")
    assert not Path("x").exists()
