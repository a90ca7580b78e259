"""Manifest schema 2 and model files ``o2m-denoiser/2`` (issue #24): what o2m writes names the denoiser, and the
files today's o2m wrote before the rename (``tests/fixtures/v1``: ``o2m-unet/1`` model files, schema-1 manifests with
``unet_config``) still load and go through every stage."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import ok
from o2mcli.fsutil import read_metadata
from o2mcli.models.io import load_model

V1 = Path(__file__).resolve().parent / "fixtures" / "v1"


def test_the_fixtures_are_the_old_formats() -> None:
    """(So this file tests what it says: the committed files are schema 1 and o2m-unet/1, never regenerated.)"""
    for name in ("teacher.safetensors", "merged.safetensors", "tpl/template.safetensors", "st/student_0.safetensors"):
        meta = read_metadata(V1 / name)
        assert meta["format"] == "o2m-unet/1" and "o2m.unet_config" in meta and "o2m.denoiser_config" not in meta
    for d in ("tpl", "st"):
        man = json.loads((V1 / d / "manifest.json").read_text())
        assert man["schema_version"] == 1 and "unet_config" in man["models"][0]


def test_old_files_and_manifests_load_with_their_configs() -> None:
    teacher, tpl, st, merged = (load_model(V1 / p) for p in ("teacher.safetensors", "tpl", "st", "merged.safetensors"))
    assert teacher.denoiser_configs[0]["block_out_channels"] == [8, 16]
    assert tpl.denoiser_configs[0]["block_out_channels"] == [4, 8]
    assert st.is_group and st.ranges == [(0, 500), (500, 1000)] and len(st.denoiser_configs) == 2
    assert st.manifest.models[0].denoiser_config == json.loads((V1 / "st" / "manifest.json").read_text())[
        "models"][0]["unet_config"]
    # merged = the average of the students here (task arithmetic, lambda 1 over a shared theta_0, two students)
    s0, s1 = (m.state_dict() for m in st.denoiser.students)
    m = merged.denoiser.state_dict()
    assert all(torch.allclose(m[k], (s0[k] + s1[k]) / 2, atol=1e-6) for k in m)
    assert teacher.unet is teacher.denoiser and teacher.unet_configs == teacher.denoiser_configs  # the old names


def test_old_inputs_go_through_the_stages_and_the_outputs_are_schema_2(in_tmp: Path) -> None:
    ok("sample", str(V1 / "st"), "-n", "2", "--steps", "2", "--device", "cpu", "--no-png", "-o", "s")
    ok("distill", str(V1 / "tpl"), "--teacher", str(V1 / "teacher.safetensors"), "-k", "2", "--steps", "1", "-b",
       "4", "--device", "cpu", "-o", "st2")
    ok("merge", str(V1 / "st"), "-o", "m.safetensors")
    ok("prune", str(V1 / "teacher.safetensors"), "--ratio", "0.5", "--no-throughput", "-o", "tpl2")
    man = json.loads((in_tmp / "st2" / "manifest.json").read_text())
    assert man["schema_version"] == 2 and set(man["models"][0]) >= {"denoiser_config"}
    assert "unet_config" not in man["models"][0]
    meta = read_metadata(in_tmp / "m.safetensors")
    assert meta["format"] == "o2m-denoiser/2" and "o2m.denoiser_config" in meta and "o2m.unet_config" not in meta
    info = json.loads(ok("info", str(V1 / "st"), "--json"))
    assert info["models"][0]["denoiser_config"]["block_out_channels"] == [4, 8]
    assert np_images(in_tmp / "s").shape == (2, 8, 8, 1)


def np_images(folder: Path):
    import numpy as np

    return np.load(folder / "samples.npz")["images"]


def test_an_unknown_schema_is_refused_by_name(in_tmp: Path) -> None:
    import shutil

    from conftest import assert_refused, cli

    shutil.copytree(V1 / "tpl", in_tmp / "tpl")
    man = json.loads((in_tmp / "tpl" / "manifest.json").read_text())
    (in_tmp / "tpl" / "manifest.json").write_text(json.dumps({**man, "schema_version": 3}))
    assert_refused(cli("info", "tpl"), "schema_version 3", "1, 2")
