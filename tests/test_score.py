"""``o2m score``: FID/KID through clean-fid, feature extractors, the report stage and its CLI (CPU, offline)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_scheduler, tiny_unet
from o2mcli.cli import app
from o2mcli.errors import O2MError
from o2mcli.outputs import atomic_dir
from o2mcli.manifest import parent_ref, read_manifest, write_manifest
from o2mcli.models.io import model_record, save_model_file
from o2mcli.scoring.features import INCEPTION_FILE, get_extractor, resolve_name
from o2mcli.scoring.metrics import fid_between_folders, fid_from_features, kid_from_features, size_warnings
from o2mcli.stages.score import ScoreConfig, run_score

runner = CliRunner()


# Helpers ---------------------------------------------------------------------------------------------

def random_images(n: int, seed: int = 0, shape=(8, 8, 1)) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(n, *shape)).astype(np.uint8)


def digit_images(start: int, n: int) -> np.ndarray:
    from o2mcli.data.digits import digits_arrays

    images, _ = digits_arrays()
    x = images[start:start + n].astype(np.float64) / 16.0
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)[..., None]


def make_samples_dir(path: Path, model: Path, images: np.ndarray, scheduler: str = "ddim", steps: int = 2) -> Path:
    """A samples stage directory as ``o2m sample`` writes it (npz, PNGs, manifest with the model as parent)."""
    from PIL import Image

    with atomic_dir(path) as tmp:
        np.savez(tmp / "samples.npz", images=images)
        (tmp / "png").mkdir()
        for i, im in enumerate(images[:4]):
            Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im).save(tmp / "png" / f"{i:05d}.png")
        cfg = {"model": str(model), "scheduler": scheduler, "steps": steps, "seed": 0, "n": len(images),
               "batch_size": 8, "device": "cpu"}
        write_manifest(tmp, "samples", cfg, parents=[parent_ref(model)], summary={"n": len(images)})
    return path


def small_cfg(samples: list[Path], out: Path, **kw) -> ScoreConfig:
    return ScoreConfig(samples=samples, out=out, device="cpu", throughput_batch=2, throughput_repeats=1,
                       kid_subsets=5, **kw)


def fake_inception(path: Path) -> Path:
    """A TorchScript module shaped like clean-fid's Inception (``.layers`` -> 2048 features)."""

    class Layers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3 * 4 * 4, 2048)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)))

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = Layers()

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.layers(x)

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(Net()), str(path))
    return path


@pytest.fixture
def samples_dir(tmp_path: Path, tiny_model_file: Path) -> Path:
    return make_samples_dir(tmp_path / "samples", tiny_model_file, random_images(16))


# 1. Metrics --------------------------------------------------------------------------------------------

def test_fid_zero_on_itself_and_grows_with_a_shift() -> None:
    f = np.random.RandomState(0).normal(size=(400, 8))
    assert abs(fid_from_features(f, f)) < 1e-6
    # Same covariance, means 1 apart in each of 8 dims: FID = |mu1 - mu2|^2 = 8.
    assert fid_from_features(f, f + 1.0) == pytest.approx(8.0, abs=1e-4)
    assert fid_from_features(f, f + 2.0) > fid_from_features(f, f + 1.0)


def test_kid_sane_and_deterministic() -> None:
    rs = np.random.RandomState(1)
    a, b = rs.normal(size=(300, 8)), rs.normal(size=(300, 8))
    state = np.random.get_state()
    same_mean, same_std = kid_from_features(a, b, subsets=20, subset_size=200)
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # numpy's global generator untouched
    shifted, _ = kid_from_features(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same_mean) < 0.05 and same_std >= 0
    assert shifted > 10 * max(abs(same_mean), 1e-3)
    assert kid_from_features(a, b, subsets=20, subset_size=200) == (same_mean, same_std)


def test_kid_subsets_are_drawn_from_both_sets() -> None:
    """Equal-size sets at the subset cap: the old subsets held every image and the std was ~1e-13 (issue 11)."""
    from o2mcli.scoring.metrics import kid_subset_size

    rs = np.random.RandomState(2)
    a, b = rs.normal(size=(200, 8)), rs.normal(size=(200, 8)) + 0.3
    mean, std = kid_from_features(a, b, subsets=30, subset_size=200)
    assert kid_subset_size(200, 200, 200) == 100 and kid_subset_size(1000, 1797, 1000) == 500
    assert mean > 0 and std > 1e-3 * mean  # the spread of real subsets, not of round-off
    # The spread reacts to the generated set too: reusing it whole (no subsets) would not.
    _, std_half = kid_from_features(a[:100], b, subsets=30, subset_size=200)
    assert std_half != pytest.approx(std, rel=1e-6)


