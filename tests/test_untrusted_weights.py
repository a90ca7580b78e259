"""Model files o2m did not write (issue #16): the config a file carries is checked against its tensors' header
(dtypes, bytes, names and shapes) before any real model is built or any tensor read.

The files here are written byte by byte (8-byte little-endian header length, JSON header, data), as a crafted
file would be, so the checks do not lean on o2m's or safetensors' writers.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_refused, cli, tiny_scheduler, tiny_unet
from o2mcli.errors import O2MError
from o2mcli.models.configs import unet_config
from o2mcli.models.io import FORMAT, load_model, save_model_file, unet_config_of

O2M = str(Path(sys.executable).with_name("o2m"))
# The config a crafted file below claims: 4 GiB of float32 weights (diffusers' own count for this config is
# 1.1e9 parameters), against a file of about 2 KB.
HUGE = unet_config(sample_size=8, channels=1, variance="fixed", block_out_channels=(2048, 2048), layers_per_block=1,
                   norm_num_groups=32, attention_level=None)


def write_raw(path: Path, tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str]) -> Path:
    """A safetensors file from its parts: name -> (dtype, shape, raw bytes); offsets laid end to end."""
    header: dict = {"__metadata__": metadata}
    data, at = b"", 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(raw)]}
        data += raw
        at += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def o2m_meta(cfg: dict) -> dict[str, str]:
    """The metadata of an o2m model file holding ``cfg``."""
    return {"format": FORMAT, "o2m.kind": "teacher", "o2m.denoiser_config": json.dumps(cfg),
            "o2m.scheduler_config": json.dumps(tiny_scheduler()), "o2m.timestep_range": json.dumps([0, 1000]),
            "o2m.provenance": "{}"}


def huge_file(path: Path) -> Path:
    """A 2 KB o2m file whose config describes a 4 GiB UNet, with a few one-element tensors."""
    one = struct.pack("<f", 0.5)
    return write_raw(path, {"conv_in.weight": ("F32", [1], one), "conv_in.bias": ("F32", [1], one),
                            "conv_out.weight": ("F32", [1], one)}, o2m_meta(HUGE))


def run_measured(*args: str, timeout: float = 120) -> tuple[int, str, float, float]:
    """``o2m *args`` in a subprocess of a small wrapper process: (exit code, stderr, seconds, the CLI process's
    peak RSS in MiB, from the wrapper's getrusage(RUSAGE_CHILDREN), which has no other child)."""
    wrapper = ("import resource, subprocess, sys, json\n"
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"  # KiB on Linux
               "print(json.dumps({'rc': r.returncode, 'err': r.stderr, 'peak_kib': peak}))\n")
    env = dict(os.environ, O2M_PROGRESS="0", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", wrapper, O2M, *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    took = time.time() - t0
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    return rec["rc"], rec["err"], took, rec["peak_kib"] / 1024


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", ["info", "sample"])
def test_small_file_with_huge_config_is_refused_without_allocating(tmp_path: Path, command: str) -> None:
    path = huge_file(tmp_path / "crafted.safetensors")
    assert path.stat().st_size < 4096
    args = [command, str(path)] + (["-n", "1", "--device", "cpu", "-o", str(tmp_path / "s")]
                                   if command == "sample" else [])
    rc, err, took, peak_mib = run_measured(*args)
    assert peak_mib < 2048, f"peak RSS {peak_mib:.0f} MiB: the 4 GiB model was built"
    line = one_error_line(err)
    assert rc == 2, err
    assert str(path) in line and "implies 4.1 GiB" in line, line
    assert took < 60, took
    assert not (tmp_path / "s").exists()


def valid_state() -> tuple[dict[str, torch.Tensor], dict]:
    unet = tiny_unet()
    return {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}, unet_config_of(unet)


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch):
    """Reading any tensor data fails the test: the refusals below must come from the header alone."""
    import safetensors.torch

    def refuse(*a, **k):
        raise AssertionError("tensor data was read before the header was checked")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)


