"""The training engine: a data source x a timestep plan x a KD loss, for K students at once.

Distillation and plain training (``o2m train``: one student, no teacher, no KD, real images) are
configurations of this one engine.

Per step: each student's range is chosen by the plan; students on the same range share one
batch (a sharded source such as the DKDM buffer gives each student its own); the teacher runs
once per distinct batch of this process; then each student takes an AdamW step on its own
objective and updates its EMA. Host syncs happen only at log and checkpoint points.

Student-parallel (``o2mcli.runtime.dist.Placement``): a process trains only the students it holds;
the others are ``Student.remote`` stand-ins (their index and learning-rate schedule, for the log).
Randomness does not depend on the placement: the plan's coins come from one generator every
process advances alike, and the batch of step s on range r (or of student k, for a sharded source)
from a stream seeded by (seed, s, r) (or (seed, s, k)), so a batch is the same wherever it is drawn,
and a student's weights are bitwise the same on 1 or W <= K processes (on CPU). With W > K a
student's group draws the same batch and each rank trains on its slice, DDP averaging within the
group: equal to the 1-process run up to the order of floating-point sums. The teacher runs per
distinct batch, not over their concatenation, because a convolution's per-sample result can depend on
the batch size in the last bit (oneDNN on CPU): one concatenated forward would make a batch's
teacher output depend on which batches share its process.
"""

from __future__ import annotations

import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from o2mcli.devices import autocast
from o2mcli.diffusion.gaussian import DiffusionTerms
from o2mcli.models.parametrization import Epsilon, Parametrization
from o2mcli.distill.features import FeatureTap
from o2mcli.distill.losses.base import KDLoss, Outputs
from o2mcli.distill.objective import Objective
from o2mcli.distill.plan import TimestepPlan
from o2mcli.distill.sources.base import Batch, DataSource
from o2mcli.models.configs import is_learned_variance
from o2mcli.models.denoise import predict
from o2mcli.runtime.checkpoint import adamw_with_warmup, has_checkpoint, load_optimizer, optimizer_tensors
from o2mcli.runtime.dist import (DistState, Placement, all_gather_group, all_gather_objects, all_reduce_mean_group,
                                 broadcast_flag, gather_objects, stream, sum_int)
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
    """One student: its model (DDP-wrapped within its group of ranks), KD loss module, optimizer, schedule, EMA."""

    def __init__(self, k: int, model: nn.Module, kd: KDLoss, hyper: Hyper, dist: DistState,
                 group: Any = None, group_size: int = 1) -> None:
        """``group``/``group_size``: the process group training this student data-parallel (none: this rank alone)."""
        self.k, self.raw, self.kd = k, model, kd
        self.model = model
        self.group, self.group_size = group, group_size
        if group_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(model, process_group=group)
        self.tap = FeatureTap(model, kd.points if kd.needs_features else [])
        self.params = list(model.parameters()) + list(kd.parameters())  # what the optimizer and clipping see
        self.opt, self.sched = adamw_with_warmup(self.params, hyper.lr, hyper.weight_decay, hyper.lr_warmup)
        self.ema = EMA(model, hyper.ema_decay)

    @classmethod
    def remote(cls, k: int, hyper: Hyper) -> "Student":
        """A student another process trains: its index and learning-rate schedule only (what the log reads)."""
        st = cls.__new__(cls)
        st.k, st.raw, st.model, st.kd, st.ema, st.tap = k, None, None, None, None, None
        st.group, st.group_size = None, 1
        st.params = [nn.Parameter(torch.zeros(1))]
        st.opt, st.sched = adamw_with_warmup(st.params, hyper.lr, hyper.weight_decay, hyper.lr_warmup)
        return st

    @property
    def held(self) -> bool:
        return self.raw is not None


