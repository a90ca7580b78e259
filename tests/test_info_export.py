"""``o2m info`` on every input form and ``o2m export`` round trips through plain diffusers."""

from __future__ import annotations

import json

import pytest
import torch

import o2mcli.chain
from conftest import assert_refused, cli, make_model_stage, tiny_scheduler, tiny_unet
from o2mcli.fsutil import sha256_file
from o2mcli.models.io import load_model, save_model_file
from o2mcli.models.stats import count_macs, count_params
from o2mcli.stages.sample import SampleConfig, run_sample




def ok(*args) -> str:
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return r.stdout


def info_json(path) -> dict:
    return json.loads(ok("info", path, "--json"))


# 1. info -----------------------------------------------------------------------------------------

def test_info_model_stage_dir(tmp_path):
    d = make_model_stage(tmp_path / "students", "students", ((0, 400), (400, 1000)))
    text = ok("info", d)
    assert "kind:        students" in text
    assert "student" in text and "t in [0, 400)" in text and "t in [400, 1000)" in text
    assert "M params" in text and "G MACs" in text and "integrity:   ok" in text
    j = info_json(d)
    assert j["kind"] == "students" and len(j["models"]) == 2
    assert j["models"][1]["timestep_range"] == [400, 1000]
    u = tiny_unet(seed=1)
    assert j["models"][0]["params"] == count_params(u) and j["models"][0]["macs"] == count_macs(u)
    assert {a["path"] for a in j["artifacts"]} == {"model_0.safetensors", "model_1.safetensors"}
    assert j["summary"] == {"note": "hi"} and j["scheduler_config"]["num_train_timesteps"] == 1000


def test_info_samples_dir_and_tampering(tmp_path, tiny_model_file):
    s = run_sample(SampleConfig(model=str(tiny_model_file), steps=1, n=3, device="cpu", out=tmp_path / "s"))
    text = ok("info", s)
    assert "kind:        samples" in text and "created_at:" in text and "versions:" in text
    assert "scheduler=ddim" in text and "model-file" in text and "samples.npz" in text
    assert "image_shape=[8, 8, 1]" in text
    j = info_json(s)
    assert j["parents"][0]["sha256"] == sha256_file(tiny_model_file)
    assert j["summary"]["n"] == 3 and j["integrity"] == "ok"
    (s / "grid.png").write_bytes(b"not a png")
    # The description is still printed, and the exit status tells a script the directory is damaged.
    r = cli("info", s, "--json")
    assert_refused(r, "integrity check failed", "grid.png")
    j = json.loads(r.stdout)
    assert "grid.png" in j["integrity"] and j["integrity"] != "ok"


def test_version_and_flags_without_a_type_label() -> None:
    from o2mcli import __version__

    assert ok("--version").strip() == f"o2m {__version__}"
    for command in ("sample", "distill", "prune", "score"):
        text = ok(command, "--help")
        assert "--force" in text and "<bool>" not in text, command
    assert "<int>" in ok("sample", "--help")  # options that take a value keep theirs


def test_info_model_file(tiny_model_file, tiny_learned_file):
    text = ok("info", tiny_model_file)
    assert "o2m-file" in text and "kind:        teacher" in text and "UNet2DModel" in text
    assert f"{count_params(tiny_unet()):,}" in text and "timesteps:   [0, 1000)" in text
    assert "variance_type=fixed_small" in text
    j = info_json(tiny_learned_file)
    u = tiny_unet("learned")
    assert j["type"] == "o2m-file" and j["kind"] == "teacher"
    assert j["params"] == count_params(u) and j["macs"] == count_macs(u) > 0
    assert j["denoiser_config"]["out_channels"] == 2 and j["scheduler_config"]["variance_type"] == "learned_range"
    assert j["timestep_range"] == [0, 1000] and j["sha256"] == sha256_file(tiny_learned_file)


