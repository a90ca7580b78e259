"""Compiled sampling (``--compile``): the same samples as eager within a stated bound, one graph, an eager fallback.

Inductor compiles on the CPU here and needs a C++ compiler: where there is none, the tests that compile skip saying
so (the fallback that then runs is tested apart, by simulating that failure). Every test uses one tiny UNet architecture at one batch shape, so the process compiles it
once (students and stage-loaded copies of the same architecture share the graph): the file takes about a minute.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import cli, make_model_stage, tiny_scheduler, tiny_unet
from o2mcli.diffusion import compile as compile_mod
from o2mcli.diffusion.compile import compile_denoiser
from o2mcli.diffusion.sampler import measure_throughput, sample_images
from o2mcli.manifest import read_manifest
from o2mcli.models.families import family_of
from o2mcli.models.group import StudentGroup

CPU = torch.device("cpu")
STEPS, N, BATCH = 4, 4, 4  # one input shape (4x1x8x8) for every test: one compile in the process

# Inductor's CPU code is C++ (g++ by default, or $CXX): the one genuine reason not to compile here.
needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="no C++ compiler for inductor's CPU code on this machine (the eager fallback is tested apart)")

# The bound on max |compiled - eager| over the samples in [-1, 1] (see test_compiled_matches_eager's docstring).
BOUND = 1e-3


def _samples(model) -> np.ndarray:
    return sample_images(model, "ddim", tiny_scheduler(), STEPS, N, BATCH, seed=0, device=CPU, show_progress=False)


@needs_compiler
def test_compiled_matches_eager() -> None:
    """Compiled and eager DDIM samples of a tiny UNet agree within ``BOUND`` = 1e-3 (max abs, images in [0, 1]).

    Why that bound: compiled code computes the same float32 math in another order (inductor fuses GroupNorm's mean and
    variance reductions, oneDNN's channels-last convolutions sum their taps in another order), so each forward's eps
    differs from eager's by a few float32 roundings relative to its size, ~1e-6. DDIM's update turns eps into the
    x_0 prediction through 1/sqrt(alpha_bar_t), up to ~160 at t near T=1000 (alpha_bar_T ~ 4e-5), so one step may move
    the sample by ~1.6e-4 at worst, and the S=4 steps' differences add (the contraction of the later steps only
    shrinks them): 4 x 1.6e-4 = 6.4e-4 < 1e-3. A real bug (a wrong layout, a stale CUDA-graph output, another student)
    moves samples by 1e-2 or more.
    """
    eager = tiny_unet()
    model = copy.deepcopy(eager)
    x = torch.randn(BATCH, 1, 8, 8)
    with torch.no_grad():  # the whole forward is one graph: no break inside the denoiser
        explained = torch._dynamo.explain(copy.deepcopy(eager))(x, torch.tensor(999))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons

    rec = compile_denoiser(model, CPU)
    assert family_of(model) is family_of(eager)  # still the same module type
    assert model.state_dict().keys() == eager.state_dict().keys()
    got, want = _samples(model), _samples(eager)
    assert rec.ran == "compiled", rec.fallback
    assert rec.shapes == 1 and rec.warmup_s > 0 and rec.channels_last
    diff = float(np.abs(got - want).max())
    print(f"compiled vs eager, tiny UNet: max abs diff {diff:.3g} (bound {BOUND:g})")
    assert diff <= BOUND

    # Throughput of the compiled model: its record says how it ran; the warm-up run is timed apart.
    tp = measure_throughput(model, "ddim", tiny_scheduler(), 2, BATCH, CPU, repeats=1, compile=rec)
    assert tp["compile"]["ran"] == "compiled" and tp["warmup_s"] > 0 and tp["images_per_s"] > 0


@needs_compiler
def test_compiled_group_matches_eager() -> None:
    """A K=2 group: each student compiled (one shared graph, same architecture), routed by t as eager. Same bound and
    reasoning as :func:`test_compiled_matches_eager`; each step runs one student."""
    eager = StudentGroup([tiny_unet(seed=1), tiny_unet(seed=2)], [(0, 500), (500, 1000)])
    group = copy.deepcopy(eager)
    rec = compile_denoiser(group, CPU)
    got, want = _samples(group), _samples(eager)
    assert rec.ran == "compiled" and rec.shapes == 2  # one per student; the second reuses the first's graph
    assert group.served == eager.served == [N * STEPS // 2] * 2
    diff = float(np.abs(got - want).max())
    print(f"compiled vs eager, K=2 group: max abs diff {diff:.3g} (bound {BOUND:g})")
    assert diff <= BOUND


@needs_compiler
def test_sample_compile_records_it(tmp_path, tiny_model_file) -> None:
    out = tmp_path / "s"
    res = cli("sample", str(tiny_model_file), "--compile", "-n", str(N), "-b", str(BATCH), "--steps", "2",
              "--no-png", "--device", "cpu", "-o", str(out))
    assert res.exit_code == 0, res.output
    s = read_manifest(out).summary
    assert s["compile"]["ran"] == "compiled" and s["compile"]["warmup_s"] >= 0 and "fallback" not in s["compile"]
    assert read_manifest(out).config["compile"] is True

    # o2m score --compile times the same model compiled: same shape, so no new compile.
    scores = tmp_path / "scores"
    res = cli("score", str(out), "--compile", "--throughput-batch", str(BATCH), "--throughput-repeats", "1",
              "--kid-subsets", "2", "--device", "cpu", "-o", str(scores))
    assert res.exit_code == 0, res.output
    tp = json.loads((scores / "report.json").read_text())["rows"][0]["throughput"]
    assert tp["compile"]["ran"] == "compiled" and tp["warmup_s"] > 0 and tp["images_per_s"] > 0


def test_compile_failure_falls_back_to_eager(tmp_path, tiny_model_file, monkeypatch, capsys) -> None:
    """No C compiler for inductor (simulated: the compiled call raises what inductor raises then): one note, eager
    samples, the manifest says it ran eager and why."""
    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx: "
                               "(None, 'g++')\nmore detail")
        return call

    monkeypatch.setattr(compile_mod, "_torch_compile", broken)
    out = tmp_path / "s"
    res = cli("sample", str(tiny_model_file), "--compile", "-n", str(N), "-b", "2", "--steps", "2",
              "--no-png", "--device", "cpu", "-o", str(out))
    assert res.exit_code == 0, res.output
    notes = [line for line in res.output.splitlines() if "--compile" in line]
    assert len(notes) == 1 and "sampling continues eagerly" in notes[0] and "InvalidCxxCompiler" in notes[0], notes
    s = read_manifest(out).summary
    assert s["compile"]["ran"] == "eager" and "InvalidCxxCompiler" in s["compile"]["fallback"]

    ref = tmp_path / "ref"
    assert cli("sample", str(tiny_model_file), "-n", str(N), "-b", "2", "--steps", "2", "--no-png", "--device", "cpu",
               "-o", str(ref)).exit_code == 0
    with np.load(out / "samples.npz") as a, np.load(ref / "samples.npz") as b:
        # eager both times, the fallback's weights channels-last: at most one 8-bit level apart
        assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1


def test_compile_with_deepcache_refused(tmp_path, tiny_model_file) -> None:
    res = cli("sample", str(tiny_model_file), "--compile", "--deepcache", "2", "-n", "2", "--steps", "2",
              "--device", "cpu", "-o", str(tmp_path / "s"))
    assert res.exit_code == 2
    assert "--compile" in res.output and "--deepcache" in res.output and len(res.output.strip().splitlines()) == 1

    # Samples drawn with DeepCache are timed with it on: score --compile refuses them, before any timing.
    dc = tmp_path / "dc"
    assert cli("sample", str(tiny_model_file), "--deepcache", "2", "-n", "4", "--steps", "2", "--no-png",
               "--device", "cpu", "-o", str(dc)).exit_code == 0
    res = cli("score", str(dc), "--compile", "--device", "cpu", "-o", str(tmp_path / "scores"))
    assert res.exit_code == 2 and "--compile" in res.output and "DeepCache" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "scores").exists()


@needs_compiler
def test_compiled_group_from_stage_dir(tmp_path) -> None:
    """A students stage directory sampled compiled: each student served its range, as eager."""
    stage = make_model_stage(tmp_path / "students", "students", ranges=((0, 500), (500, 1000)))
    out = tmp_path / "s"
    res = cli("sample", str(stage), "--compile", "-n", str(N), "-b", str(BATCH), "--steps", "2", "--no-png",
              "--device", "cpu", "-o", str(out))
    assert res.exit_code == 0, res.output
    s = read_manifest(out).summary
    assert s["compile"]["ran"] == "compiled" and s["served"] == [N, N]
    json.dumps(s)
