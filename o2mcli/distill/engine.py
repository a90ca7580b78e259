"""The training engine: a data source x a timestep plan x a KD loss, for K students at once.

Distillation and plain training (``o2m train``: one student, no teacher, no KD, real images) are
configurations of this one engine.

Per step: each student's range is chosen by the plan; students on the same range share one
batch; the teacher runs *once* over the concatenation of the distinct batches (its output and
block features are split back); then each student takes an AdamW step on its own objective and
updates its EMA. Randomness: the plan's coins come from one generator shared by all ranks, the
data from a per-rank generator, so a run (and a resumed run) is deterministic on CPU. Host syncs
happen only at log and checkpoint points.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from o2mcli.devices import autocast
from o2mcli.diffusion.gaussian import DiffusionTerms
from o2mcli.distill.features import FeatureTap
from o2mcli.distill.losses.base import KDLoss, Outputs
from o2mcli.distill.objective import Objective
from o2mcli.distill.plan import TimestepPlan
from o2mcli.distill.sources.base import Batch, DataSource
from o2mcli.models.configs import is_learned_variance
from o2mcli.models.denoise import predict
from o2mcli.runtime.checkpoint import adamw_with_warmup, load_optimizer, optimizer_tensors
from o2mcli.runtime.dist import DistState, all_reduce_mean, broadcast_flag, gather_tensors
from o2mcli.runtime.ema import EMA
from o2mcli.errors import O2MError


@dataclass(frozen=True)
class Hyper:
    """Optimization settings shared by every student."""

    batch_size: int = 64
    lr: float = 2e-4
    lr_warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0


class Student:
    """One student: its model (DDP-wrapped under torchrun), KD loss module, optimizer, schedule, EMA."""

    def __init__(self, k: int, model: nn.Module, kd: KDLoss, hyper: Hyper, dist: DistState) -> None:
        self.k, self.raw, self.kd = k, model, kd
        self.model = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(model)
        self.tap = FeatureTap(model, kd.points if kd.needs_features else [])
        self.params = list(model.parameters()) + list(kd.parameters())  # what the optimizer and clipping see
        self.opt, self.sched = adamw_with_warmup(self.params, hyper.lr, hyper.weight_decay, hyper.lr_warmup)
        self.ema = EMA(model, hyper.ema_decay)


def split_outputs(raw: torch.Tensor, channels: int, learned: bool, features: dict[str, torch.Tensor]) -> Outputs:
    """A UNet's raw output as eps (first C channels), v (the next C, if learned) and features."""
    return Outputs(eps=raw[:, :channels], v=raw[:, channels:2 * channels] if learned else None, features=features)


