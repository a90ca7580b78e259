"""Issue 23: nothing a run reads, names, or that its inputs' provenance or conditioning records point to is ever an
output, with or without --force. Each case runs through the CLI and checks every input's bytes afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_refused, cli, ok, tiny_teacher_file
from o2mcli.fsutil import sha256_file
from o2mcli.models.io import load_model

SAMPLE = ["-n", "2", "--steps", "2", "--device", "cpu", "--no-png"]
DISTILL = ["--steps", "1", "-b", "2", "--device", "cpu", "--save-every", "100"]


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (a folder, or one file) with its sha256."""
    root = Path(root)
    if root.is_file():
        return {root.name: sha256_file(root)}
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("form", ["file", "export"])
def test_distill_never_replaces_the_teacher_its_template_records(in_tmp: Path, form: str) -> None:
    """``o2m prune teacher -o tpl; o2m distill tpl -o teacher --force``: the teacher is found through the template's
    provenance, not named, and is still refused (a teacher file, or a teacher that is an exported diffusers dir)."""
    tiny_teacher_file(in_tmp / "t.safetensors")
    if form == "file":
        teacher = "t.safetensors"
    else:
        ok("export", "t.safetensors", "-o", "teacher")
        teacher = "teacher"
    ok("prune", teacher, "--ratio", "0.5", "--no-throughput", "-o", "tpl")
    before, tpl = _tree(in_tmp / teacher), _tree(in_tmp / "tpl")
    res = cli("distill", "tpl", "-k", "1", *DISTILL, "-o", teacher, "--force")
    assert_refused(res, teacher, "the output is", "tpl")
    assert _tree(in_tmp / teacher) == before and _tree(in_tmp / "tpl") == tpl
    # Inside the teacher's directory is refused too (an export is a directory).
    if form == "export":
        assert_refused(cli("distill", "tpl", "-k", "1", *DISTILL, "-o", "teacher/sub"), "lies inside")
        assert _tree(in_tmp / teacher) == before
    # The run works where nothing it reads is in the way.
    ok("distill", "tpl", "-k", "1", *DISTILL, "-o", "st")


def test_merge_never_replaces_theta0(in_tmp: Path) -> None:
    """``o2m merge st -o tpl --force`` where tpl is the students' shared initialization (found through their
    provenance), for both merge methods and for a student file given alone."""
    tiny_teacher_file(in_tmp / "t.safetensors")
    ok("prune", "t.safetensors", "--ratio", "0.5", "--no-throughput", "-o", "tpl")
    ok("distill", "tpl", "-k", "2", *DISTILL, "-o", "st")
    before, teacher = _tree(in_tmp / "tpl"), _tree(in_tmp / "t.safetensors")
    for extra in ([], ["--method", "average"]):
        assert_refused(cli("merge", "st", *extra, "-o", "tpl", "--force"), "tpl", "the output is")
        assert_refused(cli("merge", "st/student_0.safetensors", "st/student_1.safetensors", *extra,
                           "-o", "t.safetensors", "--force"), "t.safetensors")
    assert _tree(in_tmp / "tpl") == before and _tree(in_tmp / "t.safetensors") == teacher
    ok("merge", "st", "-o", "m.safetensors")


def test_score_and_sample_never_replace_the_model_behind_their_input(in_tmp: Path) -> None:
    """``o2m score smp -o st --force`` where st drew smp; ``o2m sample st -o tpl --force`` where tpl is st's
    template (its manifest's parent)."""
    tiny_teacher_file(in_tmp / "t.safetensors")
    ok("prune", "t.safetensors", "--ratio", "0.5", "--no-throughput", "-o", "tpl")
    ok("distill", "tpl", "-k", "2", *DISTILL, "-o", "st")
    ok("sample", "st", *SAMPLE, "-o", "smp")
    trees = {n: _tree(in_tmp / n) for n in ("st", "tpl", "smp", "t.safetensors")}
    assert_refused(cli("score", "smp", "--ref", "digits", "-o", "st", "--force"), "st",
                   "the model that drew")
    assert_refused(cli("sample", "st", *SAMPLE, "-o", "tpl", "--force"), "tpl", "the output is")
    assert_refused(cli("sample", "st", *SAMPLE, "-o", "t.safetensors", "--force"), "t.safetensors")
    assert {n: _tree(in_tmp / n) for n in trees} == trees


