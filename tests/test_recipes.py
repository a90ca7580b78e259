"""The smoke recipe: the whole chain through the CLI, as a user types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_smoke_recipe_runs_the_whole_chain(tmp_path: Path) -> None:
    o2m = Path(sys.executable).parent / "o2m"
    env = {**os.environ, "O2M": str(o2m) if o2m.exists() else f"{sys.executable} -m o2mcli", "O2M_PROGRESS": "0",
           "OMP_NUM_THREADS": "2"}
    res = subprocess.run(["bash", str(RECIPES / "smoke.sh"), str(tmp_path / "smoke")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "smoke" / "scores" / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["samples-template", "samples-students", "samples-merged",
                                                   "samples-dkdm"]
    assert all(r["fid"] == r["fid"] for r in report["rows"])  # finite numbers, not NaN
    assert (tmp_path / "smoke" / "scores" / "fid_vs_macs.png").is_file()


def _results_md(name: str = "results_md"):
    import importlib.util

    if str(RECIPES) not in sys.path:  # the writers import their siblings, as they do when run as scripts
        sys.path.insert(0, str(RECIPES))
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_table_run(work: Path, fids: dict[str, float]) -> None:
    """What recipes/digits-table.sh leaves behind, with made-up numbers: scores, command log, manifests."""
    tp = {"batch_size": 64, "repeats": 2, "scheduler": "ddim", "steps": 50, "images_per_s": 30.0}
    rows = [{"name": f"samples-{n}", "fid": f, "kid_mean": 0.01, "kid_std": 0.002, "params": 628_000 * (
        4 if n.endswith(("o2mkd", "dfo2mkd")) else 1), "macs": 9_070_000, "n_samples": 1000, "n_reference": 1797,
        "scheduler": "ddpm" if n.startswith("ddpm-") else "ddim", "steps": 50, "seed": 1 if n.endswith("seed1") else 0,
        "throughput": tp, "warnings": [], **({"deepcache": {"macs": 5_300_000}} if n.endswith("-dc3") else {})}
        for n, f in fids.items()]
    (work / "scores").mkdir(parents=True)
    (work / "scores" / "report.json").write_text(json.dumps({
        "rows": rows, "device": "cpu", "features": {"name": "digits", "description": "classifier features"},
        "kid": {"subsets": 100, "subset_size": 1000}, "notes": []}))
    (work / "commands.tsv").write_text("12345\to2m distill r0.3-template --mode o2mkd -k 1 --kd none -o r0.3-nokd\n"
                                       "67890\to2m distill r0.3-template --mode o2mkd -k 4 -o r0.3-o2mkd\n"
                                       "99999\to2m distill r0.3-template -k 1 --steps 1600 -o r0.3-o2okd-4x\n"
                                       "9000\to2m merge r0.3-o2mkd -o r0.3-o2mkd-merged.safetensors --force\n")
    cfg = {"steps": 400, "batch_size": 64, "lr": 5e-4, "lr_warmup": 100, "ema_decay": 0.999, "seed": 0,
           "alpha": 1.0, "p_own": 0.5, "rho": 0.4, "init_steps": 10}
    for name in ("r0.3-o2okd", "r0.3-dkdm", "r0.3-o2mkd"):
        (work / name).mkdir()
        (work / name / "manifest.json").write_text(json.dumps({"config": cfg, "summary": {"buffer": {"slots": 25600}}}))


def _main_table_page(tmp_path: Path, monkeypatch, fids: dict, docs: Path) -> str:
    """A faked main-table run scored with ``fids``, written by results_md.py into ``docs``: the page."""
    _fake_table_run(tmp_path / "work", fids)
    monkeypatch.setattr(sys, "argv", ["results_md.py", "--work", str(tmp_path / "work"), "--docs", str(docs),
                                      "--seconds", "2400"])
    _results_md().main()
    return (docs / "results.md").read_text()


def test_results_page_reports_the_expectations_as_measured(tmp_path: Path, monkeypatch) -> None:
    """docs/results.md generation: every row in the table, each expectation judged by the numbers, both ways."""
    fids = {"teacher": 1.0, "teacher-seed1": 1.1, "r0.3-nokd": 5.0, "r0.3-o2okd": 2.0, "r0.3-o2okd-4x": 1.5,
            "r0.3-o2mkd": 2.5,
            "r0.3-o2mkd-merged": 2.55, "r0.3-dkdm": 2.1, "r0.3-dfo2mkd": 2.05, "r0.3-dfo2mkd-merged": 2.0}
    docs = tmp_path / "docs"
    page = _main_table_page(tmp_path, monkeypatch, fids, docs)
    assert (docs / "results-fid-vs-macs.png").is_file() and (docs / "results-report.json").is_file()
    assert "40.0 minutes" in page and "but the 4x-steps one: 400 optimizer steps x batch 64" in page and "25600 slots" in page
    table = [line for line in page.splitlines() if line.startswith("| ")][1:]
    assert len(table) == len(fids)
    assert "| 0.3 | no KD (plain training) | digits | 1 |" in page and "| 0.3 | O2MKD | digits | 4 | 2.512 |" in page
    assert "| 68 + 9 |" in page  # the merged row's cost: its distill run plus the merge
    assert "KD helps (FID no KD > FID O2OKD): FID 5.000 vs 2.000, gap +3.000, noise 0.100: **holds**" in page
    assert ("more students help (FID O2OKD > FID O2MKD K=4): FID 2.000 vs 2.500, gap -0.500, noise 0.100: "
            "**does not hold**") in page
    assert "(FID O2OKD 4x steps > FID O2MKD K=4): FID 1.500 vs 2.500, gap -1.000, noise 0.100: **does not hold**" in page
    assert "merged matches unmerged (FID merged = FID O2MKD K=4): FID 2.550 vs 2.500" in page
    assert "**holds (a tie, within noise)**" in page
    # A gap smaller than the sampling noise is a tie, not a verdict.
    assert "(FID DKDM > FID data-free O2MKD): FID 2.100 vs 2.050, gap +0.050, noise 0.100: **tie (within noise)**" in page
    assert "scores 1.000 with sampling seed 0 and 1.100 with seed 1" in page


def test_verdicts_respect_the_noise() -> None:
    md = _results_md()
    assert md.verdict(0.5, 0.1) == "holds" and md.verdict(-0.5, 0.1) == "does not hold"
    assert md.verdict(0.05, 0.1) == md.verdict(-0.09, 0.1) == "tie (within noise)"


def test_results_page_with_training_seeds_ddpm_rows_and_the_synthetic_baseline(tmp_path: Path, monkeypatch) -> None:
    """The second training seed widens the noise and the verdicts use the means; DDPM rows get their own table."""
    fids = {"teacher": 1.0, "teacher-seed1": 1.05, "r0.5-nokd": 3.0, "r0.5-o2okd": 2.2, "r0.5-o2okd-4x": 1.1,
            "r0.5-o2mkd": 1.7, "r0.5-dkdm": 2.3, "r0.5-synth": 4.0,
            "r0.5-nokd-s1": 3.2, "r0.5-o2okd-s1": 2.0, "r0.5-o2mkd-s1": 2.1, "r0.5-o2okd-4x-s1": 1.3,
            "ddpm-teacher": 1.2, "ddpm-r0.5-dkdm": 2.0, "ddpm-r0.5-synth": 2.1, "ddpm-r0.5-dfo2mkd": 1.5}
    work = tmp_path / "work"
    _fake_table_run(work, fids)
    (work / "synthetic.json").write_text(json.dumps({"images": 1700, "steps": 50, "teacher_forwards": 85000,
                                                     "dkdm_forwards": 85012}))
    docs = tmp_path / "docs"
    monkeypatch.setattr(sys, "argv", ["results_md.py", "--work", str(work), "--docs", str(docs), "--seconds", "3500"])
    _results_md().main()
    page = (docs / "results.md").read_text()
    # Training noise: the largest seed-to-seed spread (O2MKD: |1.7 - 2.1| = 0.4) gauges every verdict.
    assert "| 0.5 | O2MKD | 1.700 | 2.100 | 1.900 | 0.400 |" in page
    assert "moves a row's FID by up to 0.400" in page
    # Means: O2OKD (2.1) vs O2MKD (1.9): a 0.2 gap inside 0.4 noise is a tie; no KD (3.1) vs O2OKD (2.1) holds.
    assert ("more students help (FID O2OKD > FID O2MKD K=4): FID 2.100 vs 1.900 (means over 2 training seeds), "
            "gap +0.200, noise 0.400: **tie (within noise)**") in page
    assert "KD helps (FID no KD > FID O2OKD): FID 3.100 vs 2.100 (means over 2 training seeds)" in page
    # The DKDM paper's comparisons, under both samplers.
    assert "DKDM beats the synthetic-data baseline, DDIM 50 (FID baseline > FID DKDM): FID 4.000 vs 2.300" in page
    assert "DDPM 50 (FID baseline > FID DKDM): FID 2.100 vs 2.000, gap +0.100, noise 0.400: **tie (within noise)**" in page
    assert "## Sampled with DDPM" in page and "| 0.5 | DKDM | none | 1 |" in page
    assert "1700 images sampled from the teacher with DDPM 50 steps (85,000 teacher forwards" in page
    assert "| 0.5 | O2MKD, training seed 1 | digits | 4 |" in page


def _fake_cond_run(work: Path, fid: dict[str, float], acc: dict[str, float]) -> None:
    """What recipes/digits-cond-table.sh leaves behind, with made-up numbers (``fid``/``acc`` keyed g1-/g2-row)."""
    tp = {"batch_size": 64, "repeats": 1, "scheduler": "ddim", "steps": 50, "images_per_s": 30.0}
    rows = [{"name": n, "fid": f, "class_accuracy": acc[n], "kid_mean": 0.01, "kid_std": 0.002, "params": 1_114_000,
             "macs": 16_110_000, "n_samples": 200 if n.startswith("c3") else 1000, "n_reference": 1797,
             "scheduler": "ddim" if n.startswith("g1") else "ddpm", "steps": 50, "seed": 0, "throughput": tp}
            for n, f in fid.items()]
    (work / "scores").mkdir(parents=True)
    (work / "scores" / "report.json").write_text(json.dumps({
        "rows": rows, "device": "cpu", "features": {"name": "digits", "description": "classifier features"},
        "kid": {"subsets": 100, "subset_size": 1000}, "notes": []}))
    (work / "commands.tsv").write_text("5000\to2m prune digits-cond-teacher --ratio 0.5 -o template --force\n"
                                       "130000\to2m distill template --mode o2mkd -k 4 --seed 0 --force -o o2mkd\n")
    cfg = {"steps": 1200, "batch_size": 64, "lr": 5e-4, "ema_decay": 0.999, "seed": 0, "rho": 0.2, "init_steps": 10}
    for name in ("o2mkd", "dkdm"):
        (work / name).mkdir()
        (work / name / "manifest.json").write_text(json.dumps({"config": cfg}))
    (work / "template").mkdir()
    (work / "template" / "manifest.json").write_text(json.dumps({"summary": {
        "teacher": {"block_out_channels": [32, 64, 64]}, "template": {"block_out_channels": [16, 32, 32]}}}))


def test_conditional_section_is_judged_and_survives_the_main_table(tmp_path: Path, monkeypatch) -> None:
    rows = ("teacher", "teacher-seed1", "o2okd", "o2mkd", "o2mkd-s1", "dkdm")
    fid = {f"g1-{m}": v for m, v in zip(rows, (0.40, 0.45, 1.60, 1.00, 1.10, 1.58))}
    fid.update({f"g2-{m}": v + 0.3 for m, v in zip(rows, (0.40, 0.45, 1.60, 1.00, 1.10, 1.58))})
    acc = {f"g1-{m}": v for m, v in zip(rows, (0.99, 0.98, 0.93, 0.95, 0.94, 0.85))}
    acc.update({f"g2-{m}": min(1.0, v + 0.04) for m, v in zip(rows, (0.99, 0.98, 0.93, 0.95, 0.94, 0.85))})
    for m, a in zip(("teacher", "o2okd", "o2mkd", "o2mkd-s1", "dkdm"), (0.965, 0.905, 0.835, 0.84, 0.855)):
        fid[f"c3ddim-{m}"], acc[f"c3ddim-{m}"] = 9.0, a
        fid[f"c3ddpm-{m}"], acc[f"c3ddpm-{m}"] = 9.0, min(0.99, a + 0.1)
    _fake_cond_run(tmp_path / "cond", fid, acc)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("# Results\n\n## Table\n\nold rows\n\n## Machine\n\n- cpu: x\n")
    monkeypatch.setattr(sys, "argv", ["results_cond_md.py", "--work", str(tmp_path / "cond"), "--docs", str(docs),
                                      "--seconds", "600", "--guidance", "2"])
    _results_md("results_cond_md").main()
    page = (docs / "results.md").read_text()
    assert page.index("<!-- section: conditional -->") < page.index("## Machine") and "old rows" in page
    assert "1200 steps x batch 64 per student, lr 0.0005, EMA 0.999, seed 0; DKDM with rho 0.2, its buffer built by " \
           "10-step DDIM jumps" in page
    assert "| O2MKD | labelled digits | 4 | 1.114 | 16.11 | 130 | 1.000 | 95.0% | 1.300 | 99.0% |" in page
    # The 90% bar: DKDM at 85% fails it, O2OKD at 93% passes.
    assert "guidance 1 (DDIM 50): DKDM keeps at least 90% class accuracy: **does not hold** (85.0%)" in page
    assert "guidance 1 (DDIM 50): O2OKD keeps at least 90% class accuracy: **holds** (93.0%)" in page
    # FID noise at guidance 1: max(|0.40-0.45|, |1.00-1.10|) = 0.1; O2MKD mean 1.05 vs O2OKD 1.60 holds, DKDM ties.
    assert ("guidance 1 (DDIM 50): O2MKD (mean of 2 seeds) has a lower FID than O2OKD: **holds** (1.050 vs 1.600, "
            "gap +0.550; noise 0.100)") in page
    assert "has a lower FID than O2OKD on data (the DKDM paper's claim is a match, which a tie shows): **tie" in page
    # The one-class check: a table of its own, and the 90% bar per sampler.
    assert "| O2MKD | 83.5% | 93.5% |" in page and "| teacher (digits-cond-teacher) | 96.5% | 99.0% |" in page
    assert "`--class 3 -n 200`, DDIM 50: DKDM keeps at least 90%: **does not hold** (85.5%) (the teacher 96.5%)" in page
    assert "`--class 3 -n 200`, DDPM 50: DKDM keeps at least 90%: **holds** (95.5%) (the teacher 99.0%)" in page
    # 200 samples: 2.1 points of standard error at 90%; 90.5% is within it of the bar, and says so.
    assert ("`--class 3 -n 200`, DDIM 50: O2OKD keeps at least 90%: **holds** (90.5%; within one standard error, "
            "2.1 points, of the bar) (the teacher 96.5%)") in page
    # Rerunning the conditional recipe replaces its section; the main table keeps it when it rewrites the page.
    _results_md("results_cond_md").main()
    assert (docs / "results.md").read_text().count("<!-- section: conditional -->") == 1
    fids = {"teacher": 1.0, "teacher-seed1": 1.1, "r0.3-nokd": 5.0, "r0.3-o2okd": 2.0}
    page = _main_table_page(tmp_path, monkeypatch, fids, docs)
    assert "old rows" not in page and page.count("<!-- section: conditional -->") == 1
    assert "| O2MKD | labelled digits | 4 | 1.114 |" in page and page.index("section: conditional") < page.index("## Machine")


def _fake_xarch_run(work: Path, fid: dict[str, float], acc: dict[str, float]) -> None:
    """What recipes/digits-xarch-table.sh leaves behind, with made-up numbers (keyed u2d-/d2u-row)."""
    tp = {"batch_size": 64, "repeats": 1, "scheduler": "ddim", "steps": 50, "images_per_s": 30.0}
    rows = [{"name": f"g1-{n}", "fid": f, "class_accuracy": acc[n], "kid_mean": 0.01, "kid_std": 0.002,
             "params": 2_120_000 if n.startswith("d2u-teacher") else 393_000, "macs": 20_000_000, "n_samples": 1000,
             "n_reference": 1797, "scheduler": "ddim", "steps": 50, "seed": 0, "throughput": tp}
            for n, f in fid.items()]
    (work / "scores").mkdir(parents=True)
    (work / "scores" / "report.json").write_text(json.dumps({
        "rows": rows, "device": "cpu", "features": {"name": "digits", "description": "classifier features"},
        "kid": {"subsets": 100, "subset_size": 1000}, "notes": []}))
    (work / "commands.tsv").write_text(
        "250000\to2m distill --teacher digits-cond-teacher --student-config dit-student.json --mode dkdm -o u2d-dkdm\n"
        "90000\to2m distill --teacher digits-dit-teacher --student-config unet-student.json --kd none -o d2u-none\n")
    (work / "u2d-dkdm").mkdir()
    (work / "u2d-dkdm" / "manifest.json").write_text(json.dumps({"config": {
        "steps": 2000, "batch_size": 64, "lr": 5e-4, "ema_decay": 0.999, "seed": 0, "rho": 0.2, "init_steps": 10}}))


def test_cross_architecture_section_is_judged_per_direction(tmp_path: Path, monkeypatch) -> None:
    rows = ("teacher", "teacher-seed1", "dkdm", "dkdm-s1", "kd", "none")
    fid = {f"u2d-{m}": v for m, v in zip(rows, (0.40, 0.50, 2.00, 2.20, 2.05, 4.00))}
    fid.update({f"d2u-{m}": v for m, v in zip(rows, (0.80, 0.85, 1.00, 1.04, 1.50, 1.20))})
    acc = {f"u2d-{m}": v for m, v in zip(rows, (0.99, 0.98, 0.90, 0.92, 0.93, 0.80))}
    acc.update({f"d2u-{m}": v for m, v in zip(rows, (0.97, 0.97, 0.965, 0.96, 0.95, 0.94))})
    _fake_xarch_run(tmp_path / "x", fid, acc)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("# Results\n\n## Table\n\nold rows\n\n<!-- section: conditional -->\ncond rows\n"
                                     "<!-- end section: conditional -->\n\n## Machine\n\n- cpu: x\n")
    monkeypatch.setattr(sys, "argv", ["results_xarch_md.py", "--work", str(tmp_path / "x"), "--docs", str(docs),
                                      "--seconds", "1800"])
    _results_md("results_xarch_md").main()
    page = (docs / "results.md").read_text()
    assert "cond rows" in page and page.index("section: cross-architecture") < page.index("## Machine")
    assert "30.0 minutes" in page and "2000 steps x batch 64 per student" in page
    assert "| UNet teacher -> DiT student | DKDM | none | DiT | 0.393 | 20.00 | 250 | 2.000 | 90.0% |" in page
    assert "| DiT teacher -> UNet student | teacher (digits-dit-teacher) | - | - | 2.120 |" in page
    # UNet -> DiT: noise max(|0.4-0.5|, |2.0-2.2|) = 0.2; DKDM mean 2.1 vs data KD 2.05 is a tie, vs none 4.0 holds.
    assert ("UNet teacher -> DiT student: DKDM, with no data, has a lower FID than data KD (the DKDM paper's claim is "
            "a match, which a tie shows): **tie (within noise)** (2.100 vs 2.050, gap -0.050; noise 0.200)") in page
    assert ("UNet teacher -> DiT student: DKDM, with no data, has a lower FID than plain training on the data: "
            "**holds** (2.100 vs 4.000") in page
    # DiT -> UNet: noise max(0.05, 0.04) = 0.05; data KD 1.5 is worse than plain training 1.2 beyond it.
    assert ("DiT teacher -> UNet student: data KD has a lower FID than plain training on the data: **does not hold** "
            "(1.500 vs 1.200, gap -0.300; noise 0.050)") in page
    # Class accuracy: UNet -> DiT DKDM mean 91% vs the teacher's 99%, noise max(1, 2) points: loses, holds.
    assert "UNet teacher -> DiT student: DKDM loses class accuracy against the teacher: **holds** (gap +8.0" in page
    # CNN students compress better: the UNet student rises 0.22 over its teacher, the DiT student 1.7; noise 0.2.
    assert "CNN students compress better than ViT students\"): **holds** (UNet student +0.220, DiT student +1.700" in page
    # A rerun replaces the section; the main table keeps both recipes' sections when it rewrites the page.
    _results_md("results_xarch_md").main()
    assert (docs / "results.md").read_text().count("<!-- section: cross-architecture -->") == 1
    page = _main_table_page(tmp_path, monkeypatch, {"teacher": 1.0, "teacher-seed1": 1.1, "r0.3-nokd": 5.0,
                                                   "r0.3-o2okd": 2.0}, docs)
    assert "old rows" not in page and "cond rows" in page
    assert page.count("<!-- section: cross-architecture -->") == 1 and page.count("<!-- section: conditional -->") == 1
    assert page.index("section: cross-architecture") < page.index("## Machine")


def test_deepcache_rows_show_their_average_macs_and_are_judged(tmp_path: Path, monkeypatch) -> None:
    """Rows sampled with --deepcache 3: labelled, the averaged MACs shown, and the O2MKD paper's claims judged."""
    fids = {"teacher": 1.0, "teacher-seed1": 1.1, "teacher-dc3": 1.5, "r0.5-o2mkd": 2.0, "r0.5-o2mkd-s1": 2.05,
            "r0.5-o2mkd-dc3": 2.06, "r0.5-o2mkd-merged-dc3": 2.3}
    docs = tmp_path / "docs"
    page = _main_table_page(tmp_path, monkeypatch, fids, docs)
    assert "| - | teacher (shipped), sampling seed 0 + DeepCache N=3 | - | 1 | 0.628 | 5.30 |" in page
    assert "| 0.5 | O2MKD + DeepCache N=3 | digits | 4 | 0.628 | 5.30 | 30.0 | - | 2.060 |" in page
    assert "| 0.5 | O2MKD, merged + DeepCache N=3 | digits | 4 -> 1 |" in page
    # noise: max(sampling 0.1, training 0.05) = 0.1. Teacher + DeepCache is 0.5 worse: the "keeps" claim fails.
    assert ("DeepCache N=3 keeps the teacher's quality (FID teacher + DeepCache = FID teacher) at 5.30 vs 9.07 M "
            "MACs/step: FID 1.500 vs 1.000, gap +0.500, noise 0.100: **does not hold (worse)**") in page
    assert "ratio 0.5: DeepCache N=3 keeps the O2MKD students' quality" in page and "gap +0.060, noise 0.100: **holds (a tie" in page
    assert ("ratio 0.5: DeepCache + O2MKD beats DeepCache alone on the teacher (FID teacher + DeepCache > FID O2MKD + "
            "DeepCache, at 5.30 vs 5.30 M MACs/step): FID 1.500 vs 2.060, gap -0.560, noise 0.100: **does not hold**") in page
