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
