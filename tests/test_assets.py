"""The shipped data and teacher: what they claim to be, and a teacher that makes digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from o2mcli.chain import BUILTIN_MODELS
from o2mcli.data import load_dataset
from o2mcli.data.digits import digits_arrays
from o2mcli.diffusion.sampler import sample_images
from o2mcli.models import load_model
from o2mcli.scoring.features import get_extractor
from o2mcli.scoring.metrics import fid_from_features


def test_bundled_digits_are_sklearns() -> None:
    sklearn = pytest.importorskip("sklearn.datasets")
    ref = sklearn.load_digits()
    images, labels = digits_arrays()
    assert images.shape == (1797, 8, 8) and images.max() == 16
    assert np.array_equal(images, ref.images.astype(np.uint8)) and np.array_equal(labels, ref.target)


def test_shipped_teacher_is_what_its_recipe_says() -> None:
    from safetensors import safe_open

    path = BUILTIN_MODELS["digits-teacher"]
    assert path.stat().st_size < 8_000_000
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    prov = json.loads(meta["o2m.provenance"])
    assert prov["config"]["variance"] == "learned" and prov["config"]["seed"] == 0
    assert prov["data"]["sha256"] == load_dataset("digits").sha256
    teacher = load_model(path)
    assert teacher.unet.config.out_channels == 2 and teacher.scheduler_config["variance_type"] == "learned_range"


def test_shipped_teacher_samples_digits() -> None:
    teacher = load_model(BUILTIN_MODELS["digits-teacher"])
    x = sample_images(teacher.unet, "ddim", teacher.scheduler_config, 25, 200, 200, 0, torch.device("cpu"), False)
    extractor = get_extractor("digits", device=torch.device("cpu"))
    fid = fid_from_features(extractor(torch.from_numpy(x)), extractor(load_dataset("digits").images))
    # Measured with these settings: a random-weights UNet of the same shape scores 37.8, a
    # half-trained teacher (1,500 steps) 4.95; 10 leaves room for other CPUs' rounding.
    assert fid < 10.0, f"digits FID of the shipped teacher (200 samples, DDIM 25): {fid:.2f}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shipped_cond_teacher_draws_the_class_asked_for(tmp_path, seed: int) -> None:
    """`o2m sample digits-cond-teacher --class 3 -n 200 --seed S` (its defaults: DDIM 50): the independent digits
    classifier reads at least 95% as 3 at every seed (measured when it was shipped, seeds 0..4: 97.5, 98.5, 99.5,
    98.0, 99.5%; recipes/digits-cond-teacher-check.sh). The first shipped teacher read 93.5% at seed 1."""
    from o2mcli.stages.sample import SampleConfig, run_sample

    teacher = load_model(BUILTIN_MODELS["digits-cond-teacher"])
    assert teacher.conditioning == {"type": "class", "classes": list("0123456789"), "null_class": 10,
                                   "label_dropout": 0.1}
    out = run_sample(SampleConfig(model="digits-cond-teacher", classes=(3,), n=200, seed=seed, device="cpu",
                                  png=False, out=tmp_path / "s"))
    with np.load(out / "samples.npz") as z:
        images, labels = z["images"], z["labels"]
    predicted = get_extractor("digits", device=torch.device("cpu")).classify(images)
    assert (labels == 3).all() and (predicted == 3).mean() >= 0.95, (predicted == 3).mean()
