"""The whole chain on a tiny random Stable Diffusion pipeline (issue #13): prune -> distill on captions and data-free
-> merge -> sample -> score -> export, and a number that shows distillation worked.

The number: each student's eps-MSE to the teacher on held-out (latent, prompt, t), t in the student's own range, is
at most half the untrained template's. Held-out latents are, for the O2MKD students, VAE latents of captioned images
they never saw; for the data-free DKDM students, the teacher's own samples (what DKDM teaches them to match: they
never see an image). The teacher is random, so its eps is not the true noise; O2MKD's diffusion loss pulls toward
the true noise, so the run weights KD (``--alpha 30``) to make the teacher the target, as a trained teacher is.
Plain training (``--kd none``) gives about 10x the template's error on the same check, so it can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ok
from sd_tiny import CAPTIONS, save_captioned, save_tiny_clip, save_tiny_sd
from test_score import INCEPTION_FILE, fake_inception

pytest.importorskip("transformers")

TRAIN = ["-k", "2", "--steps", "150", "-b", "16", "--lr", "2e-3", "--lr-warmup", "5", "--ema-decay", "0.9",
         "--device", "cpu", "--log-every", "50"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import os

    root = tmp_path_factory.mktemp("chain")
    old = os.getcwd()
    os.chdir(root)
    try:
        save_tiny_sd(root / "sd")
        save_captioned(root / "caps", n=24, seed=0)
        (root / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
        ok("prune", "sd", "--ratio", "0.5", "--no-throughput", "-o", "tpl")
        ok("distill", "tpl", "--data", "caps", "--alpha", "30", *TRAIN, "-o", "st-data")
        ok("distill", "tpl", "--mode", "dkdm", "--prompts", "prompts.txt", "--rho", "0.05", "--init-steps", "4",
           *TRAIN, "-o", "st-free")
        ok("merge", "st-data", "-o", "merged")
    finally:
        os.chdir(old)
    return root


def _mse_vs_teacher(root: Path, students: str, x0: torch.Tensor, text: torch.Tensor, seed: int = 0) -> list[tuple]:
    """(range, template's MSE, student's MSE) per student, on x0 noised to t drawn in that student's range."""
    from o2mcli.diffusion.gaussian import q_sample
    from o2mcli.diffusion.schedulers import schedule_terms
    from o2mcli.models.denoise import predict
    from o2mcli.models.io import load_model

    teacher, template, group = load_model(root / "sd"), load_model(root / "tpl").unet, load_model(root / students)
    terms = schedule_terms(teacher.scheduler_config)
    g = torch.Generator().manual_seed(seed)
    out = []
    for (lo, hi), unet in zip(group.ranges, group.unet.students):
        t = torch.randint(lo, hi, (x0.shape[0],), generator=g)
        x_t = q_sample(terms, x0, t, torch.randn(x0.shape, generator=g))
        with torch.no_grad():
            want = predict(teacher.unet, x_t, t, text)
            mse = [float(((predict(m.eval(), x_t, t, text) - want) ** 2).mean()) for m in (template, unet)]
        out.append(((lo, hi), *mse))
    return out


def test_students_learn_the_teacher_on_held_out_latents_and_prompts(chain: Path) -> None:
    from o2mcli.data.latent_cache import load_rgb
    from o2mcli.diffusion.sampler import denoise
    from o2mcli.models.families.stable_diffusion import encode_images, encode_prompts, load_sd_parts
    from o2mcli.models.io import load_model

    parts = load_sd_parts(chain / "sd", unet=False)
    # O2MKD: latents of 32 captioned images it never saw, with their captions.
    held = save_captioned(chain / "held", n=32, seed=1)
    x0 = encode_images(parts.vae, torch.stack([load_rgb(p, 16) for p in sorted(held.glob("*.png"))]))
    text = encode_prompts(parts, [CAPTIONS[i % len(CAPTIONS)] for i in range(32)])
    for rng, tpl, student in _mse_vs_teacher(chain, "st-data", x0, text):
        assert student <= 0.5 * tpl, (rng, tpl, student)
    # DKDM: the teacher's own samples (10 DDIM steps from noise, conditioned on the prompts).
    teacher = load_model(chain / "sd")
    g = torch.Generator().manual_seed(7)
    x0 = denoise(teacher.unet, "ddim", teacher.scheduler_config, 10, torch.randn(32, 4, 8, 8, generator=g),
                 generator=g, cond=text, clamp=False)
    for rng, tpl, student in _mse_vs_teacher(chain, "st-free", x0, text):
        assert student <= 0.5 * tpl, (rng, tpl, student)


def test_merge_sample_score_export(chain: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(chain)
    # The merged model keeps its students' text conditioning, so it samples without --pipeline.
    from o2mcli.models.io import load_model

    cond = load_model(chain / "merged").conditioning
    assert cond["type"] == "text" and cond["pipeline"] == str((chain / "sd").resolve())
    assert cond["caption_dropout"] == 0.1
    fast = ["-n", "4", "--steps", "3", "--batch-size", "4", "--device", "cpu"]
    ok("sample", "st-data", "--prompt", "a red cat", "--prompt", "a blue dog", *fast, "-o", "s-group")
    ok("sample", "merged", "--prompts", "prompts.txt", *fast, "-o", "s-merged")
    man = json.loads((chain / "s-group" / "manifest.json").read_text())
    served = man["summary"]["served"]  # 3 steps over the two ranges, guidance doubling each batch of 4
    assert sum(served) == 3 * 8 and min(served) > 0
    saved = np.load(chain / "s-merged" / "samples.npz")
    assert saved["images"].shape == (4, 16, 16, 3) and list(saved["prompts"]) == CAPTIONS

    # Score: FID against a folder (clean-fid's Inception, faked), CLIP score (a tiny local CLIP), MACs x2 for CFG.
    from PIL import Image

    (chain / "ref").mkdir()
    for i, im in enumerate(np.random.RandomState(1).randint(0, 256, size=(12, 16, 16, 3)).astype(np.uint8)):
        Image.fromarray(im).save(chain / "ref" / f"{i:03d}.png")
    fake_inception(chain / INCEPTION_FILE)
    save_tiny_clip(chain / "clip")
    ok("score", "s-group", "s-merged", "--ref", "ref", "--inception-weights", INCEPTION_FILE, "--clip-weights",
       "clip", "--throughput-batch", "2", "--throughput-repeats", "1", "--kid-subsets", "5", "-o", "scores")
    rows = json.loads((chain / "scores" / "report.json").read_text())["rows"]
    assert len(rows) == 2 and all(np.isfinite(r["fid"]) and r["clip_score"] >= 0 for r in rows)
    assert all(r["macs_cfg"] == 2 * r["macs"] for r in rows)

    # Export the merged model; plain diffusers loads and samples it in a process that never imports o2m.
    ok("export", "merged", "-o", "merged-pipe")
    script = ("import sys, numpy as np, torch\n"
              "from diffusers import StableDiffusionPipeline\n"
              "pipe = StableDiffusionPipeline.from_pretrained('merged-pipe', local_files_only=True)\n"
              "out = pipe('a red cat', num_inference_steps=3, output_type='np', height=16, width=16,\n"
              "           generator=torch.Generator().manual_seed(0))\n"
              "assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()\n"
              "assert not any(k.startswith('o2mcli') for k in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=chain, capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    # The export's UNet is the merged model's.
    from safetensors.torch import load_file

    merged = load_model(chain / "merged").unet.state_dict()
    exported = load_file(str(chain / "merged-pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(merged[k].float(), exported[k].float()) for k in merged)