def test_info_diffusers_model_dir(tmp_path):
    u = tiny_unet()
    u.save_pretrained(tmp_path / "m", safe_serialization=True)
    text = ok("info", tmp_path / "m")
    assert "diffusers-model" in text and "no scheduler config" in text
    j = info_json(tmp_path / "m")
    assert j["type"] == "diffusers-model" and j["class"] == "UNet2DModel"
    assert j["params"] == count_params(u) and j["denoiser_config"]["block_out_channels"] == [4, 8]


def test_info_pipeline_dir_and_builtin_name(tmp_path, tiny_model_file, monkeypatch):
    ok("export", tiny_model_file, "-o", tmp_path / "pipe")
    text = ok("info", tmp_path / "pipe")
    assert "diffusers-pipeline (DDPMPipeline)" in text
    j = info_json(tmp_path / "pipe")
    assert j["pipeline_class"] == "DDPMPipeline" and j["params"] == count_params(tiny_unet())
    monkeypatch.setitem(o2mcli.chain.BUILTIN_MODELS, "digits-teacher", tiny_model_file)
    assert info_json("digits-teacher")["sha256"] == sha256_file(tiny_model_file)
    monkeypatch.setitem(o2mcli.chain.BUILTIN_MODELS, "digits-teacher", tmp_path / "absent.safetensors")
    assert_refused(cli("info", "digits-teacher"), "digits-teacher")


def test_info_refuses_non_models(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\x80\x02")
    assert_refused(cli("info", tmp_path / "notes.txt"), "notes.txt")
    assert_refused(cli("info", tmp_path / "empty"), "not a model")
    assert_refused(cli("info", tmp_path / "missing"), "missing")
    assert_refused(cli("info", tmp_path / "weights.bin"), "pickle")
    assert_refused(cli("info", tmp_path / "notes.txt", "--json"))


# 2. export ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variance", ["fixed", "learned"])
def test_export_round_trip(tmp_path, tiny_model_file, tiny_learned_file, variance):
    from diffusers import DDPMPipeline, UNet2DModel

    src = tiny_model_file if variance == "fixed" else tiny_learned_file
    out = tmp_path / "pipe"
    assert "wrote" in ok("export", src, "-o", out)
    pipe = DDPMPipeline.from_pretrained(out, local_files_only=True)
    unet = UNet2DModel.from_pretrained(out / "unet", local_files_only=True).eval()
    mine = load_model(src).unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([5, 500, 999])
    with torch.no_grad():
        ref = mine(x, t).sample
        assert torch.equal(unet(x, t).sample, ref)
        assert torch.equal(pipe.unet(x, t).sample, ref)
    sc = tiny_scheduler(variance)
    assert pipe.scheduler.config.num_train_timesteps == sc["num_train_timesteps"]
    assert pipe.scheduler.config.variance_type == sc["variance_type"]
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1)


def test_export_refuses_students_and_existing_output(tmp_path, tiny_model_file):
    students = make_model_stage(tmp_path / "students", "students", ((0, 500), (500, 1000)))
    assert_refused(cli("export", students, "-o", tmp_path / "p"), "merge")
    assert not (tmp_path / "p").exists()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert_refused(cli("export", tiny_model_file, "-o", out), "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert_refused(cli("export", tiny_model_file, "-o", out, "--force"), "o2m did not write")  # not o2m's (issue 11)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    out = tmp_path / "pipe"
    ok("export", tiny_model_file, "-o", out)
    (out / "extra.txt").write_text("x")
    ok("export", tiny_model_file, "-o", out, "--force")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and not (out / "extra.txt").exists()
    assert_refused(cli("export", tmp_path / "missing.safetensors", "-o", tmp_path / "p2"), "missing")


def test_export_single_stage_dir_and_partial_range_warning(tmp_path):
    teacher = make_model_stage(tmp_path / "teacher", "teacher")
    ok("export", teacher, "-o", tmp_path / "p1")
    assert (tmp_path / "p1" / "model_index.json").is_file()
    part = tmp_path / "student.safetensors"
    save_model_file(part, tiny_unet(), tiny_scheduler(), kind="student", timestep_range=(0, 500))
    r = cli("export", part, "-o", tmp_path / "p2")
    assert r.exit_code == 0 and "[0, 500)" in r.stderr and "warning" in r.stderr
