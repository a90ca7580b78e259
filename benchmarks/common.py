"""Shared pieces of the benchmark scripts: the machine record, the CIFAR10-shaped teacher, a template."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from o2mcli.models.configs import DDPM_CIFAR10_32, scheduler_config
from o2mcli.models.io import build_unet, save_model_file
from o2mcli.stages.prune import PruneConfig, run_prune


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: --device, --only (one teacher) and --json."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", choices=["digits", "cifar10"], help="one teacher instead of both")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    return ap


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    return {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def header(info: dict, extra: str = "") -> str:
    """One line naming the device, threads and torch version."""
    line = f"device {info['device']} ({info['gpu'] or info['cpu']}, {info['threads']} threads), torch {info['torch']}"
    return line + (f"; {extra}" if extra else "")


def cifar10_teacher(work: Path) -> Path:
    """The google/ddpm-cifar10-32 configuration with random weights (seed 0), as an o2m teacher file."""
    torch.manual_seed(0)
    path = work / "cifar10_teacher.safetensors"
    save_model_file(path, build_unet(DDPM_CIFAR10_32, None, path), scheduler_config("fixed"), kind="teacher")
    return path


def template(teacher: Path, work: Path, name: str, ratio: float = 0.3) -> Path:
    """``o2m prune``'s library call, magnitude importance, no throughput measurement."""
    return run_prune(PruneConfig(teacher=str(teacher), ratio=ratio, throughput=False, device="cpu",
                                 out=work / f"{name}-{ratio}".replace(" ", "_")))


def write_outputs(res: dict, table: str, out: Path | None, as_json: bool) -> None:
    """``OUT.json`` and ``OUT.md`` when ``out`` is given; the table (or the JSON) on stdout."""
    import json

    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.json").write_text(json.dumps(res, indent=2) + "\n")
        Path(f"{out}.md").write_text(table + "\n")
    print(json.dumps(res, indent=2) if as_json else table)


# Peak dense bf16 tensor-core throughput (TFLOPS, no sparsity), from the vendors' data sheets, keyed by a substring of
# torch.cuda.get_device_name (longest match wins, so "H100 PCIe" is not read as the SXM part).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
    "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "A800": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0,
    "L40": 181.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 6000 Ada": 364.0, "A6000": 155.0, "V100": 125.0,
}


def peak_bf16_tflops(device: torch.device) -> tuple[float | None, str]:
    """(the device's peak dense bf16 TFLOPS or None, a note naming it or saying why there is none)."""
    if device.type != "cuda":
        return None, "CPU: no peak-fraction (no bf16 peak table for CPUs)"
    name = torch.cuda.get_device_name(device)
    keys = [k for k in PEAK_BF16_TFLOPS if k.lower() in name.lower()]
    if not keys:
        return None, f"{name}: not in the bf16 peak table (benchmarks/common.py), so no fraction of peak"
    key = max(keys, key=len)
    return PEAK_BF16_TFLOPS[key], f"{name}: peak dense bf16 {PEAK_BF16_TFLOPS[key]:g} TFLOPS ({key} data sheet)"


def macs_rate(macs_per_sample: float, samples_per_s: float, forwards_per_sample: int = 1) -> float:
    """MACs per second achieved: MACs of one sample's forward x forwards per sample x samples per second."""
    return macs_per_sample * forwards_per_sample * samples_per_s


def peak_fraction(macs_per_s: float, peak_tflops: float | None) -> float | None:
    """The share of the bf16 peak achieved (2 FLOPs per MAC), or None without a peak."""
    return None if peak_tflops is None else 2.0 * macs_per_s / (peak_tflops * 1e12)


def int_list(text: str) -> list[int]:
    """``"1,8,64"`` -> [1, 8, 64] (the batch sweeps)."""
    return [int(x) for x in text.split(",") if x.strip()]


def modes_list(text: str) -> list[str]:
    """``"eager,compiled"``, checked."""
    modes = [x.strip() for x in text.split(",") if x.strip()]
    bad = [m for m in modes if m not in ("eager", "compiled")]
    if bad or not modes:
        raise SystemExit(f"--modes {text!r}: expected eager and/or compiled")
    return modes
