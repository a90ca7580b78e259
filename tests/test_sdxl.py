"""Stable Diffusion XL through every stage (issue #24, item 3): a tiny random StableDiffusionXLPipeline from
``o2m info`` to plain diffusers sampling, the condition o2m builds against diffusers' own ``encode_prompt`` and UNet
call, and the one-line refusals (a refiner-only pipeline, a missing or pickled part, a student whose condition does
not fit, an SD 1.x UNet in an SDXL pipeline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_refused, cli, ok
from sd_tiny import save_captioned
from sdxl_tiny import save_tiny_sdxl, unet_config

FAST = ["-b", "2", "--lr-warmup", "1", "--device", "cpu", "--log-every", "1", "--save-every", "100"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of the whole chain on the tiny SDXL pipeline (the tests below read its outputs)."""
    import os

    root = tmp_path_factory.mktemp("sdxl")
    old = Path.cwd()
    os.chdir(root)
    try:
        save_tiny_sdxl(root / "sdxl")
        save_captioned(root / "caps", n=8)
        (root / "prompts.txt").write_text("a red cat\na blue dog\na photo of a digit three\n")
        ok("prune", "sdxl", "--ratio", "0.5", "--no-throughput", "-o", "tpl")
        ok("prune", "sdxl", "--blocks", "koala-700m", "--no-throughput", "-o", "tpl-koala")
        ok("distill", "tpl-koala", "-k", "2", "--data", "caps", "--steps", "2", *FAST, "-o", "st")
        ok("distill", "tpl-koala", "-k", "1", "--kd", "feat", "--data", "caps", "--steps", "1", *FAST, "-o", "feat")
        ok("distill", "tpl", "--mode", "dkdm", "--prompts", "prompts.txt", "--rho", "0.01", "--init-steps", "2",
           "--steps", "2", *FAST, "-o", "free")
        ok("merge", "st", "-o", "merged.safetensors")
        ok("sample", "st", "--prompts", "prompts.txt", "-n", "4", "--steps", "3", "--device", "cpu", "--no-png",
           "-o", "s-st")
        ok("sample", "merged.safetensors", "--prompt", "a red cat", "--negative-prompt", "blue", "--guidance", "5",
           "--height", "24", "--width", "32", "-n", "2", "--steps", "3", "--device", "cpu", "--no-png", "-o",
           "s-merged")
        ok("export", "merged.safetensors", "-o", "pipe")
    finally:
        os.chdir(old)
    return root