def split_outputs(raw: torch.Tensor, channels: int, learned: bool, features: dict[str, torch.Tensor],
                  terms: DiffusionTerms, x_t: torch.Tensor, t: torch.Tensor, own: Parametrization,
                  space: Parametrization) -> Outputs:
    """A model's raw output as its prediction in ``space`` (first C channels, converted exactly from its ``own``
    parametrization), the eps it implies, the variance channels (the next C, if learned) and features."""
    pred = raw[:, :channels]
    eps = own.to_eps(terms, pred, x_t, t)
    return Outputs(pred=own.convert(terms, pred, x_t, t, space), eps=eps,
                   v=raw[:, channels:2 * channels] if learned else None, features=features)


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
    gen_data: torch.Generator  # its seed roots the per-step data streams; it also builds a buffer (prepare)
    own_steps: list[int] = field(default_factory=list)
    placement: Placement | None = None  # None: this process holds every student
    step_no: int = 0
    teacher_samples: int = 0
    profile: bool = False  # benchmarks only: synchronizes to time the teacher and the students
    # Feature KD: the teacher block each student block is compared with, where the names differ (a BK-SDM-tiny
    # student's up blocks sit one index below the teacher's); a block missing here is compared with its namesake.
    feature_pairs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: {"data": 0.0, "teacher": 0.0, "students": 0.0})
    # What the teacher's and the students' outputs mean; KD and L_simple compare in the students' space.
    teacher_param: Parametrization = field(default_factory=Epsilon)
    student_param: Parametrization = field(default_factory=Epsilon)

    def __post_init__(self) -> None:
        K = len(self.students)
        if self.placement is None:
            self.placement = Placement(rank=0, world=1, owners=tuple((0,) for _ in range(K)))
        self.held = [s for s in self.students if s.held]
        cfg = (self.teacher if self.teacher is not None else self.held[0].raw).config
        self.channels = int(cfg.in_channels)
        self.teacher_learned = self.teacher is not None and is_learned_variance(cfg)
        names = sorted({n for s in self.held for n in (s.kd.points if s.kd.needs_features else [])})
        self.own_steps = self.own_steps or [0] * K
        self.data_seed = self.gen_data.initial_seed()
        # A sharded source (the DKDM buffer) keeps the shards of this process's students only.
        self.shared = getattr(self.source, "shared", True)
        if hasattr(self.source, "hold"):
            self.source.hold(K, [s.k for s in self.held])
        # ``--kd none`` on real data ("w/o KD") and plain training never need the teacher: no forward at all.
        self.uses_teacher = (any(s.kd.needs_teacher for s in self.held) or self.objective.needs_teacher
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

    def _key(self, k: int, r: tuple[int, int]) -> tuple[int, ...]:
        """What names a batch (and seeds its stream): its range, or its student for a sharded source."""
        return (0, r[0], r[1]) if self.shared else (1, k)

    def _slice(self, batch: Batch, k: int) -> Batch:
        """This rank's part of student k's batch (all of it unless the student has a group of ranks)."""
        pl = self.placement
        G = pl.group_size(k)
        if G == 1:
            return batch
        idx = torch.tensor_split(torch.arange(batch.x_t.shape[0]), G)[pl.position(k)]
        cut = {}
        for f in dataclasses.fields(batch):
            v = getattr(batch, f.name)
            cut[f.name] = None if v is None else v[idx.to(v.device)]
        return Batch(**cut)

    def step(self) -> list[dict[str, torch.Tensor]]:
        b = self.hyper.batch_size
        clock = self._clock()
        chosen = self.plan.choose(self.gen_plan)  # every student's range, on every rank alike
        for k, r in enumerate(chosen):
            self.own_steps[k] += r != (0, self.plan.T)
        keys: dict[tuple[int, ...], tuple[tuple[int, int], int]] = {}
        for st in self.held:  # distinct batches, first-use order (deterministic)
            keys.setdefault(self._key(st.k, chosen[st.k]), (chosen[st.k], st.k))
        self.source.begin_step()
        gens, full, batches = {}, {}, {}
        for key, (r, k) in keys.items():
            gens[key] = stream(self.data_seed, self.step_no, *key)
            full[key] = self.source.draw(r[0], r[1], b, gens[key], k)
            batches[key] = self._slice(full[key], k)

        clock("data")
        teacher_out: dict[tuple[int, ...], Outputs | None] = dict.fromkeys(keys)
        if self.uses_teacher:
            teacher_out = self._run_teacher(keys, batches, full, gens)
        clock("teacher")

        parts_all = []
        for st in self.held:
            key = self._key(st.k, chosen[st.k])
            batch: Batch = batches[key]
            st.model.train()
            with autocast(self.device):
                s_raw = predict(st.model, batch.x_t, batch.t, batch.cond).float()
            learned = s_raw.shape[1] == 2 * self.channels
            s_out = split_outputs(s_raw, self.channels, learned, {n: f.float() for n, f in st.tap.pop().items()},
                                  self.terms, batch.x_t.float(), batch.t, self.student_param, self.student_param)
            loss, parts = self.objective(st.kd, s_out, teacher_out[key], batch, self.terms)
            st.opt.zero_grad(set_to_none=True)
            loss.backward()
            # DDP averaged the UNet's gradients within the student's group; the KD module's (CRD heads) here.
            all_reduce_mean_group([p.grad for p in st.kd.parameters() if p.grad is not None], st.group, st.group_size)
            torch.nn.utils.clip_grad_norm_(st.params, self.hyper.grad_clip)
            st.opt.step()
            st.sched.step()
            st.ema.update(st.raw)
            parts_all.append({k: v.detach() for k, v in parts.items()})
        for st in self.students:
            if not st.held:  # the stand-in's schedule follows the real one (the log's lr); its optimizer step
                st.opt.step()  # touches nothing (no gradient) but keeps the scheduler's order as torch expects
                st.sched.step()
        self.step_no += 1
        clock("students")
        return parts_all

    def _forward_teacher(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The teacher's raw output and block features on one batch."""
        with torch.no_grad(), autocast(self.device):
            t_raw = predict(self.teacher, batch.x_t, batch.t, batch.cond).float()
        popped = self.teacher_tap.pop()
        # keyed by the students' block names, whichever teacher block each is compared with
        feats = {n: popped[self.feature_pairs.get(n, n)].detach().float() for n in self.feature_names}
        self.teacher_samples += batch.x_t.shape[0]
        return t_raw, feats

    def _run_teacher(self, keys: dict, batches: dict, full: dict, gens: dict) -> dict[tuple[int, ...], Outputs]:
        """The teacher on each distinct batch of this rank; the source advances by the full batch's output (a
        group's slices gathered first)."""
        teacher_out = {}
        for key in keys:
            raw, feats = self._forward_teacher(batches[key])
            b = batches[key]
            teacher_out[key] = split_outputs(raw, self.channels, self.teacher_learned, feats, self.terms,
                                             b.x_t.float(), b.t, self.teacher_param, self.student_param)
            if self.source.needs_teacher:
                k = keys[key][1]
                whole = self._gather_slices(raw, k, full[key].x_t.shape[0])
                self.source.after_teacher(full[key], whole, gens[key])
        return teacher_out

    def _gather_slices(self, raw: torch.Tensor, k: int, n: int) -> torch.Tensor:
        """Student k's group's slices of a teacher output, joined in batch order (every replica advances alike)."""
        pl = self.placement
        G = pl.group_size(k)
        if G == 1:
            return raw
        if n % G == 0:
            return all_gather_group(raw, pl.group(k), G)
        import torch.distributed as tdist

        parts: list = [None] * G
        tdist.all_gather_object(parts, raw.cpu(), group=pl.group(k))
        return torch.cat(parts).to(raw.device)

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
        """Every student's loss terms (gathered from the ranks that lead them), in student order; stops on a NaN."""
        mine = {st.k: {k: float(v) for k, v in parts.items()} for st, parts in zip(self.held, parts_all)
                if self.placement.leads(st.k)}
        bad = [k for k, row in mine.items() if not all(v == v and abs(v) != float("inf") for v in row.values())]
        rows_by_k: dict[int, dict[str, float]] = {}
        for part in all_gather_objects(mine, self.dist):
            rows_by_k.update(part)
        rows = [rows_by_k[st.k] for st in self.students]
        if broadcast_flag(bool(bad), self.dist):
            who = f"student {bad[0]}" if bad else "another rank"
            # Only a checkpoint that is on disk is promised (step 0 is DKDM's buffer checkpoint, a real one).
            kept = (f"the last good checkpoint (step {last_good}) is kept in {work}; resume with --resume "
                    "(a lower --lr may help)") if last_good is not None and has_checkpoint(work) else (
                    "no checkpoint was written yet, so there is nothing to resume; run it again (a lower --lr "
                    "may help)")
            raise O2MError(f"loss became NaN or infinite by step {step} ({who}); stopped: {kept}")
        return rows

    # 3. Checkpoint state --------------------------------------------------------------------------------

    def _local_state(self) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, Any]]]:
        """The tensors and meta of the students (and source shards) this rank leads."""
        tensors: dict[str, torch.Tensor] = {}
        metas: dict[int, dict[str, Any]] = {}
        for st in self.held:
            k = st.k
            if not self.placement.leads(k):
                continue
            tensors.update({f"model.{k}.{n}": v.detach().cpu() for n, v in st.raw.state_dict().items()})
            tensors.update({f"ema.{k}.{n}": v.detach().cpu() for n, v in st.ema.shadow.items()})
            tensors.update({f"kd.{k}.{n}": v.detach().cpu() for n, v in st.kd.state_dict().items()})
            opt_t, opt_meta = optimizer_tensors(st.opt, f"opt.{k}")
            tensors.update(opt_t)
            metas[k] = {"ema_updates": st.ema.updates, "optimizer": opt_meta, "lr_sched": st.sched.state_dict()}
            if hasattr(self.source, "shard_state"):
                tensors.update({f"source.{k}.{n}": v for n, v in self.source.shard_state(k).items()})
        if not hasattr(self.source, "shard_state") and self.dist.is_main:
            tensors.update({f"source.{n}": v for n, v in self.source.state_tensors().items()})
        return tensors, metas

    def state(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to continue bit-for-bit, on any number of processes: every student's weights, EMA,
        optimizer and KD module, the plan's RNG, the source's shards. A collective: every rank contributes what
        it leads; rank 0 gets it all (the other ranks an empty dict)."""
        local = self._local_state()
        total = sum_int(self.teacher_samples, self.dist)
        meta: dict[str, Any] = {"step": step, "students": [], "own_steps": self.own_steps,
                                "teacher_samples": total, "world": self.dist.world}
        parts = gather_objects(local, self.dist)
        if parts is None:
            return {}, meta
        tensors: dict[str, torch.Tensor] = {}
        metas: dict[int, dict[str, Any]] = {}
        for t_part, m_part in parts:
            tensors.update(t_part)
            metas.update(m_part)
        meta["students"] = [metas[k] for k in range(len(self.students))]
        tensors["rng.plan"] = self.gen_plan.get_state()
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
        """Inverse of :meth:`state` (each rank takes its students and shards); returns the step to continue from."""
        if len(meta["students"]) != len(self.students):
            raise O2MError(f"checkpoint holds {len(meta['students'])} students, this run has {len(self.students)}")
        for st, sm in zip(self.students, meta["students"]):
            st.sched.load_state_dict(sm["lr_sched"])
            if not st.held:
                continue
            k = st.k
            st.raw.load_state_dict({n[len(f"model.{k}."):]: v for n, v in tensors.items() if n.startswith(f"model.{k}.")})
            st.ema.shadow = {n[len(f"ema.{k}."):]: v.to(self.device) for n, v in tensors.items()
                             if n.startswith(f"ema.{k}.")}
            st.ema.updates = sm["ema_updates"]
            st.kd.load_state_dict({n[len(f"kd.{k}."):]: v for n, v in tensors.items() if n.startswith(f"kd.{k}.")})
            load_optimizer(st.opt, tensors, sm["optimizer"], f"opt.{k}")
            if hasattr(self.source, "load_shard_state"):
                self.source.load_shard_state(k, {n[len(f"source.{k}."):]: v for n, v in tensors.items()
                                                 if n.startswith(f"source.{k}.")})
        if not hasattr(self.source, "load_shard_state"):
            self.source.load_state_tensors({n[7:]: v for n, v in tensors.items() if n.startswith("source.")})
        self.gen_plan.set_state(tensors["rng.plan"])
        self.own_steps = list(meta["own_steps"])
        # Counted per rank and summed at each checkpoint: rank 0 carries the total forward.
        self.teacher_samples = int(meta["teacher_samples"]) if self.dist.is_main else 0
        self.step_no = int(meta["step"])
        return self.step_no

    def finish(self) -> dict[int, dict[str, torch.Tensor]] | None:
        """A collective at the end of the run: every student's EMA weights on rank 0 (None elsewhere); rank 0's
        teacher-forward count and source counters become the run's totals."""
        mine = {st.k: {n: v.detach().cpu() for n, v in st.ema.shadow.items()} for st in self.held
                if self.placement.leads(st.k)}
        counts = ({st.k: self.source.shard_restarts[st.k] for st in self.held if self.placement.leads(st.k)}
                  if hasattr(self.source, "absorb_counts") else {})
        total = sum_int(self.teacher_samples, self.dist)
        parts = gather_objects((mine, counts), self.dist)
        if parts is None:
            return None
        self.teacher_samples = total
        emas: dict[int, dict[str, torch.Tensor]] = {}
        for e_part, c_part in parts:
            emas.update(e_part)
            if c_part:
                self.source.absorb_counts(c_part)
        return emas
