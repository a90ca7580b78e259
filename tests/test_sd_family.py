"""Stable Diffusion groundwork (issue #13): the tiny offline SD pipeline, the UNet2DConditionModel family behind
the denoiser interface, and the one-line refusal while the stages do not serve it yet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import assert_refused, cli
from o2mcli.errors import O2MError
from o2mcli.models.denoise import input_shape, predict
from o2mcli.models.families import FAMILIES, family_for_config, family_of
from sd_tiny import WORDS, save_tiny_sd, tiny_sd_pipeline, tiny_tokenizer

pytest.importorskip("transformers")


def test_tokenizer_is_written_offline_and_knows_whole_words(tmp_path: Path) -> None:
    tok = tiny_tokenizer(tmp_path / "tok")
    ids = tok("a photo of a cat").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 2 + 5  # each word is one token
    assert tok.decode(ids[1:-1]) == "a photo of a cat"
    assert len(set(tok(w).input_ids[1] for w in WORDS)) == len(WORDS)


def test_tiny_pipeline_saves_and_plain_diffusers_samples_it(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    folder = save_tiny_sd(tmp_path / "sd")
    assert {p.name for p in folder.iterdir()} >= {"model_index.json", "unet", "vae", "text_encoder", "tokenizer",
                                                  "scheduler"}
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    out = pipe("a red cat", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3)


def test_family_predicts_eps_from_text_embeddings(tmp_path: Path) -> None:
    unet, _, text, _ = tiny_sd_pipeline()
    tok = tiny_tokenizer(tmp_path / "tok")
    fam = family_of(unet)
    assert fam is FAMILIES["UNet2DConditionModel"] and input_shape(unet) == (4, 8, 8)
    ids = tok(["a red cat", "a blue dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = text(ids).last_hidden_state
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
        eps = predict(unet, x, t, emb)
        assert eps.shape == (2, 4, 8, 8)
        assert torch.allclose(eps, unet(x, t, encoder_hidden_states=emb).sample)
        assert not torch.allclose(predict(unet, x, t, emb.flip(0)), eps)  # the text changes the prediction
        assert predict(unet, x, t).shape == (2, 4, 8, 8)  # a zero stand-in condition, for shapes and MACs
    names = dict(unet.named_modules())
    assert all(n in names for n in fam.feature_points(unet)) and "mid_block" in fam.feature_points(unet)
    with pytest.raises(O2MError, match=r"text embeddings \(batch, tokens, dim\), got shape \(2, 3\)"):
        predict(unet, x, t, torch.zeros(2, 3))


def test_family_rebuilds_from_config_and_refuses_mismatches(tmp_path: Path) -> None:
    unet, _, _, _ = tiny_sd_pipeline()
    cfg = {**dict(unet.config), "_class_name": "UNet2DConditionModel"}
    fam = family_for_config(cfg, Path("c"))
    rebuilt = fam.build(cfg, unet.state_dict(), Path("c"))
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 5, 32)
    with torch.no_grad():
        assert torch.equal(predict(rebuilt, x, t, emb), predict(unet, x, t, emb))
    bad = {k: v for k, v in unet.state_dict().items() if not k.startswith("mid_block")}
    with pytest.raises(O2MError, match="c: config does not match the weights .missing mid_block"):
        fam.build(cfg, bad, Path("c"))
    with pytest.raises(O2MError, match="sample_size"):
        fam.check_config({**cfg, "sample_size": 10**6}, Path("c"))
    # The checks every UNet config gets, shared with UNet2DModel: a malformed size is one line, not a crash.
    with pytest.raises(O2MError, match=r"c: UNet config sample_size = \[8, 8, 8\]; expected an integer or"):
        fam.check_config({**cfg, "sample_size": [8, 8, 8]}, Path("c"))


def test_a_pipeline_loads_as_a_text_conditioned_model_naming_its_parts(tmp_path: Path) -> None:
    from o2mcli.models.io import load_model

    root = save_tiny_sd(tmp_path / "sd")
    loaded = load_model(root)
    cond = loaded.conditioning
    assert loaded.form == "diffusers-pipeline" and cond["type"] == "text"
    assert cond["pipeline"] == str(root.resolve()) and set(cond["hashes"]) == {"vae", "text_encoder", "tokenizer"}
    # v-prediction (SD 2.x 768) loads (issue #24); x0-prediction is refused by name.
    import json
    sc = root / "scheduler" / "scheduler_config.json"
    sc.write_text(json.dumps({**json.loads(sc.read_text()), "prediction_type": "v_prediction"}))
    assert load_model(root).scheduler_config["prediction_type"] == "v_prediction"
    sc.write_text(json.dumps({**json.loads(sc.read_text()), "prediction_type": "sample"}))
    with pytest.raises(O2MError, match="'sample'"):
        load_model(root)


# The pipeline's parts: read offline, and the text and latent maps around the denoiser ------------------------------

def test_parts_load_offline_and_match_plain_diffusers(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from o2mcli.models.families.stable_diffusion import (decode_latents, encode_images, encode_prompts, is_sd_pipeline,
                                                         load_sd_parts)

    folder = save_tiny_sd(tmp_path / "sd")
    assert is_sd_pipeline(folder) and not is_sd_pipeline(tmp_path)
    parts = load_sd_parts(folder)
    assert set(parts.hashes) == {"unet", "vae", "text_encoder", "tokenizer"} and all(len(h) == 64 for h in parts.hashes.values())
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    prompts = ["a red cat", "", "a photo of a digit seven"]
    ours = encode_prompts(parts, prompts, batch_size=2)
    theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    assert ours.shape == (3, 77, 32) and torch.allclose(ours, theirs, atol=1e-6)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pipe.image_processor.postprocess(pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample,
                                                output_type="pt")
    images = decode_latents(parts.vae, z)
    assert images.shape == (2, 3, 16, 16) and torch.allclose(images, want, atol=1e-5)
    lat = encode_images(parts.vae, images)
    assert lat.shape == (2, 4, 8, 8)  # the VAE halves each side once
    g = torch.Generator().manual_seed(1)
    assert not torch.allclose(encode_images(parts.vae, images, g), lat)  # a posterior draw, not its mean


def test_parts_refusals(tmp_path: Path) -> None:
    import json
    import shutil

    from o2mcli.models.families.stable_diffusion import load_sd_parts

    folder = save_tiny_sd(tmp_path / "sd")
    index = json.loads((folder / "model_index.json").read_text())
    xl = tmp_path / "xl"
    shutil.copytree(folder, xl)
    (xl / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(O2MError, match="names 'StableDiffusionXLPipeline'; expected StableDiffusionPipeline"):
        load_sd_parts(xl)  # SD's loader; an SDXL directory is stable_diffusion_xl's
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    w = pickled / "vae" / "diffusion_pytorch_model.safetensors"
    w.rename(w.with_suffix(".bin"))
    with pytest.raises(O2MError, match=r"vae: only diffusion_pytorch_model.bin \(pickle\) found"):
        load_sd_parts(pickled)
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(O2MError, match="no tokenizer/ folder"):
        load_sd_parts(folder)


def test_latent_cache_is_built_once_reused_and_checked(tmp_path: Path) -> None:
    """Latents and text embeddings are computed once (counted), equal the parts' own maps, and are reused;
    other inputs rebuild the cache; a changed shard is refused."""
    import json

    import numpy as np
    from PIL import Image

    from o2mcli.data.captions import read_captions
    from o2mcli.data.latent_cache import build_cache, load_cache, load_rgb
    from o2mcli.models.families.stable_diffusion import encode_images, encode_prompts, load_sd_parts

    parts = load_sd_parts(save_tiny_sd(tmp_path / "sd"))
    d = tmp_path / "caps"
    d.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate([(20, 16), (16, 24), (16, 16)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": ["a red cat", "a blue dog", ""][i]})
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = read_captions(d)
    calls = {"img": 0, "txt": 0}

    def img(x):
        calls["img"] += len(x)
        return encode_images(parts.vae, x)

    def txt(t):
        calls["txt"] += len(t)
        return encode_prompts(parts, t)

    record = {"vae": parts.hashes["vae"], "text_encoder": parts.hashes["text_encoder"]}
    out = build_cache(tmp_path / "cache", items, img, txt, record, resolution=16, batch_size=2, shard_size=2)
    assert calls == {"img": 3, "txt": 3} and len(list(out.glob("shard-*.safetensors"))) == 2
    lat, emb = load_cache(out)
    assert lat.shape == (3, 4, 8, 8) and emb.shape == (3, 77, 32)
    assert torch.allclose(lat[1], encode_images(parts.vae, load_rgb(items[1].path, 16)[None])[0], atol=1e-5)
    assert torch.allclose(emb[2], encode_prompts(parts, [""])[0], atol=1e-6)
    build_cache(out, items, img, txt, record, resolution=16, batch_size=2, shard_size=2)
    assert calls == {"img": 3, "txt": 3}  # reused: no encoder ran
    build_cache(out, items, img, txt, {**record, "vae": "other"}, resolution=16, batch_size=2, shard_size=2)
    assert calls == {"img": 6, "txt": 6}  # another VAE: rebuilt
    shard = out / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(O2MError, match="shard-00000.safetensors: missing or changed"):
        load_cache(out)


def test_stages_refuse_broken_pipelines_in_one_line(in_tmp: Path) -> None:
    """Through the CLI: pickle-only weights, a missing part, SDXL; exit 2, one line naming the folder, no output."""
    import json
    import shutil

    good = save_tiny_sd(in_tmp / "sd")
    cases = {}
    for name in ("unet-pickle", "text-pickle", "no-vae", "xl"):
        shutil.copytree(good, in_tmp / name)
        cases[name] = in_tmp / name
    w = cases["unet-pickle"] / "unet" / "diffusion_pytorch_model.safetensors"
    w.rename(w.with_suffix(".bin"))
    w = cases["text-pickle"] / "text_encoder" / "model.safetensors"
    w.rename(w.with_name("pytorch_model.bin"))
    shutil.rmtree(cases["no-vae"] / "vae")
    index = json.loads((good / "model_index.json").read_text())
    (cases["xl"] / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    words = {"unet-pickle": ("unet", "pickle"), "text-pickle": ("text_encoder", "pickle"),
             "no-vae": ("no vae/ folder",), "xl": ("StableDiffusionXLPipeline", "SDXL")}
    for name, path in cases.items():
        for args in (["prune", name, "--ratio", "0.5", "--no-throughput", "-o", "out"],
                     ["sample", name, "--prompt", "a cat", "-n", "1", "--steps", "2", "--device", "cpu", "-o", "out"],
                     ["info", name]):
            assert_refused(cli(*args), name, *words[name])
        assert not (in_tmp / "out").exists()