def test_a_provenance_record_that_is_not_json_is_refused_in_one_line(in_tmp: Path) -> None:
    """``o2m.provenance`` of 100k nested brackets: one line for sample and info (a RecursionError before)."""
    from safetensors.torch import load_file, save_file

    from o2mcli.fsutil import read_metadata

    path = tiny_teacher_file(in_tmp / "t.safetensors")
    meta = read_metadata(path)
    for bad in ("[" * 100_000 + "]" * 100_000, '{"conditioning": ' + "[" * 100_000 + "]" * 100_000 + "}",
                "[1, 2]", "not json"):
        state = load_file(str(path))
        save_file({k: v.contiguous() for k, v in state.items()}, str(in_tmp / "bad.safetensors"),
                  metadata={**meta, "o2m.provenance": bad})
        for args in (("sample", "bad.safetensors", *SAMPLE, "-o", "s"), ("info", "bad.safetensors")):
            res = cli(*args)
            assert_refused(res, "bad.safetensors", "o2m.provenance")
        assert not (in_tmp / "s").exists()


def _sd_setup(root: Path) -> None:
    from sd_tiny import save_captioned, save_tiny_sd

    save_tiny_sd(root / "sd")
    save_captioned(root / "caps", n=4)
    ok("export", "sd", "-o", "teach")  # an o2m export of the pipeline: the teacher the rest reads
    ok("prune", "teach", "--ratio", "0.5", "--no-throughput", "-o", "tpl")


def test_stable_diffusion_teacher_pipeline_is_never_replaced(in_tmp: Path) -> None:
    """An SD teacher that is an ``o2m export`` directory: ``distill tpl --data caps -o teach --force`` used to delete
    the whole pipeline; ``export st -o teach --force`` overwrote the UNet it read the VAE and text encoder from."""
    _sd_setup(in_tmp)
    teach = _tree(in_tmp / "teach")
    assert_refused(cli("distill", "tpl", "--data", "caps", "-k", "1", *DISTILL, "-o", "teach", "--force"), "teach")
    assert _tree(in_tmp / "teach") == teach
    ok("distill", "tpl", "--data", "caps", "-k", "1", *DISTILL, "-o", "st")
    assert load_model(in_tmp / "st").conditioning["pipeline"] == str((in_tmp / "teach").resolve())
    for out in ("teach", "teach/unet"):
        assert_refused(cli("export", "st", "-o", out, "--force"), "teach")
    assert_refused(cli("sample", "st", "--prompt", "a cat", *SAMPLE, "-o", "teach", "--force"), "teach")
    assert _tree(in_tmp / "teach") == teach
    ok("export", "st", "-o", "exp")


# A full disk after the space pre-check passed: the same one-line refusal as sample's, nothing left behind -------

