"""CUDA checks (``make gpu-check``): bf16 autocast against fp32, and DDP on the nccl backend with one GPU.

On CUDA o2m runs every UNet forward under bf16 autocast (``o2mcli.devices.autocast``). These tests run
the same work twice on the GPU, once as shipped (bf16 autocast) and once in true fp32 (autocast
replaced by a no-op, TF32 off), and bound the difference: (a) ``o2m train`` losses, (b) ``o2m distill``
losses (O2MKD with output and CRD KD, DKDM), (c) the DKDM buffer build, (d) sampling (DDIM, DDPM,
DPM-Solver++); (e) runs ``o2m distill`` as a DDP world of one process on nccl and compares it with the
same run without DDP. Every bound is stated where it is checked, with why; every check is recorded
(``record_property``) so ``benchmarks/gpu_check.py`` can write the measured error beside its bound.

Without CUDA the module is skipped. ``O2M_GPU_CHECK_DEVICE=cpu`` runs it on the CPU instead, as a dry
run of the test code (bf16 then comes from CPU autocast, and DDP from gloo); only a CUDA run is a
result. Models are tiny and random (as in ``tests/conftest.py``), except for sampling, which uses the
shipped digits teacher: a random UNet's samples saturate at the clip bounds, where no error shows.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

DEVICE = os.environ.get("O2M_GPU_CHECK_DEVICE", "cuda")
DRY = DEVICE == "cpu"

SKIP_REASON = ("CUDA is not available: these checks run with `make gpu-check` on a CUDA machine "
               "(O2M_GPU_CHECK_DEVICE=cpu runs them on the CPU as a dry run)")
pytestmark = pytest.mark.skipif(not DRY and not torch.cuda.is_available(), reason=SKIP_REASON)

import o2mcli.devices as devices  # noqa: E402
import o2mcli.diffusion.sampler  # noqa: E402,F401  (imported so their `autocast` can be swapped)
import o2mcli.distill.engine  # noqa: E402,F401
import o2mcli.distill.sources.buffer  # noqa: E402,F401
from conftest import cli, tiny_teacher_file  # noqa: E402

HERE = Path(__file__).resolve().parent
LIBRARY_AUTOCAST = devices.autocast  # o2m's own, kept here: the swap below must never lose it


# Helpers --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def precision(kind: str) -> Iterator[None]:
    """``bf16``: o2m as shipped (its own bf16 autocast on CUDA); ``fp32``: every autocast a no-op and TF32 off.

    The dry run on CPU emulates ``bf16`` with CPU autocast, since o2m computes in fp32 on CPU.
    """
    assert kind in ("bf16", "fp32")
    # The modules that call it (engine, buffer, sampler), not o2mcli.devices itself, whose name is the original.
    users = [m for name, m in list(sys.modules.items()) if name.startswith("o2mcli") and m is not devices
             and getattr(m, "autocast", None) is LIBRARY_AUTOCAST]
    assert devices.autocast is LIBRARY_AUTOCAST
    assert users, "no o2m module uses devices.autocast: the precision switch would do nothing"
    if kind == "fp32":
        def swap(_device):
            return contextlib.nullcontext()
    elif DRY:
        def swap(_device):
            return torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        swap = None  # the library's own bf16 autocast
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        if kind == "fp32":
            torch.backends.cuda.matmul.allow_tf32 = False  # TF32 rounds to 10 bits: not an fp32 reference
            torch.backends.cudnn.allow_tf32 = False
        if swap is not None:
            for m in users:
                m.autocast = swap
        yield
    finally:
        for m in users:
            m.autocast = LIBRARY_AUTOCAST
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def checks(record, *items: tuple[str, float, float, str]) -> None:
    """Record every (name, measured, bound, why), then fail on any measured above its bound (or not finite)."""
    for name, value, bound, why in items:
        record(f"check:{name}", json.dumps({"value": value, "bound": bound, "why": why}))
    bad = [f"{n} = {v:.4g} > {b:.4g} ({w})" for n, v, b, w in items if not (math.isfinite(v) and v <= b)]
    assert not bad, "; ".join(bad)


def differs(record, name: str, value: float) -> None:
    """bf16 must differ from fp32 at all: a zero error would mean the precision switch did nothing."""
    record(f"differs:{name}", json.dumps({"value": value}))
    assert value > 0, f"{name}: bf16 and fp32 gave identical results; the bf16 path did not run"


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run: Path) -> torch.Tensor:
    """The logged total loss of every (step, student), in log order."""
    return torch.tensor([r["loss"] for r in read_rows(run / "metrics.jsonl")], dtype=torch.float64)


def weights(path: Path) -> torch.Tensor:
    """Every floating tensor of a safetensors file (or of a stage directory's model files), flattened, in name order."""
    from safetensors.torch import load_file

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    assert files, path
    out = []
    for f in files:
        sd = load_file(str(f))
        out += [sd[k].double().flatten() for k in sorted(sd) if sd[k].is_floating_point()]
    return torch.cat(out)


def loss_checks(record, name: str, fp32: torch.Tensor, bf16: torch.Tensor, k: int, first_bound: float,
                run_bound: float, why_first: str, why_run: str) -> None:
    """Losses of the same run in fp32 and bf16: the first step's (``k`` students) and the whole run's."""
    assert fp32.shape == bf16.shape and fp32.numel() > k, (fp32.shape, bf16.shape)
    first = float(((bf16[:k] - fp32[:k]).abs() / fp32[:k].abs()).max())
    run = float(((bf16 - fp32).abs() / fp32.abs()).mean())
    differs(record, f"{name} losses", float((bf16 - fp32).abs().max()))
    checks(record, (f"{name}: first-step loss, max relative error", first, first_bound, why_first),
           (f"{name}: loss per step, mean relative error over the run", run, run_bound, why_run))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A tiny learned-variance teacher (8, 16) and its ratio-0.5 template (4, 8), pruned on the CPU."""
    from o2mcli.stages.prune import PruneConfig, run_prune

    root = tmp_path_factory.mktemp("gpu-template")
    teacher = tiny_teacher_file(root / "teacher.safetensors", variance="learned")
    return run_prune(PruneConfig(teacher=str(teacher), ratio=0.5, throughput=False, device="cpu",
                                 out=root / "template"))


# 0. The precision switch itself ----------------------------------------------------------------------------

def test_autocast_is_bf16_on_cuda(record_property) -> None:
    """o2m's autocast gives bf16 convolutions on CUDA (else every comparison below compares fp32 to fp32)."""
    conv = torch.nn.Conv2d(4, 4, 3).to(DEVICE)
    x = torch.randn(2, 4, 8, 8, device=DEVICE)
    with precision("bf16"):
        with o2mcli.distill.engine.autocast(torch.device(DEVICE)):
            y = conv(x)
    with precision("fp32"):
        with o2mcli.distill.engine.autocast(torch.device(DEVICE)):
            z = conv(x)
    record_property("bf16 dtype", str(y.dtype))
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32, (y.dtype, z.dtype)
    if not DRY:
        assert devices.autocast(torch.device(DEVICE)).fast_dtype == torch.bfloat16


# (a) o2m train ------------------------------------------------------------------------------------------------

def test_train_bf16_matches_fp32(tmp_path: Path, record_property) -> None:
    """`o2m train` (the engine, one student, no teacher) for 30 steps: the logged losses in bf16 and fp32."""
    runs = {}
    for kind in ("fp32", "bf16"):
        with precision(kind):
            res = cli("train", "--data", "digits", "--channels", "8,16", "--norm-groups", "2", "--attention-level", "1",
                      "--variance", "learned", "--steps", "30", "-b", "64", "--lr", "1e-3", "--log-every", "1",
                      "--device", DEVICE, "--seed", "0", "-o", tmp_path / kind)
        assert res.exit_code == 0, res.output
        runs[kind] = losses(tmp_path / kind)
    # Step 1 runs both precisions on the same weights and batch, so its loss differs only by the forward's
    # rounding: bf16 keeps 8 significant bits (relative 2^-9 = 0.2% per rounding), and averaging over the batch
    # shrinks that: the dry run (CPU bf16 autocast) moved the loss (eps MSE + vlb) 0.04%. Later steps differ
    # also through the diverging weights; the dry run's mean was 0.02%. The bound, 1% for both, leaves room
    # for CUDA's kernels (cuDNN, fused attention) rounding otherwise than the CPU's.
    loss_checks(record_property, "train", runs["fp32"], runs["bf16"], 1, 0.01, 0.01,
                "same weights and batch: bf16 rounding of one forward",
                "30 AdamW steps on diverging weights")


# (b) o2m distill: O2MKD (output, CRD) and DKDM --------------------------------------------------------------------

@pytest.mark.parametrize("mode, kd", [("o2mkd", "output"), ("o2mkd", "crd"), ("dkdm", "output")])
def test_distill_bf16_matches_fp32(tmp_path: Path, template: Path, record_property, mode: str, kd: str) -> None:
    """`o2m distill` K=2 for 12 steps: the logged losses of both students in bf16 and fp32."""
    extra = ["--rho", "0.05", "--init-steps", "5"] if mode == "dkdm" else []
    runs = {}
    for kind in ("fp32", "bf16"):
        with precision(kind):
            res = cli("distill", template, "--mode", mode, "-k", "2", "--kd", kd, "--steps", "12", "-b", "16",
                      "--lr", "1e-3", "--lr-warmup", "2", "--log-every", "1", "--save-every", "1000", "--seed", "0",
                      "--device", DEVICE, *extra, "-o", tmp_path / kind)
        assert res.exit_code == 0, res.output
        runs[kind] = losses(tmp_path / kind)
    if mode == "dkdm":
        # The buffer itself is built in each precision by a random teacher's 5 DDIM jumps (test (c) explains why
        # that is sensitive), so even step 1 sees different x_t and a different KL (a difference of two close
        # Gaussians, which magnifies relative error): the dry run moved step 1 by 1.3% and the run mean by 1.0%;
        # 8% and 10% bound them.
        first, run, why1 = 0.08, 0.10, "different buffers (each built in its precision) and the KL"
    else:
        # Step 1: same weights, same batch; the loss (diffusion loss + KD between teacher and student outputs)
        # goes through two UNets in bf16: the dry run moved it 0.02% (output KD) and 0.06% (CRD: InfoNCE over a
        # memory bank, a log-sum-exp of bf16 dot products), the run mean 0.01-0.03%. 1% is the bound, as for
        # train.
        first, run, why1 = 0.01, 0.01, "same weights and batch: two UNet forwards in bf16"
    loss_checks(record_property, f"distill {mode} kd={kd}", runs["fp32"], runs["bf16"], 2, first, run, why1,
                "12 AdamW steps on diverging weights")


# (c) The DKDM buffer build ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("init_steps, slots", [(None, 64), (10, 256)], ids=["exact", "ddim10"])
def test_dkdm_buffer_bf16_matches_fp32(record_property, init_steps, slots: int) -> None:
    """Buffer slots of the shipped digits teacher built from the same noise, exactly (up to 999 ancestral steps
    each) or by 10 DDIM jumps. The trained teacher, not a random one: a random eps predicts an x_0 that the
    DDIM jump divides by sqrt(alpha_bar) (down to 0.006) and clips, so tiny differences flip slots between the
    clip bounds (the dry run moved a random (8, 16) teacher's DDIM buffer by 16%), which says nothing of bf16."""
    from o2mcli.chain import BUILTIN_MODELS
    from o2mcli.diffusion.schedulers import schedule_terms, teacher_reverse_settings
    from o2mcli.distill.sources.buffer import DynamicBuffer
    from o2mcli.models.io import load_model

    path = BUILTIN_MODELS["digits-teacher"]
    teacher = load_model(path, DEVICE)
    variance, clip = teacher_reverse_settings(teacher.scheduler_config, path)
    built = {}
    for kind in ("fp32", "bf16"):
        buf = DynamicBuffer((1, 8, 8), slots, schedule_terms(teacher.scheduler_config), torch.device(DEVICE),
                            variance, learned=True, clip=clip)
        with precision(kind):
            buf.initialize(teacher.unet, torch.Generator().manual_seed(0), init_steps, slots)
        built[kind] = buf
    f, b = built["fp32"], built["bf16"]
    assert torch.equal(f.t, b.t) and f.init_forwards == b.init_forwards  # same draws, same plan
    xf, xb = f.x.double().cpu(), b.x.double().cpu()
    assert torch.isfinite(xb).all()
    differs(record_property, f"buffer {init_steps or 'exact'}", float((xb - xf).abs().max()))
    name = (f"DKDM buffer, {slots} slots, " + (f"{init_steps} DDIM jumps" if init_steps else "exact (ancestral)"))
    # Per slot: the same noise and the same ancestral noise draws, so the slots differ only by the teacher's bf16
    # rounding carried along the trajectory. The dry run measured 0.11% (exact: fresh noise at every step keeps
    # the error from growing) and 0.8% (10 DDIM jumps, each rescaling eps by up to 1/sqrt(alpha_bar)); the
    # bounds, 2% and 4%, leave room for CUDA's kernels rounding otherwise than the CPU's.
    # Statistics: the buffer's mean and std are what training sees; a shift above 1% of the std would bias
    # every target (the dry run: under 0.07%).
    checks(record_property,
           (f"{name}: x_t per slot, relative error", rel(xb, xf), 0.04 if init_steps else 0.02,
            "same noise draws; bf16 rounding carried along each slot's trajectory"),
           (f"{name}: |mean(x_t) bf16 - fp32| / std", float((xb.mean() - xf.mean()).abs() / xf.std()), 0.01,
            "a shift of the buffer's mean would bias every training target"),
           (f"{name}: |std(x_t) bf16 / fp32 - 1|", float((xb.std() / xf.std() - 1).abs()), 0.01,
            "a change of the buffer's spread would bias every training target"))


# (d) Sampling -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("ddpm", 50), ("dpm++", 20)])
def test_sampling_bf16_matches_fp32(record_property, sampler: str, steps: int) -> None:
    """64 samples of the shipped digits teacher from the same noise: bf16 and fp32 on the device, fp32 on the CPU."""
    from o2mcli.chain import BUILTIN_MODELS
    from o2mcli.diffusion.sampler import sample_images
    from o2mcli.models.io import load_model

    out = {}
    for kind, dev in (("fp32", DEVICE), ("bf16", DEVICE), ("fp32 cpu", "cpu")):
        m = load_model(BUILTIN_MODELS["digits-teacher"], dev)
        with precision(kind.split()[0]):
            x = sample_images(m.unet, sampler, m.scheduler_config, steps, 64, 64, seed=0, device=torch.device(dev),
                              show_progress=False)
        out[kind] = torch.from_numpy(x) * 2 - 1  # back to the model's range [-1, 1]
    differs(record_property, f"sampling {sampler}", float((out["bf16"] - out["fp32"]).abs().max()))
    # bf16 vs fp32: each of the steps rounds the teacher's eps to 8 significant bits; the sampler carries the
    # error to the end (DDPM adds the same noise draws in both, DPM++ is a multistep method). The dry run
    # measured 0.6-0.85% over the 64 images; 4% is the bound, room for CUDA's kernels rounding otherwise.
    # fp32 on the device vs fp32 on the CPU: the same computation in another order (cuDNN's kernels), so only
    # float32 rounding (2^-24) amplified by the sampler; 1e-3 is the bound, well below bf16's error.
    checks(record_property,
           (f"sampling {sampler} {steps} steps: bf16 vs fp32, relative error", rel(out["bf16"], out["fp32"]), 0.04,
            "each step's eps rounded to bf16, carried through the sampler"),
           (f"sampling {sampler} {steps} steps: fp32 {DEVICE} vs fp32 cpu, relative error",
            rel(out["fp32"], out["fp32 cpu"]), 1e-3, "fp32 rounding only (another summation order)"))


# (e) DDP on nccl, one GPU -------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode, kd", [("o2mkd", "crd"), ("dkdm", "output")])
def test_ddp_nccl_one_gpu_matches_plain(tmp_path: Path, template: Path, record_property, mode: str, kd: str) -> None:
    """`o2m distill` as a DDP world of one process (torchrun, nccl) against the same run without DDP.

    torchrun with one process leaves o2m single-process (WORLD_SIZE 1), so ``ddp_one_rank.py`` joins the nccl
    group itself and runs the stage with DDP enabled: the students are DDP-wrapped, the CRD heads' gradients
    and the NaN flag go through all_reduce, the checkpoint's RNG states through all_gather, on nccl.
    """
    extra = ["--rho", "0.05", "--init-steps", "5"] if mode == "dkdm" else []
    args = ["distill", str(template), "--mode", mode, "-k", "2", "--kd", kd, "--steps", "8", "-b", "16", "--lr", "1e-3",
            "--lr-warmup", "2", "--log-every", "2", "--save-every", "4", "--seed", "0", "--device", DEVICE, *extra]
    env = {**os.environ, "O2M_PROGRESS": "0", "OMP_NUM_THREADS": "1", "NCCL_DEBUG": "WARN",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent.parent), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(HERE / "ddp_one_rank.py"), *args, "-o", str(tmp_path / "ddp")]
    # 20 s or so on one GPU; the limit keeps a hung nccl setup from eating the whole check's time.
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    backend = "gloo" if DRY else "nccl"
    assert f"ddp-check: backend {backend}, world 1" in res.stdout, res.stdout[-2000:]
    assert res.stdout.count("DistributedDataParallel") == 2, res.stdout[-2000:]  # both students wrapped
    record_property("backend", backend)

    assert all(getattr(sys.modules[m], "autocast", LIBRARY_AUTOCAST) is LIBRARY_AUTOCAST for m in
               ("o2mcli.distill.engine", "o2mcli.distill.sources.buffer"))  # o2m as shipped, as in the DDP process
    ref = cli(*args, "-o", tmp_path / "plain")
    assert ref.exit_code == 0, ref.output
    ddp, plain, start = weights(tmp_path / "ddp"), weights(tmp_path / "plain"), weights(template / "template.safetensors")
    assert torch.isfinite(ddp).all()
    update = float((plain - start.repeat(2)).norm())  # the two students' (EMA) training update
    assert update > 0
    l_ddp, l_plain = losses(tmp_path / "ddp"), losses(tmp_path / "plain")
    # One rank, same seeds: DDP averages gradients over a world of one, so the runs are the same computation.
    # They may differ only by nondeterministic CUDA kernels (atomics in convolution backward), which AdamW turns
    # into at most lr-sized moves of weights whose gradients are near zero. The bound: 1% of the training update,
    # and 1e-3 relative on the logged losses. (The dry run on gloo and the CPU: both exactly 0.)
    checks(record_property,
           (f"DDP {backend} x1 vs plain ({mode} kd={kd}): student weights, |difference| / |training update|",
            float((ddp - plain).norm()) / update, 0.01, "the same computation; only nondeterministic kernels"),
           (f"DDP {backend} x1 vs plain ({mode} kd={kd}): logged losses, max relative error",
            float(((l_ddp - l_plain).abs() / l_plain.abs()).max()), 1e-3, "the same computation"))
