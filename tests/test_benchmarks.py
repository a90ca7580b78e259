"""The benchmark scripts stay runnable (they measure speed; these tests only check they work)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCH.glob("bench_*.py")))
def test_benchmark_imports(name: str, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    mod = importlib.import_module(name)
    assert callable(mod.main) and mod.__doc__


def test_distill_benchmark_runs_on_digits() -> None:
    res = subprocess.run([sys.executable, str(BENCH / "bench_distill.py"), "--only", "digits", "--steps", "1",
                          "--warmup", "0", "--batch", "4", "--device", "cpu", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert '"K": 4' in res.stdout and '"teacher_share"' in res.stdout


def test_sampling_benchmark_times_every_sampler() -> None:
    res = subprocess.run([sys.executable, str(BENCH / "bench_sampling.py"), "--steps", "2", "--batch", "2",
                          "--repeats", "1", "--modes", "eager", "--device", "cpu", "--json"], capture_output=True,
                         text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-2000:]
    assert '"sampler": "dpm++"' in res.stdout and '"step_cost_vs_first"' in res.stdout
    # DeepCache at N=3 over 2 steps: 1 full and 1 partial call, so the average MACs sit between the two.
    cached = json.loads(res.stdout)["deepcache"]
    assert cached and all(r["full_calls"] == 1 and r["partial_calls"] == 1 and r["interval"] == 3 for r in cached)
    assert all(r["partial_MACs_G"] < r["avg_MACs_G"] < r["full_MACs_G"] and r["speedup"] > 0 for r in cached)
    assert json.loads(res.stdout)["compiled"] == []  # --modes eager: no compiled table


def _env() -> dict:
    import os

    # this checkout's o2mcli first (an installed one may be another checkout's)
    return {**os.environ, "O2M_PROGRESS": "0",
            "PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")])}


def test_prune_benchmark_rows_compare_speedup_with_macs() -> None:
    res = subprocess.run([sys.executable, str(BENCH / "bench_prune.py"), "--only", "digits", "--steps", "1",
                          "--batches", "1,2", "--rounds", "1", "--modes", "eager", "--device", "cpu", "--json"],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    rows = out["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [(m, b) for b in (1, 2) for m in ("teacher", "ratio 0.3",
                                                                                      "ratio 0.5")]
    for r in rows:
        assert r["mode"] == r["ran"] == "eager" and r["compiled_vs_eager"] is None and r["peak_fraction"] is None
        assert r["speedup_vs_MACs_ratio"] == pytest.approx(r["speedup"] / r["MACs_ratio"])
        # MACs/s = MACs of one forward x forwards (1 step per image) x images/s
        assert r["MACs_per_s_G"] == pytest.approx(r["MACs_G"] * r["images_per_s"])
    assert "CPU" in out["machine"]["peak_note"]


def test_compile_benchmark_runs_tiny() -> None:
    """The three shapes' code paths on tiny stand-ins (eager), and the compiled path on the tiny CIFAR10 shape."""
    base = [sys.executable, str(BENCH / "bench_compile.py"), "--tiny", "--iters", "1", "--rounds", "1", "--device",
            "cpu", "--json"]
    res = subprocess.run(base + ["--shapes", "cifar10,sd15,sdxl", "--batches", "1,2", "--modes", "eager"],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    got = [(r["shape"], r["batch"]) for r in out["rows"]]
    assert got == [("cifar10", 1), ("cifar10", 2), ("sd15", 1), ("sd15", 2), ("sdxl", 1)]
    assert out["machine"]["skipped"] == ["sdxl batch 2: above this device's cap of 1 for the shape"]
    assert all(r["MACs_G"] > 0 and r["MACs_per_s_G"] > 0 and r["samples_per_s"] > 0 for r in out["rows"])

    res = subprocess.run(base + ["--shapes", "cifar10", "--batches", "1"], capture_output=True, text=True,
                         timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-2000:]
    eager, compiled = json.loads(res.stdout)["rows"]
    assert compiled["mode"] == compiled["ran"] == "compiled" and compiled["warmup_s"] > 0
    assert compiled["compiled_vs_eager"] == pytest.approx(compiled["samples_per_s"] / eager["samples_per_s"])


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0),
                                       ("NVIDIA H100 PCIe", 756.0), ("Some Future GPU", None)])
def test_peak_table(name: str, peak, monkeypatch) -> None:
    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    common = importlib.import_module("common")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    got, note = common.peak_bf16_tflops(torch.device("cuda"))
    assert got == peak and name in note
    assert common.peak_fraction(1e12, got) == (None if peak is None else pytest.approx(2.0 / peak))


def test_sampling_benchmark_takes_the_new_samplers_on_digits_only() -> None:
    res = subprocess.run([sys.executable, str(BENCH / "bench_sampling.py"), "--only", "digits", "--steps", "2",
                          "--batch", "2", "--repeats", "1", "--device", "cpu", "--deepcache", "", "--json",
                          "--samplers", "ddim,pndm,euler-a,dpm++2m-karras"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(res.stdout)["rows"]
    assert [(r["model"], r["sampler"]) for r in rows] == [("digits teacher (shipped)", s)
                                                          for s in ("ddim", "pndm", "euler-a", "dpm++2m-karras")]
    assert [r["model_calls"] for r in rows] == [2, 3, 2, 2]  # PNDM runs its second timestep twice


def test_sdxl_benchmark_runs_tiny() -> None:
    import os

    # this checkout's o2mcli first (an installed one may be another checkout's)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, str(BENCH / "bench_sdxl.py"), "--tiny", "--no-throughput", "--json"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["model"]: r for r in json.loads(res.stdout)["rows"]}
    assert list(rows) == ["sdxl", "koala-1b", "koala-700m", "ssd-1b", "vega"]
    for r in rows.values():
        assert {"params", "params_M", "published_params_M", "params_vs_published", "MACs_G", "MACs_cfg_G",
                "teacher_MACs_ratio"} <= set(r)
        assert r["MACs_cfg_G"] == pytest.approx(2 * r["MACs_G"])  # guidance: two samples' worth per step
    teacher = rows.pop("sdxl")
    assert all(r["params"] < teacher["params"] and r["MACs_G"] < teacher["MACs_G"] for r in rows.values())


def test_deepcache_benchmark_branch_0_of_sd1_is_the_papers_six_percent() -> None:
    """bench_deepcache on the meta device: SD 1.x's branch 0 partial step is about 6% of a full step (DeepCache: 21
    of 339 GMACs), SDXL's and CIFAR-10's are cheaper than a full step too."""
    res = subprocess.run([sys.executable, str(BENCH / "bench_deepcache.py"), "--branches", "0", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["model"].split(",")[0]: r for r in json.loads(res.stdout)["rows"]}
    sd = rows["SD 1.x U-Net"]
    assert sd["branches"] == 12 and 0.05 < sd["ratio"] < 0.07 and abs(sd["full_GMACs"] - 339) < 1
    assert all(0 < r["ratio"] < 0.1 for r in rows.values()) and len(rows) == 3
