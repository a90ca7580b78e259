"""`make gpu-check` without a GPU: the CUDA tests skip with their reason, and the page is written from the records."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_cuda_tests_skip_without_cuda() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("O2M_GPU_CHECK_DEVICE", None)
    res = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "12 skipped" in res.stdout and "CUDA is not available" in res.stdout, res.stdout[-2000:]
    assert "passed" not in res.stdout


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.gpu.test_cuda" name="test_sampling_bf16_matches_fp32[ddim-50]" time="1.5">
<properties>
<property name="differs:sampling ddim" value="{&quot;value&quot;: 0.1}"/>
<property name="check:sampling ddim: bf16 vs fp32" value="{&quot;value&quot;: 0.006, &quot;bound&quot;: 0.04, &quot;why&quot;: &quot;rounding&quot;}"/>
</properties></testcase>
<testcase classname="tests.gpu.test_cuda" name="test_train_bf16_matches_fp32" time="2.0">
<properties>
<property name="check:train: first-step loss" value="{&quot;value&quot;: 0.05, &quot;bound&quot;: 0.01, &quot;why&quot;: &quot;one | forward&quot;}"/>
</properties>
<failure message="AssertionError: train: first-step loss = 0.05 &gt; 0.01">trace</failure></testcase>
<testcase classname="tests.gpu.test_cuda" name="test_ddp_nccl_one_gpu_matches_plain[dkdm-output]" time="9.0">
<properties><property name="backend" value="nccl"/></properties></testcase>
</testsuite></testsuites>
"""


def test_page_states_what_the_records_hold(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gc = importlib.import_module("gpu_check")
    (tmp_path / "junit.xml").write_text(JUNIT)
    cases = gc.parse_junit(tmp_path / "junit.xml")
    assert [c["status"] for c in cases] == ["passed", "failed", "passed"]
    assert cases[0]["checks"] == [{"name": "sampling ddim: bf16 vs fp32", "value": 0.006, "bound": 0.04,
                                   "why": "rounding"}]
    assert cases[2]["notes"] == {"backend": "nccl"}
    info = {"device": "cuda", "gpu": "NVIDIA Test GPU", "capability": "9.0", "sms": 132, "gpu_memory_gib": 139.8,
            "driver": "580.1", "cuda_build": "13.0", "cudnn": 91000, "cpu": "x86_64", "cpu_count": 16,
            "torch": "2.11.0", "diffusers": "0.42.1", "torch_pruning": "1.6.1", "pydantic": "2.14.3",
            "python": "3.12.3", "o2m": "0.1.0", "date": "2026-11-30 12:00 UTC"}
    sampling = {"ok": True, "seconds": 3.0, "machine": {"threads": 16},
                "rows": [{"model": "digits teacher (shipped)", "sampler": "ddim", "params_M": 1.11, "MACs_G": 0.016,
                          "images_per_s": 5000.0, "forwards_per_s": 250.0, "step_cost_vs_first": 1.0}]}
    dkdm = {"ok": True, "seconds": 20.0, "machine": {"threads": 16},
            "rows": [{"teacher": "ddpm-cifar10-32 config", "batch": 8, "data_step_s": 0.01, "dkdm_step_s": 0.011,
                      "step_ratio": 1.1, "init_slots": 16, "init_steps": 10,
                      "init": {"exact": {"teacher_forwards": 7180, "seconds": None, "seconds_estimated": 3.5},
                               "ddim": {"teacher_forwards": 160, "seconds": 0.08}}}]}
    sampling["compiled"] = [{"model": "digits teacher (shipped)", "mode": "compiled", "ran": "eager", "batch": 128,
                             "MACs_G": 0.016, "images_per_s": 4000.0, "MACs_per_s_G": 1280.0, "peak_fraction": 0.0026,
                             "warmup_s": 12.0, "compiled_vs_eager": 0.8}]
    sampling["machine"]["peak_note"] = "NVIDIA Test GPU: not in the bf16 peak table"
    compile_rows = [{"shape": "sd15", "what": "SD 1.5 UNet2DConditionModel", "mode": "compiled", "ran": "compiled",
                     "batch": 64, "MACs_G": 338.0, "seconds_per_forward": 0.1, "samples_per_s": 640.0,
                     "MACs_per_s_G": 216320.0, "peak_fraction": 0.437, "warmup_s": 95.0, "compiled_vs_eager": 1.4}]
    compiled = {"ok": True, "seconds": 300.0, "machine": {"threads": 16, "skipped": ["sdxl batch 64: above the cap"]},
                "rows": compile_rows}
    benches = {"sampling": sampling, "distill": {"ok": False, "seconds": 4.0, "error": "exit 1: boom"},
               "dkdm": dkdm, "prune": None, "compile": compiled}
    tests = {"rc": 1, "seconds": 12.5, "cases": cases, "tail": ""}
    page = gc.render(info, tests, benches, ["benchmarks/gpu_check.py"], 60.0)
    assert "NVIDIA Test GPU" in page and "torch 2.11.0, diffusers 0.42.1" in page
    assert "2 passed, 1 failed" in page
    assert "| train: first-step loss | 0.05 | 0.01 | **no** | one \\| forward |" in page
    assert "| sampling ddim: bf16 vs fp32 | 0.006 | 0.04 | yes | rounding |" in page
    assert "differs:" not in page and "(backend: nccl)" in page
    assert "| digits teacher (shipped) | ddim | 1.11 | 0.016 | 5000.0 | 250.0 | 1.00x |" in page
    assert "Failed after 4 s" in page and "boom" in page
    assert "not run (estimated 3.5 s" in page
    assert "### prune" in page and "Not run: the time budget" in page
    # compiled rows: a fallback says what ran; the sweep's fraction of peak and warm-up are shown
    assert "| digits teacher (shipped) | compiled (ran eager) | 128 | 0.016 | 4000.0 | 1280.0 | 0.26% | 0.80x | 12.0 |" \
        in page and "not in the bf16 peak table" in page
    assert "| SD 1.5 UNet2DConditionModel | compiled | 64 | 338.000 | 0.1000 | 640.00 | 216320.0 | 43.70% | 1.40x | 95.0 |" \
        in page and "Left out: sdxl batch 64" in page


def test_cpu_dry_run_stays_small_and_cuda_runs_compiled(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gc = importlib.import_module("gpu_check")
    cuda = {name: args for name, _, args in gc.BENCHMARKS["cuda"]}
    cpu = {name: args for name, _, args in gc.BENCHMARKS["cpu"]}
    assert "eager,compiled" in cuda["prune"] and "eager,compiled" in cuda["sampling"]
    assert "cifar10,sd15,sdxl" in cuda["compile"] and "--tiny" not in cuda["compile"]
    assert "--tiny" in cpu["compile"] and cpu["prune"][cpu["prune"].index("--modes") + 1] == "eager"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA present this would run the whole check")
def test_cuda_check_refuses_without_cuda(monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gc = importlib.import_module("gpu_check")
    assert gc.main(["--device", "cuda", "--out", "/nonexistent/never-written.md"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