def test_int64_weight_is_refused_by_name(tmp_path: Path, no_tensor_reads) -> None:
    state, cfg = valid_state()
    state["conv_in.bias"] = torch.arange(state["conv_in.bias"].numel(), dtype=torch.int64)
    path = tmp_path / "ints.safetensors"
    save_file(state, str(path), metadata=o2m_meta(cfg))
    assert_refused(cli("info", path), str(path), "'conv_in.bias'", "I64")


@pytest.mark.parametrize("dtype", ["I32", "U8", "BOOL"])
def test_other_integer_weights_are_refused(tmp_path: Path, dtype: str, no_tensor_reads) -> None:
    state, cfg = valid_state()
    size = {"I32": 4, "U8": 1, "BOOL": 1}[dtype]
    tensors = {k: ("F32", list(v.shape), v.numpy().tobytes()) for k, v in state.items()}
    n = state["conv_out.bias"].numel()
    tensors["conv_out.bias"] = (dtype, [n], bytes(n * size))
    path = write_raw(tmp_path / "ints.safetensors", tensors, o2m_meta(cfg))
    with pytest.raises(O2MError, match=rf"'conv_out\.bias' has dtype {dtype}"):
        load_model(path)


def test_wrong_shape_is_refused_naming_tensor_and_both_shapes(tmp_path: Path, no_tensor_reads) -> None:
    state, cfg = valid_state()
    assert tuple(state["conv_in.weight"].shape) == (4, 1, 3, 3)
    state["conv_in.weight"] = torch.zeros(4, 1, 1, 1)
    path = tmp_path / "shape.safetensors"
    save_file(state, str(path), metadata=o2m_meta(cfg))
    assert_refused(cli("info", path), str(path), "conv_in.weight", "(4, 1, 1, 1)", "(4, 1, 3, 3)")


def test_missing_and_unexpected_tensors_are_refused_before_reading(tmp_path: Path, no_tensor_reads) -> None:
    state, cfg = valid_state()
    gone = dict(state)
    del gone["conv_out.weight"]
    save_file(gone, str(tmp_path / "missing.safetensors"), metadata=o2m_meta(cfg))
    assert_refused(cli("info", tmp_path / "missing.safetensors"), "missing conv_out.weight")
    extra = dict(state, **{"zzz.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"), metadata=o2m_meta(cfg))
    assert_refused(cli("info", tmp_path / "extra.safetensors"), "unexpected zzz.weight")


def test_header_claiming_more_bytes_than_the_file_is_refused(tmp_path: Path) -> None:
    cfg = valid_state()[1]
    path = write_raw(tmp_path / "claims.safetensors", {"conv_in.weight": ("F32", [4, 1, 3, 3], b"")}, o2m_meta(cfg))
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["conv_in.weight"]["data_offsets"] = [0, 144]  # 144 bytes claimed, none there
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    assert_refused(cli("info", path), str(path), "corrupt or truncated")


def test_diffusers_directory_with_crafted_config_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(HUGE))
    one = struct.pack("<f", 0.5)
    write_raw(model / "diffusion_pytorch_model.safetensors", {"conv_in.weight": ("F32", [1], one)}, {})
    with pytest.raises(O2MError, match="implies 4.1 GiB of weights but diffusion_pytorch_model.safetensors holds"):
        load_model(model)