def test_metrics_refuse_fewer_than_two_and_warn_below_dim() -> None:
    f = np.zeros((1, 4))
    with pytest.raises(O2MError, match="at least 2"):
        fid_from_features(f, np.ones((10, 4)))
    with pytest.raises(O2MError, match="at least 2"):
        kid_from_features(np.ones((10, 4)), f)
    assert size_warnings(10, 64, "samples") and "singular" in size_warnings(10, 64, "samples")[0]
    assert size_warnings(100, 64, "samples") == []


# 2. Feature extractors -----------------------------------------------------------------------------

def test_digits_extractor_refuses_other_shapes() -> None:
    ex = get_extractor("digits", device="cpu")
    assert ex.name == "digits" and ex.dim == 64
    assert ex(torch.rand(3, 1, 8, 8)).shape == (3, 64)
    with pytest.raises(O2MError, match="3x32x32"):
        ex(torch.rand(2, 3, 32, 32))


def test_auto_picks_by_shape() -> None:
    assert resolve_name("auto", (1, 8, 8)) == "digits"
    assert resolve_name("auto", (3, 32, 32)) == "inception"
    with pytest.raises(O2MError, match="unknown feature extractor"):
        resolve_name("clip", (1, 8, 8))


def test_classifier_asset_classifies_real_digits() -> None:
    from o2mcli.scoring.classifier import ASSET, accuracy, digits_tensors, load_classifier

    assert ASSET.is_file() and ASSET.stat().st_size < 1_000_000
    net, meta = load_classifier()
    assert meta["feature_dim"] == "64" and float(meta["heldout_accuracy"]) > 0.95 and meta["seed"] == "0"
    x, y = digits_tensors()
    assert accuracy(net, x, y) > 0.9
    with torch.no_grad():
        f = net.features(x).double()
    # Standardised on the training digits, and full rank (FID needs a non-singular covariance).
    assert f.mean(0).abs().max() < 1e-3 and (f.std(0) - 1).abs().max() < 1e-3
    assert np.linalg.matrix_rank(np.cov(f.numpy(), rowvar=False)) == 64


def test_inception_without_weights_says_how_to_get_them_offline(tmp_path: Path) -> None:
    from cleanfid.downloads_helper import inception_url

    with pytest.raises(O2MError) as e:
        get_extractor("inception", None, device="cpu")
    msg = str(e.value)
    assert inception_url in msg and "--inception-weights" in msg and "never downloads" in msg and "\n" not in msg
    with pytest.raises(O2MError, match="no such file"):
        get_extractor("inception", tmp_path / "nope.pt", device="cpu")
    (tmp_path / "bad.pt").write_bytes(b"not torchscript")
    with pytest.raises(O2MError, match="not clean-fid's TorchScript Inception"):
        get_extractor("inception", tmp_path / "bad.pt", device="cpu")


def test_inception_plumbing_with_a_fake_torchscript_module(tmp_path: Path) -> None:
    """clean-fid's InceptionV3W wraps a local TorchScript file; images reach it at 299x299, 0..255."""
    weights = fake_inception(tmp_path / INCEPTION_FILE)
    ex = get_extractor("inception", weights, device="cpu")
    assert ex.name == "inception" and ex.dim == 2048
    gray = torch.rand(3, 1, 8, 8)
    f = ex(gray)
    assert f.shape == (3, 2048) and np.isfinite(f).all()
    np.testing.assert_allclose(ex(gray.repeat(1, 3, 1, 1)), f, rtol=1e-5, atol=1e-5)  # gray == replicated RGB
    assert ex.resize(np.zeros((8, 8, 3), np.float32)).shape == (299, 299, 3)
    # A file saved under another name and a directory holding the canonical name both work.
    other = tmp_path / "sub"
    other.mkdir()
    os.replace(weights, other / "renamed.pt")
    assert get_extractor("inception", other / "renamed.pt", device="cpu")(gray).shape == (3, 2048)
    os.replace(other / "renamed.pt", other / INCEPTION_FILE)
    assert get_extractor("inception", other, device="cpu").info()["weights"].endswith(INCEPTION_FILE)


