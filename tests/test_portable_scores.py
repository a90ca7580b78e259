"""Issue #16: samples scored away from their model, manifest.json symlinks, and sampling progress by steps.

1. ``o2m score`` on a samples directory copied where its model does not exist: FID/KID as with the model, params,
   MACs and throughput recorded as unavailable with the reason, one note on stderr; a model that exists but changed
   is still refused.
2. A ``manifest.json`` that is a symlink leaving its directory is refused (and is no candidate for the newest
   samples); one that stays inside is read.
3. ``o2m sample``'s bar counts denoising steps over all batches, so one long batch moves it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_refused, cli, tiny_teacher_file
from o2mcli.errors import O2MError
from o2mcli.manifest import list_stage_dirs, read_manifest

ENV = {**os.environ, "O2M_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
O2M = [str(Path(sys.executable).parent / "o2m")] if (Path(sys.executable).parent / "o2m").exists() else [
    sys.executable, "-m", "o2mcli"]
SCORE = ["--device", "cpu", "--throughput-batch", "2", "--throughput-repeats", "1", "--kid-subsets", "5"]


def o2m(*args, cwd: Path, progress: bool = False) -> subprocess.CompletedProcess:
    env = {**ENV, "O2M_PROGRESS": "1" if progress else "0"}
    return subprocess.run([*O2M, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> dict:
    """A tiny teacher, 8 samples of it drawn in 2 batches of 4 with 3 DDIM steps (with the bar shown), and the
    score of those samples while the model is still there."""
    root = tmp_path_factory.mktemp("portable")
    model = tiny_teacher_file(root / "teacher.safetensors")
    r = o2m("sample", model, "-n", 8, "-b", 4, "--steps", 3, "--no-png", "--device", "cpu", "-o", "samples",
            cwd=root, progress=True)
    assert r.returncode == 0, r.stderr
    r2 = o2m("score", "samples", *SCORE, "-o", "scores", cwd=root)
    assert r2.returncode == 0, r2.stderr
    report = json.loads((root / "scores" / "report.json").read_text())
    return {"root": root, "model": model, "sample_stderr": r.stderr, "report": report}


def moved(sampled: dict, tmp_path: Path) -> Path:
    """The samples directory copied into a fresh directory (as onto another machine)."""
    dst = tmp_path / "elsewhere" / "samples"
    shutil.copytree(sampled["root"] / "samples", dst)
    return dst


# 1. Samples scored without their model -------------------------------------------------------------------

def test_score_without_the_model_keeps_fid_and_marks_the_rest_unavailable(sampled, tmp_path):
    samples = moved(sampled, tmp_path)
    model = sampled["model"]
    hidden = model.with_name("hidden.safetensors")
    model.rename(hidden)  # the recorded model path no longer exists
    try:
        r = o2m("score", samples, *SCORE, "-o", tmp_path / "scores", cwd=tmp_path)
    finally:
        hidden.rename(model)
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(notes) == 1 and "unavailable" in notes[0] and str(model) in notes[0], r.stderr

    with_model = sampled["report"]["rows"][0]
    row = json.loads((tmp_path / "scores" / "report.json").read_text())["rows"][0]
    # FID and KID come from the images alone: the same numbers as when the model was there.
    assert row["fid"] == pytest.approx(with_model["fid"], rel=1e-9)
    assert row["kid_mean"] == pytest.approx(with_model["kid_mean"], rel=1e-9)
    assert with_model["params"] > 0 and with_model["throughput"]["images_per_s"] > 0
    assert row["model"] is None and row["params"] is None and row["macs"] is None and row["throughput"] is None
    assert row["model_unavailable"] == f"{model}: no such file or directory"
    assert row["model_name"] == "teacher.safetensors" and row["model_sha256"] == with_model["model_sha256"]
    md = (tmp_path / "scores" / "report.md").read_text()
    assert f"unavailable ({model}: no such file or directory)" in md
    assert f"unavailable ({model}: no such file or directory)" in r.stdout  # the printed table
    summary = read_manifest(tmp_path / "scores").summary["rows"][0]
    assert summary["params"] is None and summary["images_per_s"] is None and summary["fid"] == row["fid"]
    assert not (tmp_path / "scores" / "fid_vs_macs.png").exists()  # no MACs to plot against
    # The report reads back through o2m info without the numbers.
    assert cli("info", tmp_path / "scores").exit_code == 0


def test_score_mixes_rows_with_and_without_their_model(sampled, tmp_path):
    samples = moved(sampled, tmp_path)
    # The copy's manifest names the model's path; make it point nowhere by copying under another parent record.
    man = json.loads((samples / "manifest.json").read_text())
    man["parents"][0]["path"] = str(tmp_path / "gone" / "teacher.safetensors")
    (samples / "manifest.json").write_text(json.dumps(man))
    r = o2m("score", sampled["root"] / "samples", samples, *SCORE, "-o", tmp_path / "scores", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "scores" / "report.json").read_text())["rows"]
    assert rows[0]["params"] > 0 and rows[1]["params"] is None
    assert rows[0]["fid"] == pytest.approx(rows[1]["fid"], rel=1e-9)
    table = r.stdout.splitlines()
    assert sum("unavailable (" in ln for ln in table) == 1
    assert (tmp_path / "scores" / "fid_vs_macs.png").is_file()


def test_one_note_per_missing_model(sampled, tmp_path):
    a = moved(sampled, tmp_path)
    b = shutil.copytree(a, tmp_path / "again" / "samples2")
    man = json.loads((b / "manifest.json").read_text())
    man["config"]["steps"] = 4  # another row of the same model (scored separately: other sampler settings)
    (b / "manifest.json").write_text(json.dumps(man))
    model = sampled["model"]
    model.rename(model.with_name("hidden.safetensors"))
    try:
        r = o2m("score", a, b, *SCORE, "-o", tmp_path / "scores", cwd=tmp_path)
    finally:
        model.with_name("hidden.safetensors").rename(model)
    assert r.returncode == 0, r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
    rows = json.loads((tmp_path / "scores" / "report.json").read_text())["rows"]
    assert [row["params"] for row in rows] == [None, None]


def test_score_refuses_a_model_that_changed_since_sampling(sampled, tmp_path):
    samples = moved(sampled, tmp_path)
    model = sampled["model"]
    saved = model.read_bytes()
    model.write_bytes(tiny_teacher_file(tmp_path / "other.safetensors", seed=7).read_bytes())  # other weights
    try:
        r = cli("score", samples, *SCORE, "-o", tmp_path / "scores")
    finally:
        model.write_bytes(saved)
    assert_refused(r, str(model), "changed since sampling")
    assert not (tmp_path / "scores").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_score_with_an_unreadable_model_marks_it_unavailable(sampled, tmp_path):
    samples = moved(sampled, tmp_path)
    model = sampled["model"]
    model.chmod(0)
    try:
        r = o2m("score", samples, *SCORE, "-o", tmp_path / "scores", cwd=tmp_path)
    finally:
        model.chmod(0o644)
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / "scores" / "report.json").read_text())["rows"][0]
    assert row["model_unavailable"] == f"{model}: not readable (permission denied)"


def test_an_unlistable_model_directory_is_unavailable(tmp_path, monkeypatch):
    from o2mcli.stages import score

    d = tmp_path / "model-dir"
    d.mkdir()
    real = os.listdir

    def denied(p):
        if Path(p) == d:
            raise PermissionError(13, "Permission denied")
        return real(p)

    monkeypatch.setattr(os, "listdir", denied)
    assert score.model_unavailable(str(d)) == f"{d}: not readable (permission denied)"
    assert score.model_unavailable(str(tmp_path / "nope")) == f"{tmp_path / 'nope'}: no such file or directory"
    (tmp_path / "dangling").symlink_to(tmp_path / "nope")
    assert score.model_unavailable(str(tmp_path / "dangling")).endswith(": no such file or directory")
    assert score.model_unavailable(str(tmp_path)) is None


def test_results_page_writes_rows_scored_without_their_model(tmp_path, monkeypatch):
    from test_recipes import _fake_table_run, _results_md

    fids = {"teacher": 1.0, "teacher-dc3": 1.05, "r0.3-o2okd": 2.0, "r0.3-o2mkd": 2.5, "r0.3-o2mkd-dc3": 2.6}
    _fake_table_run(tmp_path / "work", fids)
    path = tmp_path / "work" / "scores" / "report.json"
    report = json.loads(path.read_text())
    for r in report["rows"]:  # every row as o2m score writes it when the models stayed behind
        r.update(params=None, macs=None, throughput=None, model_unavailable="/x: no such file or directory")
        if r.get("deepcache"):
            r["deepcache"]["macs"] = None
    path.write_text(json.dumps(report))
    monkeypatch.setattr(sys, "argv", ["results_md.py", "--work", str(tmp_path / "work"), "--docs",
                                      str(tmp_path / "docs"), "--seconds", "60"])
    _results_md().main()
    page = (tmp_path / "docs" / "results.md").read_text()
    table = [ln for ln in page.splitlines() if ln.startswith("| 0.3 | O2MKD |")]
    assert table and table[0].count("unavailable") == 3, table  # params, MACs/step, throughput
    assert "Throughput: not measured" in page and "2.500" in page


def test_result_pages_take_rows_without_measurements():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    try:
        import results_md
        import sections
    finally:
        sys.path.pop(0)
    row = {"params": None, "macs": None, "throughput": None, "deepcache": None}
    assert results_md.step_macs(row) is None and results_md.mmacs(row) == "unavailable"
    assert sections.measured(None, 1e6, ".3f") == "unavailable" and sections.images_per_s(row) is None
    assert sections.measured(2_500_000, 1e6, ".3f") == "2.500"
    dc = {"params": None, "macs": None, "throughput": None, "deepcache": {"macs": None, "interval": 3}}
    assert results_md.mmacs(dc) == "unavailable"


# 2. manifest.json as a symlink ------------------------------------------------------------------------

def test_manifest_symlink_out_of_its_directory_is_refused(sampled, tmp_path):
    real = sampled["root"] / "samples"
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").symlink_to(real / "manifest.json")
    (fake / "samples.npz").symlink_to(real / "samples.npz")
    with pytest.raises(O2MError, match="outside its directory") as e:
        read_manifest(fake)
    assert str(fake / "manifest.json") in str(e.value) and "\n" not in str(e.value)
    assert_refused(cli("info", fake), str(fake / "manifest.json"), "symlink")
    assert_refused(cli("score", fake, *SCORE, "-o", tmp_path / "scores"), str(fake / "manifest.json"))


def test_manifest_symlink_loop_is_refused_in_one_line(tmp_path):
    d = tmp_path / "loop"
    d.mkdir()
    (d / "manifest.json").symlink_to(d / "manifest.json")
    with pytest.raises(O2MError) as e:
        read_manifest(d)
    assert str(d / "manifest.json") in str(e.value) and "\n" not in str(e.value)
    assert list_stage_dirs(tmp_path) == []


def test_scan_skips_a_dir_whose_manifest_links_out(sampled, tmp_path):
    real = sampled["root"] / "samples"
    good = tmp_path / "good"
    shutil.copytree(real, good)
    fake = tmp_path / "zz-newer"
    fake.mkdir()
    (fake / "manifest.json").symlink_to(real / "manifest.json")
    os.utime(real / "manifest.json")  # the link's target is the newest manifest of all
    assert [p.name for _, p, _ in list_stage_dirs(tmp_path)] == ["good"]
    r = o2m("score", *SCORE, "-o", "scores", cwd=tmp_path)  # default: the newest samples here
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "scores" / "report.json").read_text())["rows"][0]["name"] == "good"


def test_manifest_symlink_inside_its_directory_is_read(sampled, tmp_path):
    d = tmp_path / "samples"
    shutil.copytree(sampled["root"] / "samples", d)
    (d / "meta").mkdir()
    (d / "manifest.json").rename(d / "meta" / "real.json")
    (d / "manifest.json").symlink_to(Path("meta") / "real.json")
    # The moved file is not one of the manifest's artifacts, so the directory still verifies.
    assert read_manifest(d, verify=True).kind == "samples"
    assert [p.name for _, p, _ in list_stage_dirs(tmp_path)] == ["samples"]


# 3. The sampling bar counts steps -------------------------------------------------------------------------

def final_counts(stderr: str, desc: str) -> list[tuple[int, int, str]]:
    """(done, total, unit) of every state of the ``desc`` bar tqdm drew on stderr."""
    states = re.split(r"[\r\n]", stderr)
    return [(int(m[1]), int(m[2]), m[3]) for s in states
            if (m := re.search(rf"{desc}:.*?\| *(\d+)/(\d+) \[.*?(step|img|it)/s", s))]


def test_sample_progress_counts_denoising_steps(sampled):
    counts = final_counts(sampled["sample_stderr"], "sample")
    assert counts, sampled["sample_stderr"]
    total = math.ceil(8 / 4) * 3  # 2 batches x 3 DDIM steps
    assert all(t == total and u == "step" for _, t, u in counts), counts
    assert counts[-1][0] == total
    assert "8/8 img" in sampled["sample_stderr"]


def test_one_batch_moves_the_bar(tmp_path):
    model = tiny_teacher_file(tmp_path / "t.safetensors")
    r = o2m("sample", model, "-n", 2, "-b", 256, "--steps", 40, "--scheduler", "ddpm", "--no-png", "--device",
            "cpu", "-o", "s", cwd=tmp_path, progress=True)
    assert r.returncode == 0, r.stderr
    counts = final_counts(r.stderr, "sample")
    assert counts and all(t == 40 for _, t, _ in counts), counts  # 1 batch x 40 steps, not 0/1 batches
    assert counts[-1][0] == 40