def test_hard_cap_on_model_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import o2mcli.models.guard as guard

    path = tmp_path / "ok.safetensors"
    save_model_file(path, tiny_unet(), tiny_scheduler(), kind="teacher")
    monkeypatch.setattr(guard, "MAX_MODEL_BYTES", 1024)
    with pytest.raises(O2MError, match=r"of weights; refused \(at most 1\.0 KiB\)"):
        load_model(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_weights_still_load(tmp_path: Path, dtype: torch.dtype) -> None:
    state, cfg = valid_state()
    path = tmp_path / "half.safetensors"
    save_file({k: v.to(dtype) for k, v in state.items()}, str(path), metadata=o2m_meta(cfg))
    loaded = load_model(path)
    got = loaded.unet.state_dict()
    for k, v in load_file(str(path)).items():
        assert torch.equal(got[k], v.to(torch.float32)), k


def test_stable_diffusion_parts_are_checked_before_building(tmp_path: Path) -> None:
    """The VAE and text encoder a pipeline brings go through the same checks; the integer position_ids buffer
    older text encoder exports carry is the one non-float tensor taken (and left out of the load)."""
    import shutil

    from sd_tiny import save_tiny_sd

    from o2mcli.models.families.stable_diffusion import load_sd_parts

    folder = save_tiny_sd(tmp_path / "sd")
    text_w = folder / "text_encoder" / "model.safetensors"
    state = load_file(str(text_w))
    n = state["embeddings.position_embedding.weight"].shape[0]
    state["embeddings.position_ids"] = torch.arange(n, dtype=torch.int64)[None]
    save_file(state, str(text_w), metadata={"format": "pt"})
    parts = load_sd_parts(folder)  # an old-style export still loads
    assert torch.equal(parts.text_encoder.state_dict()["embeddings.position_embedding.weight"],
                       state["embeddings.position_embedding.weight"])

    ints = tmp_path / "ints"
    shutil.copytree(folder, ints)
    vae_w = ints / "vae" / "diffusion_pytorch_model.safetensors"
    vae = load_file(str(vae_w))
    vae["decoder.conv_out.bias"] = vae["decoder.conv_out.bias"].to(torch.int64)
    save_file(vae, str(vae_w))
    with pytest.raises(O2MError, match=r"'decoder\.conv_out\.bias' has dtype I64"):
        load_sd_parts(ints)

    crafted = tmp_path / "crafted"
    shutil.copytree(folder, crafted)
    cfg = json.loads((crafted / "text_encoder" / "config.json").read_text())
    cfg.update(hidden_size=4096, intermediate_size=16384, num_hidden_layers=4)  # ~1 GiB of float32 weights
    (crafted / "text_encoder" / "config.json").write_text(json.dumps(cfg))
    unet_cfg = json.loads((crafted / "unet" / "config.json").read_text())  # the UNet's width agreeing (issue #23)
    (crafted / "unet" / "config.json").write_text(json.dumps({**unet_cfg, "cross_attention_dim": 4096}))
    with pytest.raises(O2MError, match=r"text_encoder: the model config implies .* GiB of weights but "
                                       r"model.safetensors holds"):
        load_sd_parts(crafted, unet=False)


@pytest.mark.parametrize("command", ["train", "distill"])
def test_a_fresh_model_config_over_the_cap_is_refused_before_building(in_tmp: Path, command: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """--model-config / --student-config build a model from a config alone: it is sized on the meta device first."""
    import o2mcli.models.guard as guard

    cfg = unet_config(sample_size=8, channels=1, block_out_channels=(64, 64), norm_num_groups=2, attention_level=None)
    path = in_tmp / "big.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.setattr(guard, "MAX_MODEL_BYTES", 100_000)  # this config is ~0.5 MB: "too big" for the test
    if command == "train":
        res = cli("train", "--model-config", path, "--steps", "1", "-o", "t")
    else:
        teacher = in_tmp / "teacher.safetensors"
        save_model_file(teacher, tiny_unet(), tiny_scheduler(), kind="teacher")
        res = cli("distill", "--mode", "dkdm", "--teacher", teacher, "--student-config", path, "--steps", "1",
                  "-o", "s")
    assert_refused(res, "big.json", "implies", "refused (at most 97.7 KiB)")
    assert not (in_tmp / "t").exists() and not (in_tmp / "s").exists()
