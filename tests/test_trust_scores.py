"""Issue #23, scores and sample files.

1. The CLIP score is torchmetrics' (the clamp is on the mean), with the raw mean cosine beside it (BK-SDM's and
   the O2MKD paper's number) in report.json and report.md.
2. OpenCLIP weights as the laion repos ship them (open_clip_config.json + open_clip_model.safetensors) score as
   the same model saved by transformers; the report records which CLIP model was used.
3. ``labels`` in samples.npz that are an object array, or no class of the model: one-line refusals.
4. A class-conditional model's samples used as ``--data`` carry their labels and the model's class names (the
   DKDM paper's synthetic-dataset baseline).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_refused, cli
from sd_tiny import clip_forward, save_tiny_sd, tiny_tokenizer
from test_score import fake_inception, make_samples_dir, small_cfg
from test_sd_score import PROMPTS, make_sd_samples
from o2mcli.errors import O2MError
from o2mcli.manifest import read_manifest, write_manifest

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
FAST_SCORE = ["--throughput-batch", "2", "--throughput-repeats", "1", "--kid-subsets", "3", "--device", "cpu"]


# Helpers: an independent torchmetrics formula, tiny CLIP models, and their OpenCLIP form ------------------------

def torchmetrics_clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """torchmetrics' CLIPScore restated: ``update`` sums ``100 * <img/|img|, txt/|txt|>`` over the pairs,
    ``compute`` returns ``max(sum / n, 0)``."""
    img = image_emb.double() / image_emb.double().norm(p=2, dim=-1, keepdim=True)
    txt = text_emb.double() / text_emb.double().norm(p=2, dim=-1, keepdim=True)
    total = (100 * (img * txt).sum(axis=-1)).sum(0)
    return float(torch.max(total / img.shape[0], torch.zeros_like(total)))


def save_clip(folder: Path, seed: int, act: str = "quick_gelu") -> Path:
    """A random transformers CLIPModel (width 32, 32x32 images in 8x8 patches), its tokenizer and processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, hidden_act=act)
    cfg = CLIPConfig(text_config=dict(**tower, vocab_size=1000, max_position_embeddings=77, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(**tower, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(folder.parent / f".{folder.name}-vocab").save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def transformers_embeddings(clip_dir: Path, images: np.ndarray, prompts: list[str]) -> tuple[torch.Tensor, ...]:
    """Image and text embeddings straight from transformers (CLIPProcessor + CLIPModel.forward), no o2m code."""
    _, out = clip_forward(clip_dir, images, prompts)
    return out.image_embeds, out.text_embeds


def to_open_clip(src: Path, dst: Path) -> Path:
    """The transformers CLIPModel in ``src`` written as OpenCLIP's hub layout, by OpenCLIP's own names (q, k, v
    stacked into ``in_proj``; the projections as (width, embed) matrices), with the tokenizer files beside it."""
    hf = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    vc, tc = cfg["vision_config"], cfg["text_config"]
    oc: dict[str, torch.Tensor] = {}

    def tower(hf_prefix: str, oc_prefix: str, layers: int) -> None:
        for i in range(layers):
            a, b = f"{hf_prefix}.encoder.layers.{i}", f"{oc_prefix}.resblocks.{i}"
            for kind in ("weight", "bias"):
                oc[f"{b}.attn.in_proj_{kind}"] = torch.cat([hf[f"{a}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
                oc[f"{b}.attn.out_proj.{kind}"] = hf[f"{a}.self_attn.out_proj.{kind}"]
                oc[f"{b}.ln_1.{kind}"] = hf[f"{a}.layer_norm1.{kind}"]
                oc[f"{b}.ln_2.{kind}"] = hf[f"{a}.layer_norm2.{kind}"]
                oc[f"{b}.mlp.c_fc.{kind}"] = hf[f"{a}.mlp.fc1.{kind}"]
                oc[f"{b}.mlp.c_proj.{kind}"] = hf[f"{a}.mlp.fc2.{kind}"]

    tower("vision_model", "visual.transformer", vc["num_hidden_layers"])
    tower("text_model", "transformer", tc["num_hidden_layers"])
    oc["visual.conv1.weight"] = hf["vision_model.embeddings.patch_embedding.weight"]
    oc["visual.class_embedding"] = hf["vision_model.embeddings.class_embedding"]
    oc["visual.positional_embedding"] = hf["vision_model.embeddings.position_embedding.weight"]
    for kind in ("weight", "bias"):
        oc[f"visual.ln_pre.{kind}"] = hf[f"vision_model.pre_layrnorm.{kind}"]
        oc[f"visual.ln_post.{kind}"] = hf[f"vision_model.post_layernorm.{kind}"]
        oc[f"ln_final.{kind}"] = hf[f"text_model.final_layer_norm.{kind}"]
    oc["visual.proj"] = hf["visual_projection.weight"].t().contiguous()
    oc["token_embedding.weight"] = hf["text_model.embeddings.token_embedding.weight"]
    oc["positional_embedding"] = hf["text_model.embeddings.position_embedding.weight"]
    oc["text_projection"] = hf["text_projection.weight"].t().contiguous()
    oc["logit_scale"] = hf["logit_scale"]
    assert vc["hidden_act"] == tc["hidden_act"]
    model_cfg = {
        "embed_dim": cfg["projection_dim"], "quick_gelu": vc["hidden_act"] == "quick_gelu",
        "vision_cfg": {"image_size": vc["image_size"], "layers": vc["num_hidden_layers"], "width": vc["hidden_size"],
                       "head_width": vc["hidden_size"] // vc["num_attention_heads"], "patch_size": vc["patch_size"],
                       "mlp_ratio": vc["intermediate_size"] / vc["hidden_size"]},
        "text_cfg": {"context_length": tc["max_position_embeddings"], "vocab_size": tc["vocab_size"],
                     "width": tc["hidden_size"], "heads": tc["num_attention_heads"], "layers": tc["num_hidden_layers"],
                     "mlp_ratio": tc["intermediate_size"] / tc["hidden_size"]},
    }
    dst.mkdir(parents=True)
    save_file(oc, str(dst / "open_clip_model.safetensors"))
    (dst / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD}}))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny CLIPs whose cosines on the test pairs have both signs (mean > 0) or a negative mean, in both forms."""
    root = tmp_path_factory.mktemp("clips")
    out = {"mixed": save_clip(root / "mixed", seed=7), "negative": save_clip(root / "negative", seed=3),
           "gelu": save_clip(root / "gelu", seed=7, act="gelu")}
    out["oc_mixed"] = to_open_clip(out["mixed"], root / "oc-mixed")
    out["oc_gelu"] = to_open_clip(out["gelu"], root / "oc-gelu")
    out["root"] = root
    return out


def images() -> np.ndarray:
    return np.random.RandomState(0).randint(0, 256, size=(len(PROMPTS), 16, 16, 3)).astype(np.uint8)


# 1. torchmetrics' CLIP score and the raw mean cosine -----------------------------------------------------------------

def test_clip_score_clamps_the_mean_not_each_pair() -> None:
    from o2mcli.scoring.clip import clip_cosines, clip_score

    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    txt = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])  # cosines 1, -1, 0.6
    cos = clip_cosines(img, txt)
    torch.testing.assert_close(cos, torch.tensor([1.0, -1.0, 0.6], dtype=torch.float64))
    assert clip_score(cos) == pytest.approx(torchmetrics_clip_score(img, txt)) == pytest.approx(20.0)
    # Every pair pointing away: torchmetrics gives 0 while the raw mean cosine stays negative.
    assert clip_score(clip_cosines(img[:2], -img[:2])) == 0.0 == torchmetrics_clip_score(img[:2], -img[:2])


@pytest.mark.parametrize("which", ["mixed", "negative"])
def test_clip_scorer_equals_torchmetrics_on_a_model(clips, which: str) -> None:
    from o2mcli.scoring.clip import load_clip

    ims = images()
    img_emb, txt_emb = transformers_embeddings(clips[which], ims, PROMPTS)
    cos = (torch.nn.functional.normalize(img_emb, dim=-1) * torch.nn.functional.normalize(txt_emb, dim=-1)).sum(-1)
    assert (cos < 0).any() and (cos.mean() > 0) == (which == "mixed")  # the two formulas differ on these pairs
    got = load_clip(clips[which], batch_size=4).score(ims, PROMPTS)
    assert got["mean"] == pytest.approx(torchmetrics_clip_score(img_emb, txt_emb), rel=1e-5, abs=1e-4)
    assert got["cosine"] == pytest.approx(float(cos.mean()), rel=1e-5, abs=1e-6)
    assert got["n"] == len(PROMPTS)


# 2. OpenCLIP directories ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("act", ["mixed", "gelu"])  # QuickGELU (OpenAI's) and GELU (OpenCLIP's default) towers
def test_open_clip_directory_scores_as_the_transformers_model(clips, act: str) -> None:
    from o2mcli.scoring.clip import load_clip

    ims = images()
    hf, oc = load_clip(clips[act]), load_clip(clips[f"oc_{act}"])
    assert (hf.format, oc.format) == ("transformers", "open_clip")
    torch.testing.assert_close(oc.pixels(ims), hf.pixels(ims))
    long = PROMPTS[:-1] + ["cat " * 100]  # cut at 77 tokens in both
    torch.testing.assert_close(oc.text_embeddings(long)[0], hf.text_embeddings(long)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oc.image_embeddings(ims), hf.image_embeddings(ims), atol=1e-5, rtol=1e-5)
    a, b = oc.score(ims, PROMPTS), hf.score(ims, PROMPTS)
    assert a["mean"] == pytest.approx(b["mean"], rel=1e-5, abs=1e-5)
    assert a["cosine"] == pytest.approx(b["cosine"], rel=1e-5, abs=1e-7)
    info = oc.info()
    assert info["format"] == "open_clip" and info["name"] == clips[f"oc_{act}"].name
    assert info["weight_files"] == ["open_clip_model.safetensors"]
    sha = hashlib.sha256((clips[f"oc_{act}"] / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert info["weights_sha256"] == sha
    assert ("quick_gelu" if act == "mixed" else "gelu") in info["architecture"].split("; ")[-1]


def _variant(clips, name: str) -> Path:
    dst = clips["root"] / name
    shutil.copytree(clips["oc_mixed"], dst)
    return dst


def test_open_clip_refusals_are_one_line(clips) -> None:
    from o2mcli.scoring.clip import check_clip_dir, load_clip

    def refused(path: Path, *words: str, load: bool = False) -> None:
        with pytest.raises(O2MError) as e:
            (load_clip if load else check_clip_dir)(path)
        msg = str(e.value)
        assert "\n" not in msg and all(w in msg for w in words), msg

    pickled = _variant(clips, "pickled")
    (pickled / "open_clip_model.safetensors").rename(pickled / "open_clip_pytorch_model.bin")
    refused(pickled, "open_clip_pytorch_model.bin", "pickle", "open_clip_model.safetensors")
    layer_scale = _variant(clips, "ls")
    found = json.loads((layer_scale / "open_clip_config.json").read_text())
    found["model_cfg"]["vision_cfg"]["ls_init_value"] = 0.1
    (layer_scale / "open_clip_config.json").write_text(json.dumps(found))
    refused(layer_scale, "open_clip_config.json", "ls_init_value")
    no_cfg = _variant(clips, "nocfg")
    (no_cfg / "open_clip_config.json").write_text(json.dumps({"preprocess_cfg": {}}))
    refused(no_cfg, "open_clip_config.json", "model_cfg")
    # The weights do not fit the config: a missing tensor, a tensor too many, a wrong shape.
    state = load_file(str(clips["oc_mixed"] / "open_clip_model.safetensors"))
    for name, edit, words in (
            ("missing", lambda s: s.pop("visual.ln_post.weight"), ("visual.ln_post.weight",)),
            ("extra", lambda s: s.update({"transformer.resblocks.9.ln_1.weight": torch.ones(32)}), ("resblocks.9",)),
            ("shape", lambda s: s.update({"visual.proj": torch.zeros(32, 8)}), ("do not match",))):
        bad = _variant(clips, name)
        s = dict(state)
        edit(s)
        save_file(s, str(bad / "open_clip_model.safetensors"))
        refused(bad, "open_clip_model.safetensors", *words, load=True)
    # No tokenizer beside the weights.
    no_tok = _variant(clips, "notok")
    for name in ("tokenizer.json", "vocab.json"):
        (no_tok / name).unlink(missing_ok=True)
    refused(no_tok, "no tokenizer files")


@pytest.fixture(scope="module")
def open_clip_scored(clips, tmp_path_factory) -> tuple[object, Path, Path]:
    root = tmp_path_factory.mktemp("ocscore")
    pipe = save_tiny_sd(root / "pipe")
    ref = root / "ref"
    ref.mkdir()
    from PIL import Image

    for i, im in enumerate(np.random.RandomState(1).randint(0, 256, size=(12, 16, 16, 3)).astype(np.uint8)):
        Image.fromarray(im).save(ref / f"{i:03d}.png")
    samples = make_sd_samples(root / "samples", pipe, images(), PROMPTS)
    res = cli("score", samples, "--ref", ref, "--inception-weights", fake_inception(root / "inception.pt"),
              "--clip-weights", clips["oc_mixed"], *FAST_SCORE, "-o", root / "scores")
    return res, root / "scores", root


def test_score_reports_torchmetrics_score_raw_cosine_and_the_clip_model(clips, open_clip_scored) -> None:
    res, out, _ = open_clip_scored
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    (row,) = report["rows"]
    img_emb, txt_emb = transformers_embeddings(clips["mixed"], images(), PROMPTS)
    cos = torch.nn.functional.cosine_similarity(img_emb.double(), txt_emb.double(), dim=-1)
    assert row["clip_score"] == pytest.approx(torchmetrics_clip_score(img_emb, txt_emb), rel=1e-5, abs=1e-4)
    assert row["clip_cosine"] == pytest.approx(float(cos.mean()), rel=1e-5, abs=1e-6)
    clip = report["clip"]
    assert clip["format"] == "open_clip" and clip["name"] == "oc-mixed"
    assert clip["weights_sha256"] == hashlib.sha256(
        (clips["oc_mixed"] / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert "max(100 * mean(cos" in clip["scaling"] and "raw mean cosine" in clip["scaling"]
    md = (out / "report.md").read_text()
    assert "| CLIP score | CLIP cos |" in md and f"| {row['clip_cosine']:.4f} |" in md
    assert "OpenCLIP" in md and "max(100 * mean(cos" in md
    assert read_manifest(out).summary["rows"][0]["clip_cosine"] == row["clip_cosine"]
    assert "CLIP cos" in res.stdout


def test_cli_refuses_a_pickled_open_clip_directory(clips, open_clip_scored, tmp_path: Path) -> None:
    _, _, root = open_clip_scored
    pickled = tmp_path / "oc"
    shutil.copytree(clips["oc_mixed"], pickled)
    (pickled / "open_clip_model.safetensors").rename(pickled / "open_clip_pytorch_model.bin")
    assert_refused(cli("score", root / "samples", "--ref", root / "ref", "--inception-weights",
                       root / "inception.pt", "--clip-weights", pickled, *FAST_SCORE, "-o", tmp_path / "s"),
                   "open_clip_pytorch_model.bin")
    assert not (tmp_path / "s").exists()


# 3. Labels in samples.npz --------------------------------------------------------------------------------------------

def class_model(path: Path, names: list[str], seed: int = 0) -> Path:
    """A tiny class-conditional UNet file on 1x8x8 images with o2m's conditioning record (null class last)."""
    from o2mcli.models.configs import scheduler_config, unet_config
    from o2mcli.models.io import build_unet, save_model_file

    torch.manual_seed(seed)
    cfg = unet_config(sample_size=8, channels=1, block_out_channels=(8, 16), norm_num_groups=2,
                      num_classes=len(names))
    cond = {"type": "class", "classes": names, "null_class": len(names), "label_dropout": 0.1}
    save_model_file(path, build_unet(cfg, None, path), scheduler_config(), kind="teacher",
                    provenance={"conditioning": cond})
    return path


def labelled_samples(path: Path, model: Path, labels: np.ndarray) -> Path:
    """Real digits as samples of ``model``, with ``labels`` written into samples.npz and the manifest resealed."""
    from o2mcli.data.digits import digits_arrays

    digits, _ = digits_arrays()
    u8 = np.clip(np.rint(digits[:len(labels)].astype(np.float64) / 16.0 * 255), 0, 255).astype(np.uint8)[..., None]
    make_samples_dir(path, model, u8)
    np.savez(path / "samples.npz", images=u8, labels=labels)
    man = read_manifest(path, verify=False)
    write_manifest(path, "samples", man.config, parents=man.parents, summary=man.summary)
    return path


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> Path:
    return class_model(tmp_path_factory.mktemp("cm") / "model.safetensors", [str(i) for i in range(10)])


def test_object_array_labels_are_refused(digits_model: Path, tmp_path: Path) -> None:
    d = labelled_samples(tmp_path / "obj", digits_model, np.array([1, 2, 3, 4] * 5, dtype=object))
    assert_refused(cli("score", d, *FAST_SCORE, "-o", tmp_path / "s"), str(d / "samples.npz"), "labels")
    assert_refused(cli("train", "--cond", "class", "--data", d, "--steps", "1", "--device", "cpu", "-o",
                       tmp_path / "t"), str(d / "samples.npz"), "labels")
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


@pytest.mark.parametrize("bad", [99, -1])
def test_labels_outside_the_models_classes_are_refused(digits_model: Path, tmp_path: Path, bad: int) -> None:
    labels = np.array([0, 1, 2, 3, bad] * 4, dtype=np.int64)
    d = labelled_samples(tmp_path / "bad", digits_model, labels)
    assert_refused(cli("score", d, *FAST_SCORE, "-o", tmp_path / "s"), str(d / "samples.npz"), f"labels {bad} ",
                   "0..9", str(digits_model))
    # As --data too: the labels index the model's classes.
    assert_refused(cli("train", "--cond", "class", "--data", d, "--steps", "1", "--device", "cpu", "-o",
                       tmp_path / "t"), str(d / "samples.npz"), f"labels {bad} ", "0..9")
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


def test_labels_without_the_model_are_bounded_by_the_classifier(digits_model: Path, tmp_path: Path) -> None:
    model = class_model(tmp_path / "m.safetensors", [str(i) for i in range(10)])
    d = labelled_samples(tmp_path / "bad", model, np.array([0, 1, 12, -3] * 5, dtype=np.int64))
    model.unlink()  # the samples travel without their model: the digits classifier's 10 classes bound the labels
    res = cli("score", d, *FAST_SCORE, "-o", tmp_path / "s")
    assert_refused(res, str(d / "samples.npz"), "-3, 12", "0..9", "classifier")


def test_labels_of_more_classes_than_the_classifier_get_no_accuracy(tmp_path: Path) -> None:
    from o2mcli.stages.score import run_score

    model = class_model(tmp_path / "twelve.safetensors", [f"c{i}" for i in range(12)])
    d = labelled_samples(tmp_path / "smp", model, np.arange(24, dtype=np.int64) % 12)
    (row,) = json.loads((run_score(small_cfg([d], tmp_path / "s")) / "report.json").read_text())["rows"]
    assert row["class_accuracy"] is None
    assert any("no class accuracy" in w and "10 classes" in w for w in row["warnings"])


# 4. Conditional samples as training data ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> dict[str, Path]:
    """A 10-class model and two of its sample sets: every class (20 images) and classes 2 and 5 only."""
    root = tmp_path_factory.mktemp("drawn")
    model = class_model(root / "teacher.safetensors", [f"digit-{i}" for i in range(10)], seed=1)
    for out, extra in (("all", []), ("two", ["--classes", "2,5"])):
        res = cli("sample", model, "-n", "20", "--steps", "2", "--device", "cpu", "--no-png", *extra, "-o", root / out)
        assert res.exit_code == 0, res.output
    return {"root": root, "model": model, "all": root / "all", "two": root / "two"}


def test_conditional_samples_load_with_labels_and_class_names(drawn) -> None:
    from o2mcli.data import load_dataset

    data = load_dataset(str(drawn["all"]))
    with np.load(drawn["all"] / "samples.npz") as z:
        want = z["labels"]
    assert data.labels is not None and data.labels.tolist() == want.tolist()
    assert data.classes == tuple(f"digit-{i}" for i in range(10))
    assert load_dataset(str(drawn["all"]), labels=False).labels is None
    two = load_dataset(str(drawn["two"]))
    assert two.classes == tuple(f"digit-{i}" for i in range(10)) and set(two.labels.tolist()) == {2, 5}


def test_dkdm_baseline_trains_and_distils_on_conditional_samples(drawn, tmp_path: Path) -> None:
    from o2mcli.models.configs import unet_config
    from o2mcli.models.io import load_model

    res = cli("train", "--cond", "class", "--data", drawn["all"], "--channels", "8,16", "--norm-groups", "2",
              "--batch-size", "8", "--steps", "2", "--save-every", "100", "--device", "cpu", "-o", tmp_path / "t")
    assert res.exit_code == 0, res.output
    assert load_model(tmp_path / "t").conditioning["classes"] == [f"digit-{i}" for i in range(10)]
    student = tmp_path / "student.json"
    student.write_text(json.dumps(unet_config(sample_size=8, channels=1, block_out_channels=(8, 16),
                                              norm_num_groups=2, num_classes=10)))
    res = cli("distill", "--student-config", student, "--teacher", drawn["model"], "--data", drawn["all"], "-k", "1",
              "--steps", "2", "--batch-size", "8", "--device", "cpu", "--lr-warmup", "0", "-o", tmp_path / "st")
    assert res.exit_code == 0, res.output
    assert load_model(tmp_path / "st").conditioning["classes"] == [f"digit-{i}" for i in range(10)]


def test_class_names_without_the_model(drawn, tmp_path: Path) -> None:
    """The model moved away: the manifest summary names every class when all were sampled, else a refusal."""
    from o2mcli.data import load_dataset

    hidden = drawn["model"].with_name("hidden.safetensors")
    drawn["model"].rename(hidden)
    try:
        assert load_dataset(str(drawn["all"])).classes == tuple(f"digit-{i}" for i in range(10))
        assert_refused(cli("train", "--cond", "class", "--data", drawn["two"], "--steps", "1", "--device", "cpu",
                           "-o", tmp_path / "t"), str(drawn["two"] / "samples.npz"), "class names cannot be determined",
                       str(drawn["model"]))
        # A reference for FID needs no class names.
        assert load_dataset(str(drawn["two"]), labels=False).labels is None
    finally:
        hidden.rename(drawn["model"])
    assert not (tmp_path / "t").exists()
