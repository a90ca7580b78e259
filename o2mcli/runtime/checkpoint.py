"""Resumable training state as safetensors (tensors) + JSON (everything else), written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from o2mcli.errors import O2MError
from o2mcli.fsutil import atomic_file, atomic_write_json, read_metadata

TENSORS, STATE = "checkpoint.safetensors", "checkpoint.json"


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into flat tensors and JSON-able hyper-parameters."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for pid, st in sd["state"].items():
        for name, val in st.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"{prefix}.{pid}.{name}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        if key.startswith(prefix + "."):
            pid, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(pid), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write tensors then state; the JSON names the tensors file's step, so a torn pair is detected."""
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / TENSORS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"step": str(state["step"])})
    atomic_write_json(directory / STATE, state)


def load_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint pair; refuse a missing, corrupt or mismatched one with a one-line reason."""
    tpath, spath = directory / TENSORS, directory / STATE
    if not tpath.is_file() or not spath.is_file():
        raise O2MError(f"{directory}: no checkpoint to resume from")
    try:
        state = json.loads(spath.read_text())
        step = int(read_metadata(tpath).get("step", -1))
        tensors = load_file(str(tpath))
    except (OSError, ValueError, SafetensorError, json.JSONDecodeError, O2MError) as e:
        raise O2MError(f"{directory}: corrupt checkpoint ({e})") from e
    if step != state.get("step"):
        raise O2MError(f"{directory}: checkpoint tensors (step {step}) and state (step {state.get('step')}) disagree")
    return tensors, state


def partial_dir(out: Path) -> Path:
    """Where an unfinished run keeps its checkpoint and log: beside the output, never inside it."""
    return out.with_name(out.name + ".partial")


def check_partial(out: Path, resume: bool, force: bool) -> Path:
    """The run's partial directory, after refusing a resume with nothing to resume or an unasked restart.

    With ``force`` and no ``resume`` an existing partial directory may be discarded; the caller
    removes it (under torchrun, rank 0 only).
    """
    work = partial_dir(out)
    if resume and not work.exists():
        raise O2MError(f"{work}: nothing to resume (no interrupted run for {out})")
    if work.exists() and not resume and not force:
        raise O2MError(f"{work}: an interrupted run is there; pass --resume to continue it or --force to start over")
    return work


def adamw_with_warmup(params, lr: float, weight_decay: float, warmup: int):
    """AdamW and a linear warm-up to ``lr`` over ``warmup`` steps, constant after (every trainer's optimizer)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    return opt, sched
