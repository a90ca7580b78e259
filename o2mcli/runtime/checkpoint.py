"""Resumable training state as safetensors (tensors) + JSON (everything else), written atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from o2mcli.errors import O2MError
from o2mcli.fsutil import TMP_SUFFIX, atomic_file, atomic_write_json, loads_bounded, read_metadata, save_safetensors
from o2mcli.outputs import notice

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
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                         metadata={"step": str(state["step"])})
    atomic_write_json(directory / STATE, state)


def load_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint pair; refuse a missing, corrupt or mismatched one with a one-line reason."""
    tpath, spath = directory / TENSORS, directory / STATE
    if not tpath.is_file() or not spath.is_file():
        raise O2MError(f"{directory}: no checkpoint to resume from")
    try:
        state = loads_bounded(spath.read_bytes(), str(spath))
        step = int(read_metadata(tpath).get("step", -1))
        check_state(state)
        tensors = load_file(str(tpath))
    except (OSError, ValueError, SafetensorError, O2MError) as e:
        raise O2MError(f"{directory}: corrupt checkpoint ({e})") from e
    if step != state.get("step"):
        raise O2MError(f"{directory}: checkpoint tensors (step {step}) and state (step {state.get('step')}) disagree")
    return tensors, state


def check_state(state: Any) -> None:
    """The checkpoint JSON's shape, before anything trusts it: a map with a non-negative integer step and, where
    present, lists of students and of their own-range step counts."""
    if not isinstance(state, dict):
        raise ValueError(f"{STATE} holds a {type(state).__name__}, not a map")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step {step!r} is not a non-negative integer")
    for key in ("students", "own_steps"):
        if key in state and not isinstance(state[key], list):
            raise ValueError(f"{key!r} is a {type(state[key]).__name__}, not a list")
    if not all(isinstance(s, dict) for s in state.get("students", [])):
        raise ValueError("'students' holds an entry that is not a map")


def partial_dir(out: Path) -> Path:
    """Where an unfinished run keeps its checkpoint and log: beside the output, never inside it."""
    return out.with_name(out.name + ".partial")


def has_checkpoint(work: Path) -> bool:
    """Whether a partial directory holds a checkpoint (a run stopped before its first one holds only a log)."""
    return (work / STATE).is_file() or (work / TENSORS).is_file()


def check_partial(out: Path, resume: bool, force: bool) -> Path:
    """The run's partial directory, after refusing a resume with nothing to resume or an unasked restart.

    The caller holds the output's lock (``o2mcli.outputs``), so a partial directory here belongs to a run that
    is over. One with no checkpoint (stopped before its first) holds nothing to resume: removed, with a note.
    With ``force`` and no ``resume`` an existing one may be discarded; the caller removes it (under torchrun,
    rank 0 only).
    """
    work = partial_dir(out)
    main = int(os.environ.get("RANK", "0")) == 0
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise O2MError(f"{work}: not a directory; o2m keeps an interrupted run's checkpoint there: move it away")
    if work.is_dir() and not has_checkpoint(work):
        if resume:
            raise O2MError(f"{work}: the interrupted run stopped before its first checkpoint (written every "
                           f"--save-every steps), so there is nothing to resume; run again without --resume")
        if main:
            shutil.rmtree(work)
            notice(f"removed {work}: left by a run stopped before its first checkpoint (nothing to resume)")
        return work
    if resume and not work.exists():
        raise O2MError(f"{work}: nothing to resume (no interrupted run for {out})")
    if work.exists() and not resume and not force:
        raise O2MError(f"{work}: an interrupted run is there (checkpoint at step {_step_of(work)}); pass --resume to "
                       "continue it or --force to start over")
    if work.is_dir() and main:
        for tmp in work.glob(f".*{TMP_SUFFIX}"):  # a checkpoint write cut by the kill
            tmp.unlink(missing_ok=True)
    return work


def _step_of(work: Path) -> str:
    try:
        return str(int(read_metadata(work / TENSORS).get("step", "?")))
    except (O2MError, ValueError):
        return "?"


def run_bytes(model: torch.nn.Module, copies: int) -> int:
    """Disk a training run of ``copies`` models of ``model``'s size needs: the checkpoint (weights, EMA, AdamW's two
    moments, as fp32) written beside the finished output (the EMA weights)."""
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return int(copies) * n * 4 * (4 + 1)


def adamw_with_warmup(params, lr: float, weight_decay: float, warmup: int):
    """AdamW and a linear warm-up to ``lr`` over ``warmup`` steps, constant after (every trainer's optimizer)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    return opt, sched
