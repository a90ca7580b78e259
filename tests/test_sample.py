"""``o2m sample``: every sampler on fixed and learned variance, determinism, student routing, chaining, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_refused, cli, make_model_stage, tiny_scheduler
from o2mcli.fsutil import sha256_file
from o2mcli.manifest import read_manifest
from o2mcli.stages.sample import SampleConfig, run_sample




def load_images(d: Path) -> np.ndarray:
    with np.load(d / "samples.npz", allow_pickle=False) as z:
        return z["images"]


# 1. Every sampler, both variance types --------------------------------------------------------------

@pytest.mark.parametrize("variance", ["fixed", "learned"])
@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm++"])
def test_sample_writes_stage_dir(tmp_path, tiny_model_file, tiny_learned_file, scheduler, variance):
    model = tiny_model_file if variance == "fixed" else tiny_learned_file
    out = run_sample(SampleConfig(model=str(model), scheduler=scheduler, steps=3, n=6, batch_size=4,
                                  device="cpu", out=tmp_path / "s"))
    images = load_images(out)
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
    assert images.std() > 0
    assert sorted(p.name for p in (out / "png").iterdir()) == [f"{i:06d}.png" for i in range(6)]
    assert (out / "grid.png").is_file()
    man = read_manifest(out)  # verifies every artifact's hash
    assert man.kind == "samples"
    assert man.parents[0].kind == "model-file"
    assert man.parents[0].sha256 == sha256_file(model)
    assert man.config["model"] == str(model.resolve())
    for key, value in dict(scheduler=scheduler, steps=3, seed=0, n=6, batch_size=4, device="cpu").items():
        assert man.config[key] == value
    s = man.summary
    assert s["n"] == 6 and s["image_shape"] == [8, 8, 1]
    assert s["model_form"] == "o2m-file" and s["model_sha256"] == sha256_file(model)
    assert s["seconds"] > 0 and s["images_per_s"] > 0
    assert "served" not in s
    assert {"samples.npz", "grid.png", "png/000000.png"} <= {a.path for a in man.artifacts}


def test_no_png(tmp_path, tiny_model_file):
    out = run_sample(SampleConfig(model=str(tiny_model_file), steps=1, n=2, device="cpu", png=False,
                                  out=tmp_path / "s"))
    assert not (out / "png").exists() and (out / "grid.png").is_file()
    assert load_images(out).shape == (2, 8, 8, 1)


def test_seed_determinism(tmp_path, tiny_model_file):
    def run(seed, name):
        return load_images(run_sample(SampleConfig(model=str(tiny_model_file), scheduler="ddpm", steps=2, n=4,
                                                   batch_size=3, seed=seed, device="cpu", out=tmp_path / name)))

    a, b, c = run(7, "a"), run(7, "b"), run(8, "c")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (tmp_path / "a" / "samples.npz").read_bytes() == (tmp_path / "b" / "samples.npz").read_bytes()


# 2. A group of students: each serves exactly the timesteps inside its range ----------------------

def test_students_serve_their_ranges(tmp_path, monkeypatch):
    from diffusers import DDPMScheduler

    import o2mcli.models.io as mio

    ranges = ((0, 500), (500, 1000))
    students = make_model_stage(tmp_path / "students", "students", ranges)
    seen: dict[int, list[tuple[int, int]]] = {0: [], 1: []}
    real_load = mio.load_model

    def load_and_watch(path, device="cpu"):
        loaded = real_load(path, device)
        for k, unet in enumerate(loaded.unet.students):
            unet.register_forward_pre_hook(
                lambda mod, args, k=k: seen[k].append((int(torch.as_tensor(args[1]).reshape(-1)[0]), args[0].shape[0])))
        return loaded

    monkeypatch.setattr(mio, "load_model", load_and_watch)
    n, bs, steps = 3, 2, 10
    out = run_sample(SampleConfig(model=str(students), scheduler="ddpm", steps=steps, n=n, batch_size=bs,
                                  device="cpu", out=tmp_path / "s"))

    sched = DDPMScheduler.from_config({k: v for k, v in tiny_scheduler().items() if not k.startswith("_")})
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    assert len(ts) == steps
    batches = [bs, n - bs]
    for k, (lo, hi) in enumerate(ranges):
        mine = [t for t in ts if lo <= t < hi]
        assert mine, "the test needs both students to serve something"
        assert seen[k] == [(t, b) for b in batches for t in mine]
    man = read_manifest(out)
    assert man.summary["served"] == [n * sum(lo <= t < hi for t in ts) for lo, hi in ranges]
    assert man.summary["ranges"] == [list(r) for r in ranges]
    assert man.summary["model_form"] == "stage:students"
    assert man.parents[0].kind == "students"
    assert man.parents[0].sha256 == sha256_file(students / "manifest.json")


def test_students_uneven_split_via_cli(tmp_path):
    students = make_model_stage(tmp_path / "students", "students", ((0, 300), (300, 1000)))
    r = cli("sample", students, "--scheduler", "ddpm", "--steps", 10, "-n", 2, "--device", "cpu", "-o", tmp_path / "s")
    assert r.exit_code == 0, r.output
    assert read_manifest(tmp_path / "s").summary["served"] == [2 * 3, 2 * 7]
    assert "served [6, 14]" in r.stdout


# 3. Chaining defaults -----------------------------------------------------------------------------

def test_chaining_default_model_and_output(in_tmp, tiny_model_file, tmp_path_factory):
    src = tmp_path_factory.mktemp("elsewhere") / "teacher.safetensors"
    shutil.move(tiny_model_file, src)
    shutil.copy(src, in_tmp / "teacher.safetensors")
    r1 = cli("sample", "--steps", 2, "-n", 4, "--device", "cpu")
    assert r1.exit_code == 0, r1.output
    assert r1.stdout.startswith("wrote samples:") and "4 images" in r1.stdout
    man = read_manifest(in_tmp / "samples")
    assert man.parents[0].path == str((in_tmp / "teacher.safetensors").resolve())
    assert load_images(in_tmp / "samples").shape == (4, 8, 8, 1)
    r2 = cli("sample", "--steps", 2, "-n", 4, "--device", "cpu")
    assert r2.exit_code == 0, r2.output
    assert (in_tmp / "samples-2" / "samples.npz").is_file()
    assert np.array_equal(load_images(in_tmp / "samples"), load_images(in_tmp / "samples-2"))


def test_chaining_without_any_model(in_tmp):
    assert_refused(cli("sample", "--steps", 2, "-n", 2), "no model found")
    assert list(in_tmp.iterdir()) == []


# 4. Bad input: one line, exit 2, nothing written ---------------------------------------------------

def test_missing_model(in_tmp):
    assert_refused(cli("sample", "nope.safetensors", "--steps", 2, "-n", 2), "nope.safetensors")
    assert list(in_tmp.iterdir()) == []


def test_truncated_model(tmp_path, tiny_model_file):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(tiny_model_file.read_bytes()[:-100])
    assert_refused(cli("sample", bad, "--steps", 2, "-n", 2, "-o", tmp_path / "s"), "cut.safetensors")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], ["--steps"]),
    (["--steps", "1001"], ["--steps 1001", "1000"]),
    (["-n", "0"], ["--n"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--scheduler", "foo"], ["--scheduler", "foo"]),
    (["--device", "tpu"], ["--device"]),
])
def test_bad_options(tmp_path, tiny_model_file, args, words):
    assert_refused(cli("sample", tiny_model_file, *args, "-o", tmp_path / "s"), *words)
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda(tmp_path, tiny_model_file):
    assert_refused(cli("sample", tiny_model_file, "--device", "cuda", "-o", tmp_path / "s"), "CUDA")
    assert not (tmp_path / "s").exists()


def test_existing_output_needs_force(tmp_path, tiny_model_file):
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert_refused(cli("sample", tiny_model_file, "--steps", 1, "-n", 2, "-o", out), "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    # --force replaces only what o2m wrote: a user's directory is refused by name (issue 11) ...
    assert_refused(cli("sample", tiny_model_file, "--steps", 1, "-n", 2, "--device", "cpu", "-o", out, "--force"),
                   "o2m did not write")
    assert (out / "keep.txt").read_text() == "old"
    # ... and an o2m samples directory is replaced.
    out2 = tmp_path / "s2"
    assert cli("sample", tiny_model_file, "--steps", 1, "-n", 2, "--device", "cpu", "-o", out2).exit_code == 0
    (out2 / "extra.txt").write_text("o2m's own dir")
    r = cli("sample", tiny_model_file, "--steps", 1, "-n", 3, "--device", "cpu", "-o", out2, "--force")
    assert r.exit_code == 0, r.output
    assert not (out2 / "extra.txt").exists() and read_manifest(out2).kind == "samples"
    assert not [p for p in tmp_path.iterdir() if "o2m" in p.name]  # no temp leftovers


def test_not_a_model_stage_dir(tmp_path, tiny_model_file):
    samples = run_sample(SampleConfig(model=str(tiny_model_file), steps=1, n=2, device="cpu", out=tmp_path / "s"))
    assert_refused(cli("sample", samples, "--steps", 1, "-n", 2, "-o", tmp_path / "s2"), "samples")
    # config is JSON, every value plain
    json.dumps(read_manifest(samples).config)
