"""Issue 11's red-team cases: each is refused with one line and exit 2, nothing written, nothing damaged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import assert_refused, cli, distilled_students
from o2mcli.fsutil import sha256_file

SAMPLE = ["-n", "2", "--steps", "2", "--device", "cpu"]


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its hash: to show nothing was touched."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def students(in_tmp: Path) -> Path:
    return distilled_students(in_tmp, "st_in", k=2, steps=2)


@pytest.fixture
def userdata(in_tmp: Path) -> Path:
    d = in_tmp / "userdata"
    (d / "sub").mkdir(parents=True)
    (d / "thesis.txt").write_text("four years of work")
    (d / "sub" / "notes.md").write_text("more")
    return d


# 1. --force never destroys an input, nor anything o2m did not write ----------------------------------------

def test_merge_output_onto_its_input_is_refused_even_with_force(students: Path, in_tmp: Path) -> None:
    before = _tree(students)
    for out, how in [("st_in", "is"), ("st_in/merged.safetensors", "lies inside"), (".", "working directory")]:
        assert_refused(cli("merge", "st_in", "-o", out, "--force"), how)
    assert _tree(students) == before


def test_output_containing_an_input_is_refused(students: Path, in_tmp: Path) -> None:
    (in_tmp / "outer").mkdir()
    os.replace(students, in_tmp / "outer" / "st_in")
    assert_refused(cli("merge", "outer/st_in", "-o", "outer", "--force"), "contains the input")
    assert (in_tmp / "outer" / "st_in" / "manifest.json").is_file()


def test_force_replaces_only_what_o2m_wrote(in_tmp: Path, userdata: Path, tiny_model_file: Path) -> None:
    before = _tree(userdata)
    res = cli("sample", tiny_model_file, *SAMPLE, "-o", "userdata", "--force")
    assert_refused(res, "userdata", "o2m did not write")
    assert _tree(userdata) == before
    (in_tmp / "plain.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":{}}        ")
    assert_refused(cli("merge", "x", "y", "-o", "plain.safetensors", "--force"), "plain.safetensors")
    assert_refused(cli("sample", tiny_model_file, *SAMPLE, "-o", ".", "--force"), "working directory")
    # What o2m wrote is still replaced with --force.
    assert cli("sample", tiny_model_file, *SAMPLE, "-o", "s").exit_code == 0
    assert cli("sample", tiny_model_file, *SAMPLE, "-o", "s", "--force").exit_code == 0
    assert (in_tmp / "s" / "manifest.json").is_file()


def test_export_force_replaces_its_own_pipeline_only(in_tmp: Path, userdata: Path, tiny_model_file: Path) -> None:
    assert cli("export", tiny_model_file, "-o", "pipe").exit_code == 0
    assert (in_tmp / "pipe" / "o2m_export.json").is_file()
    assert cli("export", tiny_model_file, "-o", "pipe", "--force").exit_code == 0
    before = _tree(userdata)
    assert_refused(cli("export", tiny_model_file, "-o", "userdata", "--force"), "o2m did not write")
    assert _tree(userdata) == before


def test_symlinked_output_is_not_replaced(in_tmp: Path, userdata: Path, tiny_model_file: Path) -> None:
    os.symlink(userdata, in_tmp / "link")
    assert_refused(cli("sample", tiny_model_file, *SAMPLE, "-o", "link", "--force"), "symbolic link")
    assert (userdata / "thesis.txt").read_text() == "four years of work"


# 2. Merge weights that write theta_0 back ------------------------------------------------------------------------

def test_merge_all_zero_weights_is_refused(students: Path, in_tmp: Path) -> None:
    assert_refused(cli("merge", "st_in", "--weights", "0,0", "-o", "m.safetensors"), "--weights", "initialization")
    assert not (in_tmp / "m.safetensors").exists()


# 3. --seed beyond 64 bits ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [str(2 ** 64), "-1"])
def test_seed_out_of_range_is_refused(in_tmp: Path, tiny_model_file: Path, seed: str) -> None:
    assert_refused(cli("sample", tiny_model_file, *SAMPLE, "--seed", seed, "-o", "s"), "--seed")
    assert not (in_tmp / "s").exists()


# 4. Crafted manifests --------------------------------------------------------------------------------------------

def _stage_with_manifest(in_tmp: Path, text: str) -> Path:
    d = in_tmp / "crafted"
    d.mkdir()
    (d / "manifest.json").write_text(text)
    return d


def test_deeply_nested_manifest_is_refused(in_tmp: Path) -> None:
    d = _stage_with_manifest(in_tmp, "[" * 100_000 + "]" * 100_000)
    assert_refused(cli("info", d), "manifest.json", "nested")


def test_manifest_path_with_nul_byte_is_refused(in_tmp: Path, tiny_model_file: Path) -> None:
    assert cli("sample", tiny_model_file, *SAMPLE, "-o", "s").exit_code == 0
    man = json.loads((in_tmp / "s" / "manifest.json").read_text())
    man["artifacts"][0]["path"] = "samples\u0000.npz"
    (in_tmp / "s" / "manifest.json").write_text(json.dumps(man))
    assert_refused(cli("info", "s"), "s")


# 5. Crafted model metadata ------------------------------------------------------------------------------------

def _recraft(src: Path, dst: Path, **meta_changes: str) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_changes)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _with_unet(src: Path, **changes) -> str:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        cfg = json.loads(f.metadata()["o2m.denoiser_config"])
    cfg.update(changes)
    return json.dumps(cfg)


def _with_sched(src: Path, **changes) -> str:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        cfg = json.loads(f.metadata()["o2m.scheduler_config"])
    cfg.update(changes)
    return json.dumps(cfg)


@pytest.mark.parametrize("case,words", [
    ("unet_list", ["UNet config is a JSON list"]),
    ("sched_string", ["scheduler config is a JSON str"]),
    ("beta_schedule", ["beta_schedule 'cosmic'"]),
    ("sample_size", ["sample_size", "GiB"]),
    ("inverted_range", ["[700, 300]", "inverted"]),
    ("empty_range", ["[300, 300]"]),
])
def test_crafted_metadata_is_refused(in_tmp: Path, tiny_model_file: Path, case: str, words) -> None:
    meta = {
        "unet_list": {"o2m.denoiser_config": "[1, 2, 3]"},
        "sched_string": {"o2m.scheduler_config": json.dumps("ddpm")},
        "beta_schedule": {"o2m.scheduler_config": _with_sched(tiny_model_file, beta_schedule="cosmic")},
        "sample_size": {"o2m.denoiser_config": _with_unet(tiny_model_file, sample_size=2048,
                                                     block_out_channels=[16384, 16384])},
        "inverted_range": {"o2m.timestep_range": "[700, 300]"},
        "empty_range": {"o2m.timestep_range": "[300, 300]"},
    }[case]
    bad = _recraft(tiny_model_file, in_tmp / "bad.safetensors", **meta)
    assert_refused(cli("sample", bad, *SAMPLE, "-o", "s"), "bad.safetensors", *words)
    assert not (in_tmp / "s").exists()


# 6. Write failures: one line, exit 2, no temporary file left ------------------------------------------------------

def test_full_disk_is_a_clear_error_and_leaves_no_temp_files(in_tmp: Path, tiny_model_file: Path, monkeypatch) -> None:
    import errno

    import o2mcli.outputs as outputs

    def no_space(src, dst, flags):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(outputs, "_move", no_space)  # every rename of an output goes through _move
    res = cli("sample", tiny_model_file, *SAMPLE, "-o", "s")
    assert_refused(res, "No space left on device", "s")
    assert not (in_tmp / "s").exists()
    assert not [p for p in in_tmp.rglob("*") if ".tmp-o2m" in p.name or ".old-o2m" in p.name]


def test_unwritable_output_directory_is_a_clear_error(in_tmp: Path, tiny_model_file: Path, monkeypatch) -> None:
    import errno
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(in_tmp / "ro"))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert_refused(cli("sample", tiny_model_file, *SAMPLE, "-o", "ro/s"), "Read-only file system")


def test_decompression_bomb_in_a_folder_is_refused(in_tmp: Path) -> None:
    import struct
    import zlib

    from PIL import Image

    d = in_tmp / "imgs"
    d.mkdir()
    Image.new("L", (8, 8)).save(d / "a.png")
    raw = bytearray((d / "a.png").read_bytes())
    # Rewrite the IHDR chunk's width and height (and its CRC): a header that claims 100000 x 100000 pixels.
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4:ihdr + 12] = struct.pack(">II", 100_000, 100_000)
    raw[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr:ihdr + 17])) & 0xFFFFFFFF)
    (d / "b.png").write_bytes(bytes(raw))
    (d / "a.png").unlink()
    assert_refused(cli("train", "--data", "imgs", "--steps", "1", "--device", "cpu", "-o", "t"), "b.png", "decompression bomb")
    assert not (in_tmp / "t").exists()


# 7. Order of checks: a bad option is named even when an interrupted run is there ----------------------------------

def test_train_names_a_bad_device_before_an_interrupted_run(in_tmp: Path) -> None:
    (in_tmp / "t.partial").mkdir()
    res = cli("train", "--steps", "1", "--device", "tpu", "-o", "t")
    assert_refused(res, "tpu")
    assert "interrupted" not in res.stderr
