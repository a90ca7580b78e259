"""Class conditioning: labelled data, `train --cond class`, `sample --class/--classes/--guidance`, class accuracy
in `score`, and their refusals (prune, distill and merge: tests/test_conditional_stages.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_refused, cli
from o2mcli.data import load_dataset
from o2mcli.diffusion.gaussian import DiffusionTerms
from o2mcli.diffusion.sampler import guided
from o2mcli.distill.sources import ImageSource
from o2mcli.manifest import read_manifest
from o2mcli.models.configs import unet_config
from o2mcli.models.io import build_unet, load_model

TINY = ["--channels", "8,16", "--norm-groups", "2", "--batch-size", "16", "--device", "cpu", "--steps", "6",
        "--save-every", "100"]
SAMPLE = ["-n", "12", "--steps", "3", "--device", "cpu", "--no-png"]


@pytest.fixture
def cond_teacher(in_tmp: Path) -> Path:
    res = cli("train", *TINY, "--cond", "class", "-o", "ct")
    assert res.exit_code == 0, res.output
    return in_tmp / "ct"


def test_digits_and_class_folders_carry_labels(tmp_path: Path) -> None:
    d = load_dataset("digits")
    assert d.classes == tuple("0123456789") and d.labels.shape == (1797,) and d.labels[:3].tolist() == [0, 1, 2]
    for name, n in (("cat", 2), ("dog", 3)):
        (tmp_path / "f" / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "f" / name / f"{i}.png")
    f = load_dataset(str(tmp_path / "f"))
    assert f.classes == ("cat", "dog") and f.labels.tolist() == [0, 0, 1, 1, 1] and f.images.shape == (5, 1, 8, 8)


def test_label_dropout_replaces_labels_by_the_null_class() -> None:
    terms = DiffusionTerms(torch.linspace(1e-4, 0.02, 1000))
    images, labels = torch.zeros(50, 1, 8, 8), torch.arange(50) % 5
    g = torch.Generator().manual_seed(0)
    assert (ImageSource(images, terms, torch.device("cpu"), labels, 5, 1.0).draw(0, 1000, 64, g).cond == 5).all()
    kept = ImageSource(images, terms, torch.device("cpu"), labels, 5, 0.0).draw(0, 1000, 64, g).cond
    assert kept.max() < 5
    some = ImageSource(images, terms, torch.device("cpu"), labels, 5, 0.5).draw(0, 1000, 2000, g).cond
    assert 0.4 < (some == 5).float().mean() < 0.6
    assert ImageSource(images, terms, torch.device("cpu")).draw(0, 1000, 8, g).cond is None


def test_guidance_is_the_classifier_free_combination() -> None:
    torch.manual_seed(0)
    unet = build_unet(unet_config(sample_size=8, channels=1, variance="learned", block_out_channels=(4, 8),
                                  norm_num_groups=2, num_classes=3), None, Path("m")).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor(500), torch.tensor([0, 2])
    with torch.no_grad():
        c, u = unet(x, t, class_labels=y).sample, unet(x, t, class_labels=torch.tensor([3, 3])).sample
        assert torch.allclose(guided(unet, x, t, y, 1.0, 3, 1), c)
        assert torch.equal(guided(unet, x, t, y, 0.0, 3, 1), c)  # at or below 1: no guidance (diffusers)
        g = guided(unet, x, t, y, 3.0, 3, 1)
        assert torch.allclose(g[:, :1], u[:, :1] + 3.0 * (c[:, :1] - u[:, :1]), atol=1e-5)
        assert torch.allclose(g[:, 1:], c[:, 1:], atol=1e-6)  # the variance comes from the conditional branch


def test_train_cond_class_records_classes_and_the_null_class(in_tmp: Path, cond_teacher: Path) -> None:
    loaded = load_model(cond_teacher)
    assert loaded.unet.config.num_class_embeds == 11
    assert loaded.conditioning == {"type": "class", "classes": list("0123456789"), "null_class": 10,
                                   "label_dropout": 0.1}
    assert read_manifest(cond_teacher).config["cond"] == "class"


def test_sample_asks_for_classes_and_records_them(in_tmp: Path, cond_teacher: Path) -> None:
    assert cli("sample", "ct", "--class", "3", *SAMPLE, "-o", "s3").exit_code == 0
    with np.load(in_tmp / "s3" / "samples.npz") as z:
        assert z["labels"].tolist() == [3] * 12
    assert read_manifest(in_tmp / "s3").summary["classes"] == {"3": 12}
    assert cli("sample", "ct", "--classes", "1,2", "--guidance", "2", *SAMPLE, "-o", "s12").exit_code == 0
    with np.load(in_tmp / "s12" / "samples.npz") as z:
        assert z["labels"].tolist() == [1, 2] * 6
    assert cli("sample", "ct", *SAMPLE, "-o", "sall").exit_code == 0  # balanced over all classes
    with np.load(in_tmp / "sall" / "samples.npz") as z:
        assert z["labels"].tolist() == [*range(10), 0, 1]


def test_class_refusals(in_tmp: Path, cond_teacher: Path, tmp_path: Path) -> None:
    assert_refused(cli("sample", "ct", "--class", "10", *SAMPLE, "-o", "x"), "--class 10", "0..9")
    assert_refused(cli("sample", "digits-teacher", "--class", "1", *SAMPLE, "-o", "x"), "not class-conditional")
    assert_refused(cli("sample", "digits-teacher", "--guidance", "3", *SAMPLE, "-o", "x"), "--guidance 3.0")
    assert_refused(cli("sample", "ct", "--class", "1", "--classes", "2", *SAMPLE, "-o", "x"), "give one")
    (tmp_path / "one" / "only").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "one" / "only" / "a.png")
    assert_refused(cli("train", *TINY, "--cond", "class", "--data", str(tmp_path / "one"), "-o", "y"),
                   "at least 2 classes")
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "flat" / "a.png")
    assert_refused(cli("train", *TINY, "--cond", "class", "--data", str(tmp_path / "flat"), "-o", "y"),
                   "labelled images")
    assert not any((in_tmp / n).exists() for n in ("x", "y"))


def test_score_reports_class_accuracy_for_labelled_samples(in_tmp: Path, cond_teacher: Path) -> None:
    """Real digits with their true labels, then with wrong ones: the digits classifier reads them."""
    from test_score import make_samples_dir, small_cfg

    from o2mcli.data.digits import digits_arrays
    from o2mcli.stages.score import run_score

    images, labels = digits_arrays()
    u8 = np.clip(np.rint(images[:200].astype(np.float64) / 16.0 * 255), 0, 255).astype(np.uint8)[..., None]
    for name, lab in (("right", labels[:200]), ("wrong", (labels[:200] + 1) % 10)):
        d = make_samples_dir(in_tmp / name, cond_teacher / "model.safetensors", u8)
        with np.load(d / "samples.npz") as z:
            imgs = z["images"]
        np.savez(d / "samples.npz", images=imgs, labels=lab.astype(np.int64))
        _reseal(d)
    rows = {r["name"]: r for r in __import__("json").loads(
        (run_score(small_cfg([in_tmp / "right", in_tmp / "wrong"], in_tmp / "sc")) / "report.json").read_text())["rows"]}
    assert rows["right"]["class_accuracy"] > 0.95 and rows["wrong"]["class_accuracy"] < 0.05
    assert "Class acc." in (in_tmp / "sc" / "report.md").read_text()


def _reseal(d: Path) -> None:
    """Rewrite a samples manifest after editing its npz (as if o2m sample had written the labels)."""
    from o2mcli.manifest import write_manifest

    man = read_manifest(d, verify=False)
    write_manifest(d, "samples", man.config, parents=man.parents, summary=man.summary)
