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
    with pytest.raises(O2MError, match=r"x.json: found a PixArtTransformer2DModel; o2m supports UNet2DModel, "
                                       r"UNet2DConditionModel, DiTTransformer2DModel$"):
        family_for_config({"_class_name": "PixArtTransformer2DModel"}, Path("x.json"))
    # A family built ahead of its stages: known, but refused when a model is loaded for a stage.
    from o2mcli.models.families import FAMILIES

    class Early(DenoiserFamily):
        name = "EarlyModel"
        not_yet = "not served by o2m's stages yet (issue #99)"

    FAMILIES.register(Early.name, Early())
    try:
        assert family_for_config({"_class_name": "EarlyModel"}, Path("x.json")).name == "EarlyModel"
        with pytest.raises(O2MError, match=r"x.json: found a EarlyModel: not served by o2m's stages yet \(issue #99\)"):
            family_for_config({"_class_name": "EarlyModel"}, Path("x.json"), served=True)
    finally:
        FAMILIES._items.pop("EarlyModel", None)
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


def test_the_family_gives_shapes_kd_points_and_its_pipeline() -> None:
    from diffusers import DDPMPipeline, DDPMScheduler

    from o2mcli.models.denoise import input_shape

    unet = tiny_unet()
    fam = family_of(unet)
    assert input_shape(unet) == fam.input_shape(unet) == (1, 8, 8)
    assert input_shape(StudentGroup([unet, tiny_unet(seed=3)], [(0, 500), (500, 1000)])) == (1, 8, 8)
    points = fam.feature_points(unet)
    assert points[0] == "down_blocks.0" and "mid_block" in points and points[-1].startswith("up_blocks.")
    assert all(unet.get_submodule(p) is not None for p in points)
    assert isinstance(fam.pipeline(unet, DDPMScheduler()), DDPMPipeline)


def test_prune_finds_its_pruner_by_family() -> None:
    from o2mcli.pruning.pruners import PRUNERS, pruner_for

    unet = tiny_unet(block_out_channels=(8, 16))
    pruner = pruner_for(dict(unet.config), Path("t"))
    assert pruner is PRUNERS["UNet2DModel"] and set(PRUNERS) <= set(FAMILIES)
    with pytest.raises(O2MError, match=r"^t: found a PixArtTransformer2DModel; o2m prune supports UNet2DModel, "
                                       r"UNet2DConditionModel, DiTTransformer2DModel$"):
        pruner_for({"_class_name": "PixArtTransformer2DModel"}, Path("t"))
    plan = pruner.plan(dict(unet.config), 0.5, None, None)
    assert plan.new_channels == (4, 8) and plan.old_channels == (8, 16)
    # (4, 8) -> (4, 4) would drop a trained shortcut conv that no diffusers config of equal widths holds.
    with pytest.raises(O2MError, match=r"\[4, 8\] -> \[4, 4\].*conv_shortcut"):
        pruner.plan(dict(tiny_unet().config), 0.5, None, None)
