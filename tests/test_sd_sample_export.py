"""``o2m sample`` and ``o2m export`` for Stable Diffusion (issue #13): prompts, classifier-free guidance against a
negative prompt, latents decoded by the pipeline's VAE, K students routed by timestep, refusals, and a
``StableDiffusionPipeline`` export that plain diffusers loads and samples in a process that never imports o2m."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_refused, cli, ok
from o2mcli.outputs import atomic_dir
from o2mcli.manifest import read_manifest, write_manifest
from o2mcli.models.families.stable_diffusion import aux_hashes, text_conditioning
from o2mcli.models.io import load_model, model_record, save_model_file
from sd_tiny import save_tiny_sd, tiny_sd_pipeline

pytest.importorskip("transformers")

FAST = ["--steps", "2", "--device", "cpu", "--no-png"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    """The tiny SD 1.x pipeline directory, written once for the module (tests only read it)."""
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "sd")


def npz(d: Path) -> dict[str, np.ndarray]:
    with np.load(d / "samples.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def sd_stage(path: Path, sd: Path, kind: str, ranges, scheduler_class: str | None = None) -> Path:
    """A model stage directory of tiny SD UNets (model k a different random init serving ``ranges[k]``), whose
    provenance names ``sd`` as its pipeline, as o2m's prune and distill record it."""
    sched = json.loads((sd / "scheduler" / "scheduler_config.json").read_text())
    if scheduler_class is not None:  # e.g. SD 1.x's PNDM, which skips its Runge-Kutta warm-up steps
        sched.update({"_class_name": scheduler_class, "skip_prk_steps": True, "set_alpha_to_one": False})
    with atomic_dir(path) as tmp:
        models = []
        for k, r in enumerate(ranges):
            unet = tiny_sd_pipeline(seed=k + 1)[0]
            save_model_file(tmp / f"model_{k}.safetensors", unet, sched, kind=kind, timestep_range=r,
                            provenance={"conditioning": text_conditioning(sd)})
            models.append(model_record(f"{kind}_{k}", f"model_{k}.safetensors", unet, r))
        write_manifest(tmp, kind, {"test": True}, models=models, scheduler_config=sched)
    return path


# 1. Sampling from the teacher pipeline ----------------------------------------------------------------------

def test_prompts_guidance_and_what_is_recorded(in_tmp: Path, sd: Path) -> None:
    ok("sample", sd, "--prompt", "a red cat", "--prompt", "a blue dog", "-n", "3", *FAST[:-1], "-o", "s1")
    s = read_manifest(in_tmp / "s1").summary
    assert s["guidance"] == 7.5 and s["prompts"] == 2 and s["negative_prompt"] == ""
    assert s["pipeline"] == {"path": str(sd.resolve()), "hashes": aux_hashes(sd)}
    assert s["image_shape"] == [16, 16, 3]
    got = npz(in_tmp / "s1")
    assert got["images"].shape == (3, 16, 16, 3) and got["images"].dtype == np.uint8
    assert got["prompts"].dtype.kind == "U" and got["prompts"].tolist() == ["a red cat", "a blue dog", "a red cat"]
    from PIL import Image

    pngs = sorted((in_tmp / "s1" / "png").glob("*.png"))
    assert len(pngs) == 3
    for p in pngs:
        with Image.open(p) as im:
            assert im.size == (16, 16) and im.mode == "RGB"
    assert got["images"].std() > 0  # a picture, not a constant

    # The same prompts from a file (blank lines ignored) and the same seed: the same images, bit for bit.
    (in_tmp / "prompts.txt").write_text("a red cat\n\n   \na blue dog\n")
    ok("sample", sd, "--prompts", "prompts.txt", "-n", "3", *FAST, "-o", "s2")
    again = npz(in_tmp / "s2")
    assert np.array_equal(again["images"], got["images"]) and again["prompts"].tolist() == got["prompts"].tolist()
    assert read_manifest(in_tmp / "s2").config["prompts"] == str((in_tmp / "prompts.txt").resolve())
    ok("sample", sd, "--prompts", "prompts.txt", "-n", "3", *FAST, "--seed", "1", "-o", "s3")
    assert not np.array_equal(npz(in_tmp / "s3")["images"], got["images"])

    # The negative prompt is guidance's unconditional branch: it changes the images; guidance 1 ignores it.
    ok("sample", sd, "--prompts", "prompts.txt", "-n", "3", *FAST, "--negative-prompt", "a photo of a dog",
       "-o", "neg")
    assert not np.array_equal(npz(in_tmp / "neg")["images"], got["images"])
    assert read_manifest(in_tmp / "neg").summary["negative_prompt"] == "a photo of a dog"
    ok("sample", sd, "--prompts", "prompts.txt", "-n", "3", *FAST, "--guidance", "1", "-o", "g1")
    ok("sample", sd, "--prompts", "prompts.txt", "-n", "3", *FAST, "--guidance", "1", "--negative-prompt", "a dog",
       "-o", "g1n")
    assert read_manifest(in_tmp / "g1").summary["guidance"] == 1.0
    assert np.array_equal(npz(in_tmp / "g1")["images"], npz(in_tmp / "g1n")["images"])
    assert not np.array_equal(npz(in_tmp / "g1")["images"], got["images"])