def test_clean_fid_folder_path_agrees_with_in_memory_path(tmp_path: Path) -> None:
    """clean-fid's compute_fid, with our extractor as custom_feat_extractor, gives the stage's FID."""
    from PIL import Image

    from o2mcli.data import load_dataset

    for name, start in (("a", 0), ("b", 900)):
        (tmp_path / name).mkdir()
        for i, im in enumerate(digit_images(start, 100)):
            Image.fromarray(im[:, :, 0]).save(tmp_path / name / f"{i:04d}.png")
    ex = get_extractor("digits", device="cpu")
    via_cleanfid = fid_between_folders(tmp_path / "a", tmp_path / "b", ex)
    in_memory = fid_from_features(ex(load_dataset(str(tmp_path / "a")).images),
                                  ex(load_dataset(str(tmp_path / "b")).images))
    assert via_cleanfid == pytest.approx(in_memory, rel=1e-3)


# 3. The stage --------------------------------------------------------------------------------------

def test_run_score_end_to_end(tmp_path: Path, tiny_model_file: Path, samples_dir: Path) -> None:
    real = make_samples_dir(tmp_path / "real", tiny_model_file, digit_images(0, 100), scheduler="ddpm", steps=2)
    out = run_score(small_cfg([samples_dir, real], tmp_path / "scores"))
    man = read_manifest(out)  # verifies every artifact's hash
    assert man.kind == "scores" and {a.path for a in man.artifacts} == {"report.json", "report.md", "fid_vs_macs.png"}
    assert [p.path for p in man.parents] == [str(samples_dir.resolve()), str(real.resolve())]
    assert man.config["throughput_batch"] == 2
    report = json.loads((out / "report.json").read_text())
    noise, digits = report["rows"]
    for row in (noise, digits):
        for key in ("name", "model", "model_sha256", "params", "macs", "throughput", "fid", "kid_mean", "kid_std",
                    "n_samples", "n_reference", "features", "scheduler", "steps", "seed"):
            assert key in row, key
        assert row["model"] == str(tiny_model_file.resolve())
        assert row["params"] > 0 and row["macs"] > 0 and row["n_reference"] == 1797
        tp = row["throughput"]
        assert tp["images_per_s"] > 0 and tp["batch_size"] == 2 and tp["steps"] == 2 and tp["device"] == "cpu"
        assert row["features"] == "digits"
    assert noise["n_samples"] == 16 and noise["scheduler"] == "ddim"
    assert any("singular" in w for w in noise["warnings"])  # 16 samples < 64 feature dims
    assert digits["fid"] < noise["fid"] and digits["kid_mean"] < noise["kid_mean"]
    assert report["reference"]["spec"] == "digits" and report["features"]["name"] == "digits"
    md = (out / "report.md").read_text()
    assert "| Model | Params (M) | MACs (G) | Throughput (img/s) | FID | KID x1e3 | n |" in md
    assert "tiny.safetensors (ddim, 2 steps)" in md and "Device: cpu" in md and "Reference: digits" in md
    assert "rows differ in sampler" in md  # ddim vs ddpm: the report says the FIDs do not compare


def test_student_group_sums_params_and_counts_one_students_macs(tmp_path: Path) -> None:
    from o2mcli.models.stats import count_macs, count_params

    units = [tiny_unet(seed=0), tiny_unet(seed=1)]
    ranges = [(0, 500), (500, 1000)]
    with atomic_dir(tmp_path / "students") as tmp:
        records = []
        for k, (u, r) in enumerate(zip(units, ranges)):
            save_model_file(tmp / f"student_{k}.safetensors", u, tiny_scheduler(), kind="students", timestep_range=r)
            records.append(model_record(f"student_{k}", f"student_{k}.safetensors", u, r))
        write_manifest(tmp, "students", {}, models=records, scheduler_config=tiny_scheduler())
    samples = make_samples_dir(tmp_path / "samples", tmp_path / "students", random_images(8))
    out = run_score(small_cfg([samples], tmp_path / "scores"))
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert row["students"] == 2
    assert row["params"] == sum(count_params(u) for u in units)
    assert row["macs"] == count_macs(units[0])
    assert any("one student runs per denoising step" in w for w in row["warnings"])


