"""``o2m score`` on Stable Diffusion samples: CLIP score from local weights, FID, MACs per call and per guided step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_refused, cli
from sd_tiny import clip_forward, save_tiny_clip, save_tiny_sd, tiny_tokenizer
from o2mcli.errors import O2MError
from o2mcli.outputs import atomic_dir
from o2mcli.manifest import parent_ref, read_manifest, write_manifest
from o2mcli.scoring.clip import SCALE, check_clip_dir, clip_score, clip_scores, load_clip
from o2mcli.scoring.features import INCEPTION_FILE
from test_score import fake_inception

PROMPTS = ["a photo of cat", "a red dog", "blue digit seven", "a photo of three", "dog", "cat of red"]


# Fixtures: a tiny SD pipeline, a tiny CLIP model, samples with prompts -------------------------------------

def make_sd_samples(path: Path, model: Path, images: np.ndarray, prompts: list[str] | None) -> Path:
    """A samples stage directory as ``o2m sample`` writes it for a text-conditioned model (prompts beside images)."""
    with atomic_dir(path) as tmp:
        extra = {} if prompts is None else {"prompts": np.array(prompts)}
        np.savez(tmp / "samples.npz", images=images, **extra)
        cfg = {"model": str(model), "scheduler": "ddim", "steps": 2, "seed": 0, "n": len(images), "batch_size": 4,
               "device": "cpu", "guidance": 7.5}
        write_manifest(tmp, "samples", cfg, parents=[parent_ref(model)], summary={"n": len(images)})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdscore")
    pipe = save_tiny_sd(root / "pipe")
    images = np.random.RandomState(0).randint(0, 256, size=(len(PROMPTS), 16, 16, 3)).astype(np.uint8)
    ref = root / "ref"
    ref.mkdir()
    from PIL import Image

    for i, im in enumerate(np.random.RandomState(1).randint(0, 256, size=(12, 16, 16, 3)).astype(np.uint8)):
        Image.fromarray(im).save(ref / f"{i:03d}.png")
    return {"root": root, "pipe": pipe, "clip": save_tiny_clip(root / "clip"), "ref": ref,
            "inception": fake_inception(root / INCEPTION_FILE),
            "samples": make_sd_samples(root / "samples", pipe, images, PROMPTS),
            "bare": make_sd_samples(root / "bare", pipe, images, None)}


def direct_clip_score(clip_dir: Path, images: np.ndarray, prompts: list[str]) -> float:
    """torchmetrics' recipe written against transformers directly: CLIPProcessor + CLIPModel.forward's logits."""
    model, out = clip_forward(clip_dir, images, prompts)
    cos = out.logits_per_image.diagonal().double() / model.logit_scale.exp().double()  # logits = exp(s) * cos
    return float((100 * cos.mean()).clamp_min(0).detach())  # torchmetrics clamps the mean


# 1. The CLIP score itself -------------------------------------------------------------------------------

def test_clip_score_scaling_is_torchmetrics() -> None:
    """100 * cos per pair (any length, not clamped); the score clamps their mean at 0, as torchmetrics does."""
    img = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0], [2.0, 0.0]])
    txt = torch.tensor([[5.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    got = clip_scores(img, txt)
    assert SCALE == 100.0
    torch.testing.assert_close(got, torch.tensor([100.0, 0.0, 100 / 2 ** 0.5, -100.0], dtype=torch.float64))
    assert clip_score(got / SCALE) == pytest.approx(100 / 2 ** 0.5 / 4)
    with pytest.raises(O2MError, match="matched"):
        clip_scores(img, txt[:2])


def test_clip_score_equals_an_independent_transformers_computation(world) -> None:
    scorer = load_clip(world["clip"], "cpu", batch_size=4)  # batches of 4 over 6 images: batching is exercised
    images = np.load(world["samples"] / "samples.npz")["images"]
    got = scorer.score(images, PROMPTS)
    want = direct_clip_score(world["clip"], images, PROMPTS)
    assert got["n"] == len(PROMPTS) and got["truncated_prompts"] == 0
    assert got["mean"] == pytest.approx(want, rel=1e-5, abs=1e-4)
    # Each image is paired with its own prompt: another pairing gives another score.
    assert scorer.score(images, PROMPTS[::-1])["mean"] != pytest.approx(got["mean"], abs=1e-6)
    # The test tokenizer knows "cat" as one token, so 100 of them overrun CLIP's 77: cut and counted.
    assert len(scorer.tokenizer("cat")["input_ids"]) == 3
    long = ["cat " * 100] + PROMPTS[1:]
    assert scorer.score(images, long)["truncated_prompts"] == 1
    info = scorer.info()
    assert info["image_size"] == 32 and "max(100 * mean(cos" in info["scaling"] and len(info["weights_sha256"]) == 64


def test_clip_preprocessing_without_a_preprocessor_config(tmp_path: Path, world) -> None:
    """No preprocessor_config.json: CLIP's own mean/std at the model's image size, same numbers as with one."""
    bare = save_tiny_clip(tmp_path / "clip", preprocessor=False)
    images = np.load(world["samples"] / "samples.npz")["images"]
    a, b = load_clip(bare), load_clip(world["clip"])
    assert a.pixels(images).shape == (len(images), 3, 32, 32)
    torch.testing.assert_close(a.pixels(images), b.pixels(images))
    assert a.score(images, PROMPTS)["mean"] == pytest.approx(b.score(images, PROMPTS)["mean"], rel=1e-6)
    assert "CLIP defaults" in a.preprocessing and "0.4815" in a.preprocessing
    gray = images[..., :1]
    torch.testing.assert_close(a.pixels(gray), a.pixels(np.repeat(gray, 3, -1)))


def test_clip_weights_refusals(tmp_path: Path, world) -> None:
    import shutil

    with pytest.raises(O2MError, match="no such directory"):
        check_clip_dir(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(O2MError, match="not a directory"):
        check_clip_dir(tmp_path / "file")
    # The SD pipeline's text encoder is CLIP's text tower alone: not a CLIPModel.
    with pytest.raises(O2MError, match="not a CLIP model.*clip_text_model"):
        check_clip_dir(world["pipe"] / "text_encoder")
    pickled = tmp_path / "pickled"
    shutil.copytree(world["clip"], pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(O2MError, match="only pytorch_model.bin found; o2m loads safetensors weights only"):
        check_clip_dir(pickled)
    no_tok = tmp_path / "notok"
    shutil.copytree(world["clip"], no_tok)
    for name in ("tokenizer.json", "vocab.json"):
        (no_tok / name).unlink(missing_ok=True)
    with pytest.raises(O2MError, match="no tokenizer files"):
        check_clip_dir(no_tok)
    wrong = tmp_path / "wrong"
    shutil.copytree(world["clip"], wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["projection_dim"] = 24
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(O2MError) as e:
        load_clip(wrong)
    assert "\n" not in str(e.value) and str(wrong) in str(e.value)


def test_sample_prompts_are_read_without_pickle(tmp_path: Path, world) -> None:
    from o2mcli.data.samples import load_sample_prompts

    assert load_sample_prompts(world["samples"], len(PROMPTS)) == PROMPTS
    assert load_sample_prompts(world["bare"], len(PROMPTS)) is None
    with pytest.raises(O2MError, match="must be 5 unicode strings"):
        load_sample_prompts(world["samples"], 5)
    d = tmp_path / "obj"
    d.mkdir()
    np.savez(d / "samples.npz", images=np.zeros((2, 4, 4, 3), np.uint8), prompts=np.array(["a", "b"], dtype=object))
    with pytest.raises(O2MError, match="unreadable 'prompts'"):
        load_sample_prompts(d, 2)
    np.savez(d / "samples.npz", images=np.zeros((2, 4, 4, 3), np.uint8), prompts=np.array([1, 2]))
    with pytest.raises(O2MError, match="unicode strings"):
        load_sample_prompts(d, 2)


# 2. The stage on SD samples ------------------------------------------------------------------------------
# One scoring run (FID's 2048-d matrix square root costs ~20 s on a CPU), through the command a user types.

FAST = ["--throughput-batch", "2", "--throughput-repeats", "1", "--kid-subsets", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def scored(world) -> tuple[object, Path]:
    out = world["root"] / "scores"
    res = cli("score", world["samples"], "--ref", world["ref"], "--inception-weights", world["inception"],
              "--clip-weights", world["clip"], *FAST, "-o", out)
    return res, out


def test_score_sd_samples_fid_clip_and_macs(world, scored) -> None:
    from o2mcli.models.io import load_model
    from o2mcli.models.stats import count_macs, count_params

    res, out = scored
    assert res.exit_code == 0, res.output
    assert "CLIP score" in res.stdout and "MACs/step w/ CFG (G)" in res.stdout
    man = read_manifest(out)
    report = json.loads((out / "report.json").read_text())
    (row,) = report["rows"]
    # FID through clean-fid's Inception (faked here) on 16x16 RGB images against a folder.
    assert row["features"] == "inception" and np.isfinite(row["fid"]) and row["n_reference"] == 12
    # CLIP score: the independent computation's number.
    images = np.load(world["samples"] / "samples.npz")["images"]
    assert row["clip_score"] == pytest.approx(direct_clip_score(world["clip"], images, PROMPTS), rel=1e-5, abs=1e-4)
    assert report["clip"]["image_size"] == 32 and man.config["clip_weights"] == str(world["clip"])
    assert man.summary["rows"][0]["clip_score"] == row["clip_score"]
    # MACs: the UNet alone, one call on the 4x8x8 latent; x2 per guided step.
    unet = load_model(world["pipe"]).unet
    assert row["text_conditioned"] and row["macs"] == count_macs(unet) and row["macs_cfg"] == 2 * row["macs"]
    assert row["params"] == count_params(unet)
    assert "4x8x8 latent" in row["macs_what"] and "per UNet call" in row["macs_what"]
    assert "x2" in row["macs_what"]
    tp = row["throughput"]
    assert tp["images_per_s"] > 0 and "UNet latent denoising only" in tp["what"]
    md = (out / "report.md").read_text()
    assert "| MACs (G) | MACs/step w/ CFG (G) |" in md and "| CLIP score |" in md
    assert "per UNet call" in md and "per sampling step with classifier-free guidance (x2)" in md
    assert "CLIP score (Hessel et al. 2021) = max(100 * mean(cos" in md


def test_report_columns_follow_the_rows(scored) -> None:
    """Rows without a CLIP score or a text model keep the old table; a mixed table marks the gaps."""
    from o2mcli.scoring.report import markdown_table

    _, out = scored
    (row,) = json.loads((out / "report.json").read_text())["rows"]
    plain = {**row, "clip_score": None, "clip_cosine": None, "macs_cfg": None, "macs_what": None, "text_conditioned": False}
    assert "CLIP" not in markdown_table([plain]) and "CFG" not in markdown_table([plain])
    assert "CLIP" not in markdown_table([{**row, "clip_score": None}])
    mixed = markdown_table([row, plain]).splitlines()
    assert mixed[0].count("|") == mixed[2].count("|") == mixed[3].count("|")
    cols, cells = ([c.strip() for c in line.strip().strip("|").split("|")] for line in (mixed[0], mixed[3]))
    gaps = [cols[i] for i, c in enumerate(cells) if c == "-"]
    assert gaps == ["MACs/step w/ CFG (G)", "CLIP score", "CLIP cos"]  # what the plain row does not have


def test_cli_clip_refusals_are_one_line_and_write_nothing(world, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["score", "--ref", str(world["ref"]), "--inception-weights", str(world["inception"]), *FAST]
    assert_refused(cli(*base, world["bare"], "--clip-weights", world["clip"], "-o", "s1"),
                   "--clip-weights", "prompts", "samples.npz")
    assert_refused(cli(*base, world["samples"], "--clip-weights", tmp_path / "missing", "-o", "s2"),
                   "--clip-weights", "no such directory")
    assert_refused(cli(*base, world["samples"], "--clip-weights", world["pipe"] / "text_encoder", "-o", "s3"),
                   "not a CLIP model")
    assert not any((tmp_path / n).exists() for n in ("s1", "s2", "s3"))