def test_latents_are_not_clamped_and_are_decoded_by_the_vae(sd: Path) -> None:
    """The sampler leaves latents unclamped (SD's latents exceed [-1, 1]) and the VAE decodes them to [0, 1]."""
    from o2mcli.diffusion.sampler import denoise, sample_images
    from o2mcli.models.families.stable_diffusion import decode_latents, encode_prompts, resolve_parts

    loaded = load_model(sd)
    parts = resolve_parts(loaded.conditioning, sd)
    emb = encode_prompts(parts, ["a red cat"])
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * 3  # room outside [-1, 1]
    z = denoise(loaded.unet, "ddim", loaded.scheduler_config, 1, noise, cond=emb.expand(2, -1, -1), guidance=7.5,
                uncond=encode_prompts(parts, [""]), clamp=False)
    assert z.abs().max() > 1
    images = sample_images(loaded.unet, "ddim", loaded.scheduler_config, 2, 3, 2, 0, torch.device("cpu"), False,
                           cond=torch.zeros(3, dtype=torch.long), cond_table=emb, guidance=7.5,
                           uncond=encode_prompts(parts, [""]), decode=lambda x: decode_latents(parts.vae, x))
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1


# 2. K students routed by timestep -----------------------------------------------------------------------------

def test_two_sd_students_serve_their_ranges(in_tmp: Path, sd: Path) -> None:
    sd_stage(in_tmp / "students", sd, "students", ((0, 500), (500, 1000)))
    out = ok("sample", "students", "--prompt", "a red cat", "-n", "2", "--scheduler", "ddpm", "--steps", "4",
             "--device", "cpu", "--no-png", "-o", "s")
    s = read_manifest(in_tmp / "s").summary
    assert s["model_form"] == "stage:students" and s["ranges"] == [[0, 500], [500, 1000]]
    # 4 DDPM steps on 1000 timesteps: two above 500, two below; guidance doubles every batch (2 images x 2).
    assert s["served"] == [8, 8], out
    assert s["pipeline"]["path"] == str(sd.resolve())
    assert npz(in_tmp / "s")["images"].shape == (2, 16, 16, 3)


# 3. Refusals ------------------------------------------------------------------------------------------------

