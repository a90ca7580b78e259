"""The denoiser interface: families by _class_name, one predict for a model, a DDP wrapper or a group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_unet
from o2mcli.errors import O2MError
from o2mcli.models.denoise import predict
from o2mcli.models.families import FAMILIES, DenoiserFamily, family_for_config, family_of
from o2mcli.models.group import StudentGroup


def test_unet2d_is_the_first_family() -> None:
    unet = tiny_unet(variance="learned")
    assert family_of(unet) is FAMILIES["UNet2DModel"] is family_for_config(dict(unet.config), Path("x"))
    assert family_for_config({"in_channels": 1}, Path("x")) is FAMILIES["UNet2DModel"]  # o2m's older files
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])
    with torch.no_grad():
        out = predict(unet, x, t)
        assert out.shape == (3, 2, 8, 8) and torch.equal(out, unet(x, t).sample)


def test_an_unsupported_family_is_refused_by_name() -> None:
    with pytest.raises(O2MError, match=r"x.json: found a UNet2DConditionModel; o2m supports UNet2DModel"):
        family_for_config({"_class_name": "UNet2DConditionModel"}, Path("x.json"))
    with pytest.raises(O2MError, match="a Linear is not a model family"):
        family_of(torch.nn.Linear(2, 2))


def test_a_group_predicts_like_its_students_and_passes_the_condition() -> None:
    seen = []

    class Recording(DenoiserFamily):
        """The UNet family, recording the condition each call received."""

        name = "UNet2DModel"

        def predict(self, model, x_t, t, cond=None):
            seen.append(None if cond is None else cond.tolist())
            return model(x_t, t).sample

    a, b = tiny_unet(seed=1), tiny_unet(seed=2)
    group = StudentGroup([a, b], [(0, 400), (400, 1000)])
    x, t, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 450, 399, 999]), torch.tensor([7, 8, 9, 10])
    with torch.no_grad():
        out = predict(group, x, t)
        assert torch.equal(out[[0, 2]], a(x[[0, 2]], t[[0, 2]]).sample)
        assert torch.equal(out[[1, 3]], b(x[[1, 3]], t[[1, 3]]).sample)
        original = FAMILIES._items["UNet2DModel"]
        FAMILIES._items["UNet2DModel"] = Recording()
        try:
            predict(group, x, t, labels)
        finally:
            FAMILIES._items["UNet2DModel"] = original
    assert seen == [[7, 9], [8, 10]]  # each student got the labels of its own samples