def test_info_names_the_sdxl_pipeline_and_its_parts(chain: Path) -> None:
    info = json.loads(ok("info", str(chain / "sdxl"), "--json"))
    assert info["pipeline_class"] == "StableDiffusionXLPipeline" and info["class"] == "UNet2DConditionModel"
    hashes = info["conditioning"]["hashes"]
    assert set(hashes) == {"vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}
    assert info["conditioning"]["pipeline"] == str((chain / "sdxl").resolve())


def test_prune_by_ratio_and_by_koala_pattern(chain: Path) -> None:
    from o2mcli.models.io import load_model

    teacher, tpl, koala = (load_model(chain / p).unet for p in ("sdxl", "tpl", "tpl-koala"))
    assert list(tpl.config.block_out_channels) == [8, 16, 16]
    assert tpl.config.addition_embed_type == "text_time"  # the added pooled text and time ids stay
    # KOALA-700M (Lee et al. 2023): the innermost stacks keep 5 of their transformer layers; the mid block goes
    depths = [len(a.transformer_blocks) for a in koala.down_blocks[2].attentions]
    assert depths == [5] and koala.mid_block is None
    assert sum(p.numel() for p in koala.parameters()) < sum(p.numel() for p in teacher.parameters())
    man = json.loads((chain / "tpl-koala" / "manifest.json").read_text())
    assert man["summary"]["block_removal"]["variant"] == "koala-700m"


def test_feature_kd_of_a_koala_template_compares_self_attention(chain: Path) -> None:
    """KOALA found self-attention features the best to distil: a KOALA template's feature KD taps each kept stack's
    last self-attention (attn1) against the teacher layer it came from."""
    from o2mcli.distill.features import feature_match
    from o2mcli.distill.inputs import template_feature_pairs
    from o2mcli.models.io import load_model

    tpl = load_model(chain / "tpl-koala")
    names, _, _, used = feature_match(tpl.unet, load_model(chain / "sdxl").unet, template_feature_pairs(tpl))
    assert len(names) == 6 and all(n.endswith(".attn1") for n in names)
    assert used["down_blocks.2.attentions.0.transformer_blocks.4.attn1"] == \
        "down_blocks.2.attentions.0.transformer_blocks.7.attn1"  # the 5th kept layer is the teacher's last (of 8)
    assert load_model(chain / "feat").unet is not None


def test_distilled_students_and_the_merge_keep_the_teachers_condition(chain: Path) -> None:
    from o2mcli.models.io import load_model

    st, free, merged = (load_model(chain / p) for p in ("st", "free", "merged.safetensors"))
    assert len(st.ranges) == 2 and len(free.ranges) == 1
    for m in (st, free, merged):
        assert m.conditioning["pipeline"] == str((chain / "sdxl").resolve())
        assert "text_encoder_2" in m.conditioning["hashes"]
    # the latent cache holds both encoders' tokens and the pooled text, packed (77 x 64 + 32 per caption)
    index = json.loads(next((chain).glob("caps.latents-*/o2m_latent_cache.json")).read_text())
    assert index["text_shape"] == [77 * 64 + 32] and "text_encoder_2" in index


def test_samples_follow_prompts_sizes_and_guidance(chain: Path) -> None:
    st = np.load(chain / "s-st" / "samples.npz")
    assert st["images"].shape == (4, 16, 16, 3) and list(st["prompts"]) == ["a red cat", "a blue dog",
                                                                          "a photo of a digit three", "a red cat"]
    merged = np.load(chain / "s-merged" / "samples.npz")
    assert merged["images"].shape == (2, 24, 32, 3)
    summary = json.loads((chain / "s-merged" / "manifest.json").read_text())["summary"]
    assert summary["guidance"] == 5.0 and summary["negative_prompt"] == "blue"
    assert set(summary["pipeline"]["hashes"]) == {"vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}


def test_score_reports_macs_with_guidance(chain: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores"
    ok("score", str(chain / "s-st"), "--ref", str(chain / "s-st"), "--features", "inception",
       "--inception-weights", str(_fake_inception(tmp_path)), "--throughput-batch", "1", "--throughput-repeats",
       "1", "--kid-subsets", "2", "--kid-subset-size", "2", "--device", "cpu", "-o", str(out))
    row = json.loads((out / "manifest.json").read_text())["summary"]["rows"][0]
    assert row["macs"] > 0 and row["macs_cfg"] == 2 * row["macs"]  # guidance 7.5: two UNet calls a step


def _fake_inception(tmp_path: Path) -> Path:
    from test_sd_score import INCEPTION_FILE, fake_inception

    return fake_inception(tmp_path / INCEPTION_FILE)


def test_export_loads_in_plain_diffusers_and_samples(chain: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from o2mcli.fsutil import sha256_file

    pipe = StableDiffusionXLPipeline.from_pretrained(chain / "pipe", local_files_only=True)
    img = pipe("a red cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
               height=16, width=16).images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()
    for part in ("text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert sha256_file(chain / "pipe" / part) == sha256_file(chain / "sdxl" / part)  # the teacher's, unchanged


def test_the_condition_is_diffusers_encode_prompt_and_the_call_its_unet(chain: Path) -> None:
    """o2m's codec gives, for one prompt and the empty one, exactly the tokens and pooled text diffusers'
    encode_prompt gives (zeros for the empty prompt: force_zeros_for_empty_prompt), and predict() with them equals
    the UNet called as the pipeline calls it (added_cond_kwargs with the target size's time ids)."""
    from diffusers import StableDiffusionXLPipeline

    from o2mcli.models.denoise import predict
    from o2mcli.models.io import load_model

    pipe = StableDiffusionXLPipeline.from_pretrained(chain / "sdxl", local_files_only=True)
    loaded = load_model(chain / "sdxl")
    codec = loaded.codec()
    cond = codec.unpack(codec.encode_prompts(["a red cat"]))
    null = codec.unpack(codec.encode_prompts([""]))
    pe, npe, pp, npp = pipe.encode_prompt("a red cat", device="cpu", num_images_per_prompt=1,
                                          do_classifier_free_guidance=True)
    assert torch.equal(cond.tokens, pe) and torch.equal(cond.pooled, pp)
    assert torch.equal(null.tokens, npe) and torch.equal(null.pooled, npp) and not null.tokens.any()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=pe.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    with torch.no_grad():
        ref = pipe.unet(x, torch.tensor([500]), encoder_hidden_states=pe,
                        added_cond_kwargs={"text_embeds": pp, "time_ids": ids}).sample
        ours = predict(loaded.unet, x, torch.tensor([500]), cond)
    assert torch.equal(ours, ref)


def test_deepcache_partial_step_on_sdxl_equals_its_full_step_on_a_fresh_cache(chain: Path) -> None:
    """The partial forward with SDXL's added embedding, around the cache a full step just made, gives the full
    step's output for the same inputs (DeepCache's invariant)."""
    from o2mcli.models.families import family_of
    from o2mcli.models.io import load_model

    loaded = load_model(chain / "merged.safetensors")
    codec = loaded.codec()
    cond = codec.unpack(codec.encode_prompts(["a blue dog"]))
    fam, unet = family_of(loaded.unet), loaded.unet
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, cache = fam.deepcache_predict(unet, x, torch.tensor([300]), cond, 0, None)
        partial, _ = fam.deepcache_predict(unet, x, torch.tensor([300]), cond, 0, cache)
    assert torch.allclose(full, partial, atol=1e-5) and torch.equal(full, fam.predict(unet, x, torch.tensor([300]),
                                                                                          cond))


def _edit_index(folder: Path, **kw) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, **kw}))


def test_refusals_are_one_line_and_write_nothing(chain: Path, in_tmp: Path) -> None:
    good = chain / "sdxl"
    cases = {}
    for name in ("refiner", "no-te2", "te2-pickle", "sd-unet"):
        shutil.copytree(good, in_tmp / name)
        cases[name] = in_tmp / name
    _edit_index(cases["refiner"], _class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None],
                tokenizer=[None, None])
    shutil.rmtree(cases["no-te2"] / "text_encoder_2")
    w = cases["te2-pickle"] / "text_encoder_2" / "model.safetensors"
    w.rename(w.with_name("pytorch_model.bin"))
    cfg = json.loads((good / "unet" / "config.json").read_text())
    for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        cfg[key] = None
    (cases["sd-unet"] / "unet" / "config.json").write_text(json.dumps(cfg))
    words = {"refiner": ("refiner-only", "StableDiffusionXLImg2ImgPipeline"),
             "no-te2": ("no text_encoder_2/ folder",), "te2-pickle": ("text_encoder_2", "pickle"),
             "sd-unet": ("sd-unet/unet", "not an SDXL UNet")}
    for name in cases:
        for args in (["info", name], ["prune", name, "--ratio", "0.5", "--no-throughput", "-o", "out"],
                     ["sample", name, "--prompt", "a cat", "-n", "1", "--steps", "2", "--device", "cpu", "-o",
                      "out"]):
            assert_refused(cli(*args), *words[name])
        assert not (in_tmp / "out").exists()
    # a student whose condition does not fit the teacher's: tokens of another width
    narrow = {**unet_config((8, 16, 16)), "cross_attention_dim": 32}
    (in_tmp / "narrow.json").write_text(json.dumps(narrow))
    assert_refused(cli("distill", "--teacher", str(good), "--student-config", "narrow.json", "--data",
                       str(chain / "caps"), "--steps", "1", "-o", "out"), "cross_attention_dim 32", "width 64")
    # an SD 1.x block pattern and a pixel-model option
    assert_refused(cli("prune", str(good), "--blocks", "bk-base", "--no-throughput", "-o", "out"),
                   "BK-SDM", "koala-1b")
    assert_refused(cli("sample", str(chain / "merged.safetensors"), "--prompt", "a cat", "--height", "21", "-n", "1",
                       "--steps", "2", "-o", "out"), "--height", "multiple of 2")  # the tiny VAE's factor
    assert not (in_tmp / "out").exists()


def test_captioned_images_carry_their_own_size_and_crop_as_time_ids(chain: Path, tmp_path: Path) -> None:
    """SDXL's size and crop conditioning: a caption's condition carries its image's original (H, W), the crop's
    top-left in the resized image and the target size (the 20x24 images resized to 16 on the short side are cropped
    1 pixel from the left); the empty caption's row, what dropout gives, the target size's."""
    from o2mcli.data.text import captioned_latents
    from o2mcli.models.io import load_model

    teacher = load_model(chain / "sdxl")
    _, plan = captioned_latents(chain / "caps", teacher.codec(), 8, 0.1, teacher.conditioning, None,
                                tmp_path / "out")
    cond = plan.cond(torch.tensor([0, plan.n]))
    assert cond.ids.tolist() == [[20, 24, 0, 1, 16, 16], [16, 16, 0, 0, 16, 16]]
    assert cond.tokens.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