def test_refusals(in_tmp: Path, sd: Path, tiny_model_file: Path, tmp_path_factory) -> None:
    (in_tmp / "empty.txt").write_text("\n  \n")
    assert_refused(cli("sample", sd, "--prompts", "empty.txt", *FAST, "-o", "x"), "empty.txt", "no prompt")
    assert_refused(cli("sample", sd, *FAST, "-o", "x"), "--prompt TEXT or --prompts FILE")
    assert_refused(cli("sample", sd, "--prompt", "a cat", "--prompts", "empty.txt", *FAST, "-o", "x"),
                   "--prompts", "not both")
    assert_refused(cli("sample", sd, "--classes", "1", *FAST, "-o", "x"), "--classes", "text-conditioned")
    assert_refused(cli("sample", tiny_model_file, "--prompt", "a cat", *FAST, "-o", "x"), "--prompt",
                   "not text-conditioned")
    assert_refused(cli("sample", tiny_model_file, "--negative-prompt", "a cat", *FAST, "-o", "x"),
                   "--negative-prompt", "not text-conditioned")
    other = save_tiny_sd(tmp_path_factory.mktemp("other") / "sd", seed=1)
    assert_refused(cli("sample", sd, "--prompt", "a cat", "--pipeline", other, *FAST, "-o", "x"),
                   str(other), "vae differs")
    assert_refused(cli("export", sd, "--pipeline", other, "-o", "x"), "vae differs")
    assert_refused(cli("export", tiny_model_file, "--pipeline", sd, "-o", "x"), "--pipeline", "Stable Diffusion")
    sd_stage(in_tmp / "students", sd, "students", ((0, 500), (500, 1000)))
    assert_refused(cli("export", "students", "-o", "x"), "merge it first")
    assert not (in_tmp / "x").exists()


# 4. Export --------------------------------------------------------------------------------------------------

PLAIN = (
    "import sys, numpy as np, torch\n"
    "from diffusers import StableDiffusionPipeline\n"
    "pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True)\n"
    "out = pipe('a red cat', num_inference_steps=2, output_type='np', height=16, width=16,\n"
    "           generator=torch.Generator().manual_seed(0))\n"
    "assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all(), out.images.shape\n"
    "assert pipe.safety_checker is None\n"
    "assert not any(k.startswith('o2mcli') for k in sys.modules)\n"
    "print(type(pipe.scheduler).__name__)\n"
)


def test_export_loads_and_samples_in_plain_diffusers(in_tmp: Path, sd: Path) -> None:
    from safetensors.torch import load_file

    # A single student whose scheduler config names PNDM (SD 1.x's): the export keeps the class.
    sd_stage(in_tmp / "student", sd, "students", ((0, 1000),), scheduler_class="PNDMScheduler")
    assert "StableDiffusionPipeline" in ok("export", "student", "-o", "pipe")
    res = subprocess.run([sys.executable, "-c", PLAIN, "pipe"], cwd=in_tmp, capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "PNDMScheduler"
    index = json.loads((in_tmp / "pipe" / "model_index.json").read_text())
    assert index["requires_safety_checker"] is False and index["safety_checker"] == [None, None]
    assert not list((in_tmp / "pipe").rglob("*.bin"))
    # The UNet is the student's, the parts are the teacher's, byte for byte (so the export can be a --pipeline).
    ours = load_file(str(in_tmp / "student" / "model_0.safetensors"))
    theirs = load_file(str(in_tmp / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert aux_hashes(in_tmp / "pipe") == aux_hashes(sd)
    marker = json.loads((in_tmp / "pipe" / "o2m_export.json").read_text())
    assert marker["conditioning"]["type"] == "text" and marker["conditioning"]["pipeline"] == str(sd.resolve())

    # Back into o2m: an SD pipeline directory like any other, and a stand-in --pipeline for the student.
    loaded = load_model(in_tmp / "pipe")
    assert loaded.conditioning["type"] == "text" and loaded.form == "diffusers-pipeline"
    ok("sample", "pipe", "--prompt", "a red cat", "-n", "2", *FAST, "-o", "s-pipe")
    ok("sample", "student", "--prompt", "a red cat", "-n", "2", *FAST, "-o", "s-student")
    ok("sample", "student", "--prompt", "a red cat", "-n", "2", *FAST, "--pipeline", "pipe", "-o", "s-via")
    assert np.array_equal(npz(in_tmp / "s-pipe")["images"], npz(in_tmp / "s-student")["images"])
    assert np.array_equal(npz(in_tmp / "s-via")["images"], npz(in_tmp / "s-student")["images"])
    assert ok("export", "student", "-o", "pipe", "--force")  # o2m's own export may be replaced


def test_export_of_the_teacher_pipeline_keeps_its_scheduler(in_tmp: Path, sd: Path) -> None:
    assert "StableDiffusionPipeline" in ok("export", sd, "-o", "pipe")
    sched = json.loads((in_tmp / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDPMScheduler" and sched["beta_schedule"] == "scaled_linear"
    assert sched["clip_sample"] is False