def test_refuses_changed_model_and_wrong_shape(tmp_path: Path, tiny_model_file: Path, samples_dir: Path) -> None:
    rgb = make_samples_dir(tmp_path / "rgb", tiny_model_file, random_images(4, shape=(8, 8, 3)))
    with pytest.raises(O2MError, match=r"3x8x8.*1x8x8"):
        run_score(small_cfg([rgb], tmp_path / "s1"))
    save_model_file(tiny_model_file, tiny_unet(seed=5), tiny_scheduler(), kind="teacher", force=True)
    with pytest.raises(O2MError, match="model changed since sampling"):
        run_score(small_cfg([samples_dir], tmp_path / "s2"))
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()
    assert not [p for p in tmp_path.iterdir() if "tmp-o2m" in p.name]


def test_folder_reference(tmp_path: Path, tiny_model_file: Path, samples_dir: Path) -> None:
    from PIL import Image

    gray, rgb = tmp_path / "gray", tmp_path / "rgb"
    gray.mkdir(), rgb.mkdir()
    for i, im in enumerate(digit_images(0, 70)):
        Image.fromarray(im[:, :, 0]).save(gray / f"{i:03d}.png")
        Image.fromarray(np.repeat(im, 3, axis=2)).save(rgb / f"{i:03d}.png")
    out = run_score(small_cfg([samples_dir], tmp_path / "scores", ref=str(gray)))
    report = json.loads((out / "report.json").read_text())
    assert report["rows"][0]["n_reference"] == 70 and report["reference"]["spec"] == str(gray)
    with pytest.raises(O2MError, match=r"1x8x8.*3x8x8"):
        run_score(small_cfg([samples_dir], tmp_path / "scores-rgb", ref=str(rgb)))


# 4. The command ------------------------------------------------------------------------------------

FAST = ["--throughput-batch", "2", "--throughput-repeats", "1", "--kid-subsets", "5", "--device", "cpu"]


def test_cli_chains_to_the_newest_samples(in_tmp: Path) -> None:
    model = save_model_file(in_tmp / "tiny.safetensors", tiny_unet(), tiny_scheduler(), kind="teacher")
    make_samples_dir(in_tmp / "samples", model, random_images(8))
    r = runner.invoke(app, ["score", *FAST])
    assert r.exit_code == 0, r.output
    assert "| Model | Params (M)" in r.stdout and "wrote scores" in r.stdout
    assert read_manifest(in_tmp / "scores").kind == "scores"
    assert read_manifest(in_tmp / "scores").parents[0].path == str((in_tmp / "samples").resolve())
    r = runner.invoke(app, ["score", *FAST])  # a second run never clobbers the first
    assert r.exit_code == 0, r.output
    assert (in_tmp / "scores-2" / "report.md").is_file()


def test_cli_tampered_samples_exit_2_and_write_nothing(in_tmp: Path) -> None:
    model = save_model_file(in_tmp / "tiny.safetensors", tiny_unet(), tiny_scheduler(), kind="teacher")
    d = make_samples_dir(in_tmp / "samples", model, random_images(8))
    data = bytearray((d / "samples.npz").read_bytes())
    data[-40] ^= 0xFF
    (d / "samples.npz").write_bytes(bytes(data))
    before = sorted(p.name for p in in_tmp.iterdir())
    r = runner.invoke(app, ["score", "samples", *FAST])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "samples.npz" in lines[0]
    assert sorted(p.name for p in in_tmp.iterdir()) == before


def test_cli_existing_output_refused_before_any_work(in_tmp: Path) -> None:
    (in_tmp / "scores").mkdir()
    # The samples directory does not even exist: the output check comes first.
    r = runner.invoke(app, ["score", "missing-samples", "-o", "scores", *FAST])
    assert r.exit_code == 2 and "already exists" in r.stderr and "--force" in r.stderr
    r = runner.invoke(app, ["score", "missing-samples", "-o", "new", *FAST])
    assert r.exit_code == 2 and "no such samples directory" in r.stderr
    r = runner.invoke(app, ["score", "--features", "clip", *FAST])
    assert r.exit_code == 2 and r.stderr.startswith("error: ")


def test_cli_inception_without_weights(in_tmp: Path) -> None:
    model = save_model_file(in_tmp / "tiny.safetensors", tiny_unet(), tiny_scheduler(), kind="teacher")
    make_samples_dir(in_tmp / "samples", model, random_images(8))
    r = runner.invoke(app, ["score", "--features", "inception", *FAST])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "inception-2015-12-05.pt" in r.stderr and "--inception-weights" in r.stderr
    assert not (in_tmp / "scores").exists()