@dataclass
class Distiller:
    """Trains ``students`` against ``teacher``; see the module docstring for one step."""

    teacher: nn.Module | None  # None: plain training (``o2m train``), nothing reads a teacher
    students: list[Student]
    source: DataSource
    plan: TimestepPlan
    objective: Objective
    terms: DiffusionTerms
    hyper: Hyper
    device: torch.device
    dist: DistState
    gen_plan: torch.Generator
    gen_data: torch.Generator
    own_steps: list[int] = field(default_factory=list)
    teacher_samples: int = 0
    profile: bool = False  # benchmarks only: synchronizes to time the teacher and the students
    # Feature KD: the teacher block each student block is compared with, where the names differ (a BK-SDM-tiny
    # student's up blocks sit one index below the teacher's); a block missing here is compared with its namesake.
    feature_pairs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: {"data": 0.0, "teacher": 0.0, "students": 0.0})

    def __post_init__(self) -> None:
        cfg = (self.teacher if self.teacher is not None else self.students[0].raw).config
        self.channels = int(cfg.in_channels)
        self.teacher_learned = self.teacher is not None and is_learned_variance(cfg)
        names = sorted({n for s in self.students for n in (s.kd.points if s.kd.needs_features else [])})
        self.own_steps = self.own_steps or [0] * len(self.students)
        # ``--kd none`` on real data ("w/o KD") and plain training never need the teacher: no forward at all.
        self.uses_teacher = (any(s.kd.needs_teacher for s in self.students) or self.objective.needs_teacher
                             or self.source.needs_teacher)
        if self.teacher is None:
            if self.uses_teacher:
                raise O2MError("this run's KD loss, objective or data source reads a teacher, and there is none")
            self.teacher_tap = None
            return
        self.feature_names = names
        self.teacher_tap = FeatureTap(self.teacher, sorted({self.feature_pairs.get(n, n) for n in names}))
        self.teacher.eval().requires_grad_(False)

    # 1. One step ------------------------------------------------------------------------------------

    def step(self) -> list[dict[str, torch.Tensor]]:
        b = self.hyper.batch_size
        clock = self._clock()
        chosen = self.plan.choose(self.gen_plan)
        order = list(dict.fromkeys(chosen))  # distinct ranges, first-use order (deterministic)
        self.source.begin_step()
        batches = {r: self.source.draw(r[0], r[1], b, self.gen_data) for r in order}
        for k, r in enumerate(chosen):
            self.own_steps[k] += r != (0, self.plan.T)

        clock("data")
        teacher_out: dict[tuple[int, int], Outputs | None] = dict.fromkeys(order)
        if self.uses_teacher:
            teacher_out = self._run_teacher(order, batches)
        clock("teacher")

        parts_all = []
        for st, r in zip(self.students, chosen):
            batch: Batch = batches[r]
            st.model.train()
            with autocast(self.device):
                s_raw = predict(st.model, batch.x_t, batch.t, batch.cond).float()
            learned = s_raw.shape[1] == 2 * self.channels
            s_out = split_outputs(s_raw, self.channels, learned, {n: f.float() for n, f in st.tap.pop().items()})
            loss, parts = self.objective(st.kd, s_out, teacher_out[r], batch, self.terms)
            st.opt.zero_grad(set_to_none=True)
            loss.backward()
            # DDP averaged the UNet's gradients; the KD module's (CRD heads) are averaged here.
            all_reduce_mean([p.grad for p in st.kd.parameters() if p.grad is not None], self.dist)
            torch.nn.utils.clip_grad_norm_(st.params, self.hyper.grad_clip)
            st.opt.step()
            st.sched.step()
            st.ema.update(st.raw)
            parts_all.append({k: v.detach() for k, v in parts.items()})
        clock("students")
        return parts_all

    def _run_teacher(self, order: list[tuple[int, int]], batches: dict) -> dict[tuple[int, int], Outputs]:
        """The teacher, once over every distinct batch of this step; its outputs split back per range."""
        x = torch.cat([batches[r].x_t for r in order])
        t = torch.cat([batches[r].t for r in order])
        conds = [batches[r].cond for r in order]
        cond = None if any(c is None for c in conds) else torch.cat(conds)
        with torch.no_grad(), autocast(self.device):
            t_raw = predict(self.teacher, x, t, cond).float()
        popped = self.teacher_tap.pop()
        # keyed by the students' block names, whichever teacher block each is compared with
        t_feats = {n: popped[self.feature_pairs.get(n, n)].detach().float() for n in self.feature_names}
        self.teacher_samples += x.shape[0]
        teacher_out = {}
        offset = 0
        for r in order:
            n = batches[r].x_t.shape[0]  # a buffer range may hold fewer than b slots
            sl = slice(offset, offset + n)
            offset += n
            teacher_out[r] = split_outputs(t_raw[sl], self.channels, self.teacher_learned,
                                           {n: f[sl] for n, f in t_feats.items()})
            self.source.after_teacher(batches[r], t_raw[sl], self.gen_data)
        return teacher_out

    def _clock(self):
        """Adds the time since the previous call to ``timings[name]``; a no-op unless profiling."""
        if not self.profile:
            return lambda name: None
        from o2mcli.devices import synchronize

        last = [time.perf_counter()]

        def tick(name: str) -> None:
            synchronize(self.device)
            now = time.perf_counter()
            self.timings[name] += now - last[0]
            last[0] = now
        return tick

    # 2. Health check (host sync: only at log and checkpoint points) -----------------------------------

    def check_finite(self, parts_all: list[dict[str, torch.Tensor]], step: int, last_good: int | None,
                     work: Path) -> list[dict[str, float]]:
        rows = [{k: float(v) for k, v in parts.items()} for parts in parts_all]
        bad = [k for k, row in enumerate(rows) if not all(v == v and abs(v) != float("inf") for v in row.values())]
        if broadcast_flag(bool(bad), self.dist):
            who = f"student {bad[0]}" if bad else "another rank"
            kept = (f"the last good checkpoint (step {last_good}) is kept in {work}; resume with --resume "
                    "(a lower --lr may help)") if last_good else f"no checkpoint was written yet ({work})"
            raise O2MError(f"loss became NaN or infinite by step {step} ({who}); stopped: {kept}")
        return rows

    # 3. Checkpoint state --------------------------------------------------------------------------------

    def state(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to continue bit-for-bit: weights, EMA, optimizer, KD modules, RNGs, the source."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"step": step, "students": [], "own_steps": self.own_steps,
                                "teacher_samples": self.teacher_samples, "world": self.dist.world}
        for st in self.students:
            k = st.k
            tensors.update({f"model.{k}.{n}": v for n, v in st.raw.state_dict().items()})
            tensors.update({f"ema.{k}.{n}": v for n, v in st.ema.shadow.items()})
            tensors.update({f"kd.{k}.{n}": v for n, v in st.kd.state_dict().items()})
            opt_t, opt_meta = optimizer_tensors(st.opt, f"opt.{k}")
            tensors.update(opt_t)
            meta["students"].append({"ema_updates": st.ema.updates, "optimizer": opt_meta,
                                     "lr_sched": st.sched.state_dict()})
        tensors["rng.plan"] = self.gen_plan.get_state()
        for r, s in enumerate(gather_tensors(self.gen_data.get_state(), self.dist)):
            tensors[f"rng.data.{r}"] = s
        tensors.update({f"source.{n}": v for n, v in self.source.state_tensors().items()})
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
        """Inverse of :meth:`state`; returns the step to continue from."""
        if meta.get("world", 1) != self.dist.world:
            raise O2MError(f"checkpoint was written by {meta.get('world')} processes; resume with the same number "
                           f"(now {self.dist.world})")
        if len(meta["students"]) != len(self.students):
            raise O2MError(f"checkpoint holds {len(meta['students'])} students, this run has {len(self.students)}")
        for st, sm in zip(self.students, meta["students"]):
            k = st.k
            st.raw.load_state_dict({n[len(f"model.{k}."):]: v for n, v in tensors.items() if n.startswith(f"model.{k}.")})
            st.ema.shadow = {n[len(f"ema.{k}."):]: v.to(self.device) for n, v in tensors.items()
                             if n.startswith(f"ema.{k}.")}
            st.ema.updates = sm["ema_updates"]
            st.kd.load_state_dict({n[len(f"kd.{k}."):]: v for n, v in tensors.items() if n.startswith(f"kd.{k}.")})
            load_optimizer(st.opt, tensors, sm["optimizer"], f"opt.{k}")
            st.sched.load_state_dict(sm["lr_sched"])
        self.gen_plan.set_state(tensors["rng.plan"])
        self.gen_data.set_state(tensors[f"rng.data.{self.dist.rank}"])
        self.source.load_state_tensors({n[7:]: v for n, v in tensors.items() if n.startswith("source.")})
        self.own_steps = list(meta["own_steps"])
        self.teacher_samples = int(meta["teacher_samples"])
        return int(meta["step"])
