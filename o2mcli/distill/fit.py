"""The one training loop: resume, the mode's preparation, steps, logging, the NaN stop and checkpoints.

It drives any ``Distiller``; what differs between runs (the mode's source, objective and preparation,
the number of students) is inside the engine. An unfinished run keeps its checkpoint in ``work``
(safetensors + JSON, written atomically every ``save_every`` steps); ``resume`` continues it
bit-for-bit on CPU.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from o2mcli.errors import O2MError, flag_name
from o2mcli.runtime.checkpoint import load_checkpoint, save_checkpoint
from o2mcli.runtime.dist import barrier
from o2mcli.runtime.run import JsonlLog, progress


@dataclass(frozen=True)
class FitPlan:
    """How long to train and how often to log and save."""

    steps: int
    log_every: int
    save_every: int
    resume: bool
    desc: str


@dataclass
class FitResult:
    """What the loop measured: wall seconds of the steps, student samples seen, the preparation's record."""

    seconds: float
    seen: int
    init_info: dict


class _Quiet(list):
    """A progress bar stand-in for ranks other than 0."""

    def set_postfix(self, **_: object) -> None:
        """Silent."""


def settings_diff(saved: Any, now: dict) -> str:
    """The settings a resume changes, as ``--flag <checkpoint's> (now <this run's>)``, the first three."""
    if not isinstance(saved, dict):
        return "the checkpoint records none"
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k, "<unset>") != now.get(k, "<unset>"))
    shown = [f"{flag_name(k)} {saved.get(k, '<unset>')} (now {now.get(k, '<unset>')})" for k in keys[:3]]
    return ", ".join(shown) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def fit(engine: Any, plan: FitPlan, work: Path, fingerprint: dict,
        prepare: Callable[[Any, Optional[Callable[[str], None]]], dict]) -> FitResult:
    """Train ``engine`` for ``plan.steps`` steps, checkpointing into ``work``; see the module docstring."""
    dist = engine.dist

    # 1. Start over, or resume (the checkpoint must come from the same settings).
    if dist.is_main and work.exists() and not plan.resume:
        shutil.rmtree(work)  # --force: start over
    start, last_good, init_info = 0, None, {}
    if plan.resume:
        tensors, state = load_checkpoint(work)
        if state.get("config_fingerprint") != fingerprint:
            diff = settings_diff(state.get("config_fingerprint"), fingerprint)
            raise O2MError(f"{work}: checkpoint was made with other settings: {diff}; resume with the same options")
        start = engine.load_state(tensors, state)
        init_info = state.get("init_info", {})
        last_good = start
        if start > plan.steps:
            raise O2MError(f"{work}: checkpoint is at step {start}; pass --steps {start} or more to continue")
    if dist.is_main:
        work.mkdir(parents=True, exist_ok=True)
    barrier(dist)

    def save(step: int) -> None:
        """Every rank contributes its state (RNGs, buffer); rank 0 writes the checkpoint atomically."""
        tensors, meta = engine.state(step)
        if dist.is_main:
            meta.update(config_fingerprint=fingerprint, init_info=init_info)
            save_checkpoint(work, tensors, meta)
        barrier(dist)

    # 2. The mode's preparation (DKDM's buffer build), checkpointed at step 0: it can be the costly part.
    if not plan.resume:
        def say(msg: str) -> None:
            # Under torchrun each rank builds only its students' share of the work: rank 0 speaks for the run.
            print(msg + (f" (rank 0 of {dist.world})" if dist.enabled else ""), file=sys.stderr, flush=True)

        init_info = prepare(engine, say if dist.is_main else None)
        if init_info:
            save(0)
            last_good = 0
    log = JsonlLog(work / "metrics.jsonl", keep_until_step=start if plan.resume else None) if dist.is_main else None

    # 3. The loop. Host syncs only at log and save points.
    steps = range(start, plan.steps)
    bar = progress(steps, total=plan.steps, initial=start, desc=plan.desc) if dist.is_main else _Quiet(steps)
    per_step = engine.hyper.batch_size * len(engine.students)  # every student's whole batch, on any number of ranks
    t_last, seen, t_run, seen_run = time.perf_counter(), 0, time.perf_counter(), 0
    for step in bar:
        parts = engine.step()
        done = step + 1
        seen += per_step
        at_log = done % plan.log_every == 0 or done == plan.steps
        at_save = done % plan.save_every == 0 and done < plan.steps
        if at_log or at_save:
            rows = engine.check_finite(parts, done, last_good, work)
            now = time.perf_counter()
            ips = seen / max(now - t_last, 1e-9)
            seen_run += seen
            t_last, seen = now, 0
            if at_log and log is not None:
                for st, row in zip(engine.students, rows):
                    log.write({"step": done, "student": st.k, **row, "lr": st.sched.get_last_lr()[0],
                               "images_per_s": ips})
                bar.set_postfix(loss=f"{sum(r['loss'] for r in rows) / len(rows):.4f}")
        if at_save:
            save(done)
            last_good = done
    seconds = time.perf_counter() - t_run
    if log is not None:
        log.close()
    return FitResult(seconds=seconds, seen=seen_run or 1, init_info=init_info)