def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every safetensors write fails as a full disk makes it fail (the library's own error type and message)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)


@pytest.mark.parametrize("stage", ["prune", "export", "merge", "sd-export"])
def test_a_disk_that_fills_during_the_write_is_refused_in_one_line(in_tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  stage: str) -> None:
    tiny_teacher_file(in_tmp / "t.safetensors")
    if stage == "merge":
        ok("prune", "t.safetensors", "--ratio", "0.5", "--no-throughput", "-o", "tpl")
        ok("distill", "tpl", "-k", "2", *DISTILL, "-o", "st")
    if stage == "sd-export":
        from sd_tiny import save_tiny_sd

        save_tiny_sd(in_tmp / "sd")
    before = sorted(p.name for p in in_tmp.iterdir())
    _disk_full(monkeypatch)
    args = {"prune": ("prune", "t.safetensors", "--ratio", "0.5", "--no-throughput", "-o", "out"),
            "export": ("export", "t.safetensors", "-o", "out"),
            "merge": ("merge", "st", "-o", "out.safetensors"),
            "sd-export": ("export", "sd", "-o", "out")}[stage]
    res = cli(*args)
    assert_refused(res, "No space left on device", "nothing was written")
    assert sorted(p.name for p in in_tmp.iterdir()) == before  # hidden names too: no temporary, no lock left


# Model configs whose values have the wrong type: one line, for every reader of a config -------------------------

DIT = {"_class_name": "DiTTransformer2DModel", "in_channels": 1, "out_channels": 1, "sample_size": 8,
       "patch_size": 2, "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8,
       "num_embeds_ada_norm": 1, "norm_num_groups": 1}
UNET = {"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1,
        "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
        "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}


@pytest.mark.parametrize("base,key,value", [(DIT, "sample_size", [8, 8]), (DIT, "patch_size", "2"),
                                            (DIT, "num_layers", 1.0), (DIT, "in_channels", [1]),
                                            (UNET, "block_out_channels", 8), (UNET, "in_channels", [1, 1]),
                                            (UNET, "out_channels", True)])
def test_model_config_values_of_the_wrong_type_are_refused(in_tmp: Path, base: dict, key: str, value) -> None:
    (in_tmp / "c.json").write_text(json.dumps({**base, key: value}))
    assert_refused(cli("train", "--model-config", "c.json", "--steps", "1", "-b", "2", "--device", "cpu"),
                   "c.json", key)
    tiny_teacher_file(in_tmp / "t.safetensors")
    assert_refused(cli("distill", "--student-config", "c.json", "--teacher", "t.safetensors", *DISTILL), "c.json",
                   key)
    assert not (in_tmp / "teacher").exists() and not (in_tmp / "students").exists()


def test_a_unet_with_sample_size_height_width_runs_every_stage(in_tmp: Path) -> None:
    """``"sample_size": [8, 8]`` is diffusers' (H, W) form for a UNet: it trains, prunes, distils and samples."""
    (in_tmp / "c.json").write_text(json.dumps({**UNET, "sample_size": [8, 8], "block_out_channels": [16, 32]}))
    ok("train", "--model-config", "c.json", "--steps", "1", "-b", "2", "--device", "cpu", "-o", "t")
    ok("prune", "t", "--ratio", "0.5", "--no-throughput", "-o", "tpl")
    ok("distill", "tpl", "-k", "2", *DISTILL, "-o", "st")
    ok("sample", "st", *SAMPLE, "-o", "s")


def test_every_stage_refuses_what_its_input_records(in_tmp: Path) -> None:
    """Variants of the rule across stages and record kinds: a template's teacher under prune, a merged file's
    students and theta_0 under sample and export, a student file's template under sample."""
    tiny_teacher_file(in_tmp / "t.safetensors")
    ok("prune", "t.safetensors", "--ratio", "0.5", "--no-throughput", "-o", "tpl")
    ok("distill", "tpl", "-k", "2", *DISTILL, "-o", "st")
    ok("merge", "st", "-o", "m.safetensors")
    trees = {n: _tree(in_tmp / n) for n in ("t.safetensors", "tpl", "st", "m.safetensors")}
    assert_refused(cli("prune", "tpl", "--ratio", "0.5", "--no-throughput", "-o", "t.safetensors", "--force"),
                   "t.safetensors", "recorded by tpl")
    assert_refused(cli("sample", "m.safetensors", *SAMPLE, "-o", "st", "--force"), "st", "contains")
    assert_refused(cli("export", "m.safetensors", "-o", "tpl", "--force"), "tpl", "theta_0")
    assert_refused(cli("sample", "st/student_0.safetensors", *SAMPLE, "-o", "tpl", "--force"), "tpl")
    assert {n: _tree(in_tmp / n) for n in trees} == trees
