"""Device choice and mixed precision: CPU first, CUDA with bf16 autocast when present."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from o2mcli.errors import O2MError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cpu``, ``cuda`` and ``cuda:N`` are checked."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise O2MError(f"--device {spec}: CUDA is not available on this machine (use cpu or auto)")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise O2MError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise O2MError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


def autocast(device: torch.device) -> ContextManager:
    """bf16 autocast on CUDA; a no-op on CPU so CPU runs stay exact and deterministic."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels; only for timing, never inside a hot loop."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
