"""Model I/O: every input form round-trips to identical outputs; bad inputs get one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_scheduler, tiny_unet
from o2mcli.errors import O2MError
from o2mcli.outputs import atomic_dir
from o2mcli.manifest import write_manifest
from o2mcli.models import StudentGroup, load_model, save_model_file
from o2mcli.models.io import model_record
from o2mcli.models.stats import count_macs, count_params


def _out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    x = torch.randn(3, c, s, s, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([1, 500, 999])).sample


@pytest.mark.parametrize("variance", ["fixed", "learned"])
@pytest.mark.parametrize("form", ["o2m-file", "diffusers-model", "diffusers-pipeline", "stage"])
def test_round_trip_identical_outputs(tmp_path: Path, form: str, variance: str) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler

    unet, sched = tiny_unet(variance, attention=variance == "fixed"), tiny_scheduler(variance)
    if form == "o2m-file":
        path = save_model_file(tmp_path / "m.safetensors", unet, sched, kind="teacher")
    elif form == "diffusers-model":
        path = tmp_path / "unet"
        unet.save_pretrained(path, safe_serialization=True)
    elif form == "diffusers-pipeline":
        path = tmp_path / "pipe"
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(sched)).save_pretrained(path, safe_serialization=True)
    else:
        path = tmp_path / "teacher"
        with atomic_dir(path) as tmp:
            save_model_file(tmp / "model.safetensors", unet, sched, kind="teacher")
            write_manifest(tmp, "teacher", {}, models=[model_record("t", "model.safetensors", unet, (0, 1000))],
                           scheduler_config=sched)
    loaded = load_model(path)
    assert torch.equal(_out(loaded.unet), _out(unet))
    assert loaded.scheduler_config["variance_type"] == sched["variance_type"] or form == "diffusers-model"
    assert loaded.ranges == [(0, 1000)]


def test_o2m_file_is_self_describing(tiny_model_file: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_model_file), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "o2m-denoiser/2"
    assert json.loads(meta["o2m.denoiser_config"])["block_out_channels"] == [4, 8]
    assert json.loads(meta["o2m.scheduler_config"])["num_train_timesteps"] == 1000
    assert json.loads(meta["o2m.timestep_range"]) == [0, 1000]


def test_save_refuses_overwrite(tiny_model_file: Path) -> None:
    with pytest.raises(O2MError, match="already exists"):
        save_model_file(tiny_model_file, tiny_unet(), tiny_scheduler(), kind="teacher")


def test_missing_and_truncated_files(tmp_path: Path, tiny_model_file: Path) -> None:
    with pytest.raises(O2MError, match="no such model"):
        load_model(tmp_path / "nope.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_model_file.read_bytes()[:-100])
    with pytest.raises(O2MError, match="corrupt or truncated"):
        load_model(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 7)
    with pytest.raises(O2MError, match="corrupt or truncated"):
        load_model(junk)


def test_pickle_checkpoints_refused(tmp_path: Path) -> None:
    for name in ("model.bin", "model.pt", "model.ckpt"):
        (tmp_path / name).write_bytes(b"not read")
        with pytest.raises(O2MError, match="pickle"):
            load_model(tmp_path / name)
    d = tmp_path / "bin_dir"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(tiny_unet().config)))
    (d / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(O2MError, match="safetensors weights only"):
        load_model(d)


def test_config_that_does_not_match_weights(tmp_path: Path) -> None:
    unet = tiny_unet()
    d = tmp_path / "unet"
    unet.save_pretrained(d, safe_serialization=True)
    cfg = json.loads((d / "config.json").read_text())
    cfg["block_out_channels"] = [8, 8]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(O2MError, match="config does not match the weights"):
        load_model(d)


def test_unsupported_class_and_bare_safetensors(tmp_path: Path) -> None:
    d = tmp_path / "cond"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    save_file({"w": torch.zeros(1)}, str(d / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(O2MError, match="found a PixArtTransformer2DModel"):
        load_model(d)
    bare = tmp_path / "bare" / "w.safetensors"
    bare.parent.mkdir()
    save_file({"w": torch.zeros(1)}, str(bare))
    with pytest.raises(O2MError, match="without o2m metadata"):
        load_model(bare)
    with pytest.raises(O2MError, match="not a model"):
        load_model(tmp_path)


def test_stage_dir_wrong_kind_refused(tmp_path: Path) -> None:
    out = tmp_path / "samples"
    with atomic_dir(out) as tmp:
        (tmp / "x.txt").write_text("x")
        write_manifest(tmp, "samples", {})
    with pytest.raises(O2MError, match="kind is 'samples'"):
        load_model(out)


def test_student_group_routes_by_timestep(tmp_path: Path) -> None:
    a, b = tiny_unet(seed=1), tiny_unet(seed=2)
    group = StudentGroup([a, b], [(0, 400), (400, 1000)])
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 399, 400, 999])
    with torch.no_grad():
        out = group(x, t)
        ref_a, ref_b = a(x, t).sample, b(x, t).sample
    assert torch.allclose(out[:2], ref_a[:2], atol=1e-6) and torch.allclose(out[2:], ref_b[2:], atol=1e-6)
    assert group.served == [2, 2]
    with torch.no_grad():
        group(x, torch.tensor(450))
    assert group.served == [2, 6]
    with pytest.raises(O2MError, match="contiguous"):
        StudentGroup([a, b], [(0, 400), (500, 1000)])


def test_students_stage_dir_loads_as_group(tmp_path: Path) -> None:
    units = [tiny_unet(seed=k) for k in range(3)]
    ranges = [(0, 300), (300, 700), (700, 1000)]
    out = tmp_path / "students"
    with atomic_dir(out) as tmp:
        recs = []
        for k, (u, r) in enumerate(zip(units, ranges)):
            save_model_file(tmp / f"student_{k}.safetensors", u, tiny_scheduler(), kind="student", timestep_range=r)
            recs.append(model_record(f"student_{k}", f"student_{k}.safetensors", u, r))
        write_manifest(tmp, "students", {}, models=recs, scheduler_config=tiny_scheduler())
    loaded = load_model(out)
    assert loaded.is_group and loaded.ranges == ranges
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.unet(x, torch.tensor(500)), units[1](x, torch.tensor(500)).sample)


def test_params_and_macs_of_ddpm_cifar10_config() -> None:
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=2, norm_num_groups=32)
    assert abs(count_params(unet) / 1e6 - 35.7) < 0.1
    assert 5.9e9 < count_macs(unet) < 6.2e9  # the papers' 6.1 G
