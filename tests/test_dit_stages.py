"""DiT (``DiTTransformer2DModel``, pixel space) through o2m's stages (issue #14): ``o2m train --model-config``
(unconditional and class-conditional), sample (``--class``/``--guidance``), info, export to a diffusers model
directory that plain diffusers loads, merge's refusal across architectures, and the config refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_refused, cli, ok, tiny_scheduler, tiny_unet
from dit_tiny import dit_config, tiny_dit
from o2mcli.models.io import load_model, save_model_file

TRAIN = ["--steps", "2", "--batch-size", "4", "--device", "cpu", "--log-every", "1"]
SAMPLE = ["-n", "4", "--steps", "3", "--batch-size", "4", "--device", "cpu"]


def _config(path: Path, **kw) -> Path:
    cfg = dit_config(layers=2, **kw)
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def dits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One unconditional and one class-conditional DiT teacher, trained a few steps on the digits."""
    root = tmp_path_factory.mktemp("dit")
    cfg = _config(root / "dit.json")
    ok("train", "--model-config", cfg, *TRAIN, "-o", root / "u.safetensors")
    ok("train", "--model-config", cfg, "--cond", "class", *TRAIN, "-o", root / "c.safetensors")
    return root


def test_train_from_model_config(dits: Path) -> None:
    u, c = load_model(dits / "u.safetensors"), load_model(dits / "c.safetensors")
    assert type(u.unet).__name__ == type(c.unet).__name__ == "DiTTransformer2DModel"
    # An unconditional DiT always gets its null class: o2m's record says so, and sample takes no --class.
    assert u.conditioning is None
    assert c.conditioning == {"type": "class", "classes": [str(i) for i in range(10)], "null_class": 10,
                              "label_dropout": 0.1}
    assert c.unet_configs[0]["num_embeds_ada_norm"] == 10 and c.unet_configs[0]["num_layers"] == 2


def test_sample_info_and_refusals(dits: Path, tmp_path: Path) -> None:
    ok("sample", dits / "u.safetensors", *SAMPLE, "-o", tmp_path / "su")
    assert_refused(cli("sample", dits / "u.safetensors", *SAMPLE, "--class", "3", "-o", tmp_path / "x"),
                   "not class-conditional")
    ok("sample", dits / "c.safetensors", *SAMPLE, "--class", "3", "--guidance", "2", "-o", tmp_path / "sc")
    labels = np.load(tmp_path / "sc" / "samples.npz")["labels"]
    assert labels.tolist() == [3, 3, 3, 3]
    assert_refused(cli("sample", dits / "c.safetensors", *SAMPLE, "--class", "10", "-o", tmp_path / "x"), "0..9")
    info = ok("info", dits / "c.safetensors")
    assert "DiTTransformer2DModel" in info and "null class 10" in info


PLAIN = (
    "import json, sys, torch\n"
    "from diffusers import DDPMScheduler, DiTTransformer2DModel\n"
    "m = DiTTransformer2DModel.from_pretrained(sys.argv[1], local_files_only=True).eval()\n"
    "s = DDPMScheduler.from_pretrained(sys.argv[1])\n"
    "y = m(torch.zeros(2, 1, 8, 8), torch.tensor([5, 900]), class_labels=torch.tensor([3, 10])).sample\n"
    "assert y.shape == (2, 1, 8, 8) and torch.isfinite(y).all(), y.shape\n"
    "assert not any(k.startswith('o2mcli') for k in sys.modules)\n"
    "print(type(s).__name__, s.config.num_train_timesteps)\n"
)


def test_export_loads_in_plain_diffusers_and_back_in_o2m(dits: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    assert "DiTTransformer2DModel" in ok("export", dits / "c.safetensors", "-o", tmp_path / "ec")
    files = {p.name for p in (tmp_path / "ec").iterdir()}
    assert files == {"config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json",
                     "o2m_export.json"}
    res = subprocess.run([sys.executable, "-c", PLAIN, str(tmp_path / "ec")], capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "DDPMScheduler 1000"
    ours, theirs = load_file(str(dits / "c.safetensors")), load_file(str(tmp_path / "ec" /
                                                                          "diffusion_pytorch_model.safetensors"))
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    # o2m reads the export back with its classes; an exported unconditional DiT stays unconditional.
    assert load_model(tmp_path / "ec").conditioning["null_class"] == 10
    ok("export", dits / "u.safetensors", "-o", tmp_path / "eu")
    assert load_model(tmp_path / "eu").conditioning is None
    ok("sample", tmp_path / "ec", *SAMPLE, "--class", "1", "-o", tmp_path / "sec")


def test_merge_refuses_students_of_different_architectures(tmp_path: Path) -> None:
    sched = tiny_scheduler()
    prov = {"stage": "distill", "init_sha256": "0" * 64}
    save_model_file(tmp_path / "a.safetensors", tiny_dit(), sched, kind="students", provenance=prov)
    save_model_file(tmp_path / "b.safetensors", tiny_unet(), sched, kind="students", provenance=prov)
    assert_refused(cli("merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", tmp_path / "m"),
                   "different architectures", "UNet2DModel", "DiTTransformer2DModel")
    save_model_file(tmp_path / "c.safetensors", tiny_dit(layers=2), sched, kind="students", provenance=prov)
    assert_refused(cli("merge", tmp_path / "a.safetensors", tmp_path / "c.safetensors", "-o", tmp_path / "m"),
                   "different configs", "num_layers")


@pytest.mark.parametrize("edit, cond, words", [
    ({"patch_size": 3}, "none", ["patch_size 3 does not divide sample_size 8"]),
    ({"num_embeds_ada_norm": None}, "none", ["num_embeds_ada_norm is null"]),
    ({"num_embeds_ada_norm": 5}, "class", ["holds 5 classes", "has 10"]),
    ({"_class_name": "FluxTransformer2DModel"}, "none", ["found a FluxTransformer2DModel", "DiTTransformer2DModel"]),
    ({"in_channels": 3, "out_channels": 3}, "none", ["1x8x8 images"]),
])
def test_model_config_refusals(tmp_path: Path, edit: dict, cond: str, words: list[str]) -> None:
    cfg = dit_config(layers=1)
    cfg.update(edit)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(cfg))
    assert_refused(cli("train", "--model-config", path, "--cond", cond, *TRAIN, "-o", tmp_path / "t"),
                   str(path) if "_class_name" in edit or "patch_size" in edit else "", *words)
    assert not (tmp_path / "t").exists()


def test_model_config_without_label_table_and_clashing_options(tmp_path: Path) -> None:
    cfg = dit_config(layers=1)
    del cfg["num_embeds_ada_norm"]  # diffusers' default 1000 labels: not the digits' 10 classes
    path = tmp_path / "m.json"
    path.write_text(json.dumps(cfg))
    assert_refused(cli("train", "--model-config", path, "--cond", "class", *TRAIN, "-o", tmp_path / "t"),
                   "holds 1000 classes")
    assert_refused(cli("train", "--model-config", path, "--channels", "4,8", *TRAIN, "-o", tmp_path / "t"),
                   "--channels", "built-in UNet")
    assert_refused(cli("train", "--model-config", path, "--variance", "learned", *TRAIN, "-o", tmp_path / "t"),
                   "--variance learned", "fixed variance")
    assert_refused(cli("train", "--model-config", tmp_path / "none.json", *TRAIN, "-o", tmp_path / "t"),
                   "no such model config file")
