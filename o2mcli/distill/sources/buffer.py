"""The DKDM dynamic buffer: rho*T*b noisy samples the teacher itself keeps denoising (Xiang et al., DKDM).

Each slot holds x_t and its own t. ``draw`` picks b slots at random (from a timestep range, for
data-free O2MKD); the engine's single teacher forward on them gives the KD target, and
``after_teacher`` writes one ancestral reverse step x_{t-1} back into the slots; a slot that
was at t = 0 restarts from fresh noise at t = T-1. Initialization ("shuffle denoise") brings
every slot from pure noise down to a uniform random t, either exactly (T-1-t ancestral teacher
steps) or, beyond the paper, with an S-step DDIM jump (``init_steps``). Under a class-conditional
teacher each slot also keeps a class label (the null class with the label dropout), drawn when the slot
starts from noise; the teacher's steps on the slot and the students' inputs use it.

Buffer guidance (``guidance`` W, ``--buffer-guidance``; beyond the paper, whose teachers are unconditional): with
W > 1 every teacher step that moves a slot (training's reverse steps and the shuffle-denoise build, exact or DDIM)
uses the classifier-free guided eps_u + W (eps_c - eps_u), eps_u being the teacher on the null condition (one more
forward per slot step), so the slots follow the guided trajectories that sampling at guidance W visits. The KD
target stays the teacher's conditional prediction on the slot's condition: the students must learn both branches
as the teacher has them, since sampling guides the students' own branches (a guided target would apply guidance
twice). W <= 1 is no guidance: one forward, as before.
Slot timesteps live on the CPU (drawing needs no device sync); images live on the device.

Student-parallel sharding: the slots are split into K contiguous shards, one per student (``hold``);
student k draws only from shard k, every shard is built and advanced by its own random streams, and
a process keeps the images of the shards of the students it trains only (the small CPU arrays of
timesteps, labels and counters stay full-size). So the buffer, like the students, is independent of
how the students are placed on processes, and its memory per process shrinks with the students it holds.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from torch import nn

from o2mcli.devices import autocast
from o2mcli.diffusion.gaussian import DiffusionTerms, check_variance_type, ddim_jump, reverse_step
from o2mcli.distill.sources.base import Batch
from o2mcli.models.parametrization import Epsilon, Parametrization
from o2mcli.models.denoise import predict
from o2mcli.runtime.dist import stream
from o2mcli.runtime.run import progress
from o2mcli.errors import O2MError, OptionError


def cfg_eps(eps_c: torch.Tensor, eps_u: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): eps_u + w (eps_c - eps_u)."""
    return eps_u + w * (eps_c - eps_u)


def buffer_slots(rho: float, T: int, batch_size: int, min_slots: int | None = None) -> int:
    """rho * T * b, at least ``min_slots`` (default b: one step's draws must fit, disjoint)."""
    if not rho > 0:
        raise OptionError("rho", rho, "must be positive (the buffer holds rho*T*b samples)")
    return max(min_slots or batch_size, int(round(rho * T * batch_size)))


def _duration(seconds: float) -> str:
    """``95`` -> ``1 min 35 s``; hours for long builds."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (CUDA: driver's free memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


class DynamicBuffer:
    """The data source of DKDM: no images anywhere, only the teacher."""

    name = "dkdm-buffer"
    needs_teacher = True  # its slots advance by the teacher's reverse steps

    def __init__(self, shape: tuple[int, int, int], slots: int, terms: DiffusionTerms, device: torch.device,
                 variance_type: str = "fixed_small", learned: bool = False, clip: float | None = 1.0,
                 labels: Any = None, guidance: float = 1.0, teacher: nn.Module | None = None,
                 param: Parametrization | None = None) -> None:
        """``labels`` (a ``LabelPlan``, for a class-conditional teacher) gives every slot a class label.
        ``param``: what the teacher's output means (default eps); its reverse steps read the eps it implies.
        ``guidance`` W > 1 guides the teacher's slot-moving steps against the plan's null condition, running
        ``teacher`` (the engine's) once more on it after training's forward (see the module docstring)."""
        self.shape, self.n, self.terms, self.device = tuple(shape), int(slots), terms, device
        self.param = param or Epsilon()
        self.guidance = float(guidance)
        self.guided = self.guidance > 1.0  # at or below 1: no guidance, as diffusers (guidance_scale > 1)
        if self.guided and (labels is None or labels.null_class is None or teacher is None):
            raise OptionError("buffer_guidance", self.guidance, "guidance needs a conditional teacher with a null "
                              "class (or empty prompt) and the teacher to run")
        self.guide_teacher = teacher if self.guided else None
        self.guide_forwards = 0  # training's extra (unconditional) teacher forwards, per sample
        # The teacher's scheduler config decides the reverse step, as diffusers' DDPMScheduler.step would.
        check_variance_type(variance_type, "teacher scheduler config")
        if variance_type == "learned_range" and not learned:
            raise O2MError("teacher scheduler config: variance_type 'learned_range' but the teacher has no variance "
                           "output channels")
        self.variance_type, self.learned, self.clip = variance_type, learned, clip
        self.bytes = self.n * math.prod(self.shape) * 4
        free = available_memory(device)
        if self.bytes > free // 2:
            raise O2MError(f"--rho: the buffer of {self.n} samples needs {self.bytes / 2**30:.2f} GiB, more than half "
                           f"of the {free / 2**30:.2f} GiB free on {device}; lower --rho or --batch-size")
        self.hold(1, [0])  # one shard, held: a buffer on its own; the engine re-shards it per student
        self.t = torch.zeros(self.n, dtype=torch.long)  # on the CPU
        self.steps_done = torch.zeros(self.n, dtype=torch.long)  # reverse steps applied by training, per slot
        self.label_plan = labels
        self.y: torch.Tensor | None = None if labels is None else torch.zeros(self.n, dtype=torch.long)  # on the CPU
        self.init_forwards = 0
        self._report: Callable[[], None] | None = None  # the build's progress reporter, while it runs
        self._taken = torch.zeros(self.n, dtype=torch.bool)  # slots already drawn in this training step

    @property
    def T(self) -> int:
        return self.terms.T

    # 0. Shards ----------------------------------------------------------------------------------------

    shared = False  # each student draws from its own shard: batches are never shared between students

    def hold(self, shards: int, held: list[int]) -> None:
        """Split the slots into ``shards`` contiguous shards (shard k: slots ``[k n / K, (k+1) n / K)``, student k's)
        and keep the images of the ``held`` shards only (allocated on first use)."""
        if self.n < shards:
            raise O2MError(f"DKDM buffer: {self.n} slots cannot make {shards} shards; raise --rho")
        self.bounds = [i * self.n // shards for i in range(shards + 1)]
        self.held = sorted(held)
        local = torch.full((self.n,), -1, dtype=torch.long)
        offset = 0
        for k in self.held:
            a, e = self.bounds[k], self.bounds[k + 1]
            local[a:e] = torch.arange(offset, offset + e - a)
            offset += e - a
        self.local, self.held_slots = local, offset
        self.shard_restarts = [0] * shards
        self._x: torch.Tensor | None = None

    @property
    def x(self) -> torch.Tensor:
        """The held slots' images (local order: the held shards one after another)."""
        if self._x is None:
            self._x = torch.zeros((self.held_slots, *self.shape), device=self.device)
        return self._x

    @x.setter
    def x(self, value: torch.Tensor) -> None:
        self._x = value

    @property
    def restarts(self) -> int:
        """Slots restarted from noise during training (the held shards', or all after ``absorb_counts``)."""
        return sum(self.shard_restarts)

    def _loc(self, slots: torch.Tensor) -> torch.Tensor:
        """Global slot indices -> rows of ``x`` on the device."""
        return self.local[slots].to(self.device)

    def _shard_of(self, slot: int) -> int:
        return next(k for k in range(len(self.bounds) - 1) if slot < self.bounds[k + 1])

    def _shard_generators(self, generator: torch.Generator) -> dict[int, torch.Generator]:
        # One shard: the generator itself; several: a stream per shard, so a shard's build does not depend on
        # which other shards the process holds.
        if len(self.bounds) == 2:
            return {0: generator}
        return {k: stream(generator.initial_seed(), 0x1B1D, k) for k in self.held}

    def describe(self) -> str:
        table = getattr(self.label_plan, "table", None)
        text = "" if table is None else (f", each with one of {self.label_plan.n} prompts (their embeddings: "
                                         f"{table.numel() * 4 / 2**20:.1f} MiB on the CPU)")
        return (f"DKDM buffer: {self.n} samples of {'x'.join(map(str, self.shape))} "
                f"({self.bytes / 2**20:.1f} MiB on {self.device}){text}")

    # 1. Shuffle denoise ---------------------------------------------------------------------------

    def planned_forwards(self, target: torch.Tensor, init_steps: int | None) -> int:
        """Teacher forwards the build will run for slot goals ``target`` (exact: T-1-t each; DDIM: its moves)."""
        start, per_move = self.T - 1, 2 if self.guided else 1  # guided: a conditional and an unconditional forward
        if not init_steps:
            return per_move * int((start - target).sum())
        moves = 0
        for j in range(init_steps):
            t_cur = start - torch.div((start - target) * j, init_steps, rounding_mode="floor")
            t_next = start - torch.div((start - target) * (j + 1), init_steps, rounding_mode="floor")
            moves += int((t_next < t_cur).sum())
        return per_move * moves

    @torch.no_grad()
    def initialize(self, teacher: nn.Module, generator: torch.Generator, init_steps: int | None,
                   batch_size: int, log: Callable[[str], None] | None = None) -> None:
        """Bring each slot from N(0, I) at T-1 down to a uniform random t (exact, or S DDIM steps).

        ``log`` gets the cost before the build (teacher forwards, and the ``--init-steps`` alternative), a time
        estimate measured on the build's first 2 seconds (or first 2%), and a line per 10% of the build when no
        progress bar is shown.
        """
        gens = self._shard_generators(generator)
        target = torch.zeros(self.n, dtype=torch.long)
        for k, g in gens.items():
            a, e = self.bounds[k], self.bounds[k + 1]
            target[a:e] = torch.randint(0, self.T, (e - a,), generator=g)
            if self.label_plan is not None:
                self.y[a:e] = self.label_plan.draw(e - a, g)
        held = torch.cat([torch.arange(self.bounds[k], self.bounds[k + 1]) for k in gens])
        total = self.planned_forwards(target[held], init_steps)
        say = log or (lambda _msg: None)
        how = f"{init_steps}-step DDIM jumps" if init_steps else "exact shuffle denoise"
        if self.guided:
            how += f", guided at W={self.guidance:g}"
        hint = "" if init_steps else (f"; --init-steps 10 would need about {self.planned_forwards(target[held], 10):,} "
                                      "(DDIM jumps, beyond the paper)")
        say(f"{self.describe()}: building by {how} takes {total:,} teacher forwards{hint}")
        bar = progress(total=total, desc="DKDM buffer init", unit="fwd")
        t0, state = time.perf_counter(), {"shown": 0, "first": True, "next_tenth": 1}

        def report() -> None:
            # Called after every teacher forward: the estimate comes from the first seconds of the build
            # (an exact build's first batch alone can be a third of it), then a line per 10% without a bar.
            done = self.init_forwards
            bar.update(done - state["shown"])
            state["shown"] = done
            if done >= total:
                return
            elapsed = time.perf_counter() - t0
            eta = elapsed / max(done, 1) * (total - done)
            if state["first"]:
                if elapsed >= 2.0 or done * 50 >= total:
                    say(f"DKDM buffer: the first {done:,} forwards took {elapsed:.1f} s; the build needs about "
                        f"{_duration(elapsed + eta)} in all")
                    state["first"] = False
            elif bar.disable and done * 10 >= state["next_tenth"] * total:
                say(f"DKDM buffer: {done:,}/{total:,} teacher forwards ({100 * done // total}%), "
                    f"{_duration(elapsed)} elapsed, about {_duration(eta)} left")
            while done * 10 >= state["next_tenth"] * total:
                state["next_tenth"] += 1

        self._report = report
        for k, g in gens.items():
            for lo in range(self.bounds[k], self.bounds[k + 1], batch_size):
                idx = torch.arange(lo, min(lo + batch_size, self.bounds[k + 1]))
                noise = torch.randn((len(idx), *self.shape), generator=g).to(self.device)
                goal = target[idx]
                y = None if self.y is None else self.y[idx]
                if init_steps:
                    x = self._ddim_init(teacher, noise, goal, init_steps, y)
                else:
                    x = self._exact_init(teacher, noise, goal, g, y)
                self.x[self._loc(idx)] = x
        self._report = None
        bar.close()
        self.t[held] = target[held]

    def _eps(self, teacher: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The build's teacher eps (guided when W > 1) and variance output (the conditional branch's)."""
        c = self.shape[0]
        out = self._build_forward(teacher, x, t, None if y is None else self.label_plan.cond(y.to(self.device)))
        pred = out[:, :c]
        if self.guided:  # (guidance is linear in the output, so it mixes in any parametrization)
            pred = cfg_eps(pred, self._build_forward(teacher, x, t, self._null(x.shape[0]))[:, :c], self.guidance)
        eps = self.param.to_eps(self.terms, pred, x, t.to(self.device))
        return eps, (out[:, c:2 * c] if self.learned else None)

    def _build_forward(self, teacher: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None
                       ) -> torch.Tensor:
        with autocast(self.device):
            out = predict(teacher, x, t.to(self.device), cond).float()
        self.init_forwards += x.shape[0]
        if self._report is not None:
            self._report()
        return out

    def _null(self, n: int) -> torch.Tensor:
        """The null condition (null class, or the empty prompt's embedding) for ``n`` slots."""
        idx = torch.full((n,), int(self.label_plan.null_class), dtype=torch.long, device=self.device)
        return self.label_plan.cond(idx)

    def step_eps(self, batch: Batch, pred_c: torch.Tensor) -> torch.Tensor:
        """The eps that moves the drawn slots: implied by the teacher's conditional output ``pred_c`` (the engine's
        forward, also the KD target), guided against one unconditional forward when W > 1."""
        if self.guided:
            with autocast(self.device):
                out = predict(self.guide_teacher, batch.x_t, batch.t, self._null(batch.x_t.shape[0])).float()
            self.guide_forwards += batch.x_t.shape[0]
            pred_c = cfg_eps(pred_c, out[:, :self.shape[0]], self.guidance)
        return self.param.to_eps(self.terms, pred_c, batch.x_t.float(), batch.t)

    def _exact_init(self, teacher: nn.Module, x: torch.Tensor, goal: torch.Tensor,
                    generator: torch.Generator, y: torch.Tensor | None) -> torch.Tensor:
        # Step every slot whose goal is below the current t; all slots share the clock s = T-1 ... 1.
        for s in range(self.T - 1, int(goal.min()), -1):
            active = (goal < s).nonzero().flatten()
            if active.numel() == 0:
                continue
            a = active.to(self.device)
            t = torch.full((active.numel(),), s, dtype=torch.long)
            eps, v = self._eps(teacher, x[a], t, None if y is None else y[active])
            z = torch.randn((active.numel(), *self.shape), generator=generator).to(self.device)
            x[a] = reverse_step(self.terms, x[a], t.to(self.device), eps, v, z, self.variance_type, self.clip)
        return x

    def _ddim_init(self, teacher: nn.Module, x: torch.Tensor, goal: torch.Tensor, steps: int,
                   y: torch.Tensor | None) -> torch.Tensor:
        start = self.T - 1
        for j in range(steps):
            t_cur = start - torch.div((start - goal) * j, steps, rounding_mode="floor")
            t_next = start - torch.div((start - goal) * (j + 1), steps, rounding_mode="floor")
            move = (t_next < t_cur).nonzero().flatten()
            if move.numel() == 0:
                continue
            m = move.to(self.device)
            eps, _ = self._eps(teacher, x[m], t_cur[move], None if y is None else y[move])
            x[m] = ddim_jump(self.terms, x[m], t_cur[move].to(self.device), t_next[move].to(self.device), eps,
                             self.clip)
        return x

    # 2. Training-time use ---------------------------------------------------------------------------

    def begin_step(self) -> None:
        """A new training step: every slot may be drawn again (once)."""
        self._taken.zero_()

    def draw(self, lo: int, hi: int, n: int, generator: torch.Generator, student: int = 0) -> Batch:
        """``n`` distinct slots of ``student``'s shard at random among those with t in [lo, hi) (all the shard's
        slots if there are fewer).

        Slots already drawn in this step are excluded, so the draws of one step are disjoint and every
        slot advances exactly one reverse step per use.
        """
        a, e = self.bounds[student], self.bounds[student + 1]
        taken = self._taken[a:e]
        free = ~taken
        if lo == 0 and hi >= self.T and not bool(taken.any()):
            slots = a + torch.randperm(e - a, generator=generator)[:n]
        else:
            t = self.t[a:e]
            mask = free & (t >= lo) & (t < hi)
            if not bool(mask.any()):
                mask = free  # an empty range borrows from all free slots
            have = int(mask.sum())
            if have == 0:
                raise O2MError(f"DKDM buffer: all {e - a} slots of shard {student} were already drawn in this step; "
                               "raise --rho")
            slots = a + torch.multinomial(mask.float(), min(n, have), replacement=False, generator=generator)
        self._taken[slots] = True
        t_host = self.t[slots].clone()
        cond = None if self.y is None else self.label_plan.cond(self.y[slots].to(self.device))
        return Batch(x_t=self.x[self._loc(slots)], t=t_host.to(self.device), slots=slots, t_host=t_host,
                     cond=cond)

    @torch.no_grad()
    def after_teacher(self, batch: Batch, teacher_out: torch.Tensor, generator: torch.Generator) -> None:
        """Write the teacher's reverse step back; slots that were at t = 0 restart from noise at T-1.

        The new t is the t the teacher saw (the batch's), not a re-read of the buffer.
        """
        c = self.shape[0]
        slots = batch.slots
        g = generator
        z = torch.randn((slots.numel(), *self.shape), generator=g).to(self.device)
        eps = self.step_eps(batch, teacher_out[:, :c].float())
        v = teacher_out[:, c:2 * c].float() if self.learned else None  # guided or not: the conditional branch's
        x_prev = reverse_step(self.terms, batch.x_t.float(), batch.t, eps, v, z, self.variance_type, self.clip)
        t = batch.t_host
        done = t == 0
        fresh = torch.randn((int(done.sum()), *self.shape), generator=g).to(self.device) if bool(done.any()) else None
        self.x[self._loc(slots)] = x_prev
        if fresh is not None:
            self.x[self._loc(slots[done])] = fresh
            self.shard_restarts[self._shard_of(int(slots[0]))] += int(done.sum())
            if self.y is not None:  # a restarted slot is a new sample: a new label too
                self.y[slots[done]] = self.label_plan.draw(int(done.sum()), g)
        self.t[slots] = torch.where(done, torch.full_like(t, self.T - 1), t - 1)
        self.steps_done[slots] += 1

    # 3. Checkpoint state -------------------------------------------------------------------------------

    def shard_state(self, k: int) -> dict[str, torch.Tensor]:
        """Held shard k's state (its slots' images, timesteps, counters and labels): a checkpoint's part."""
        a, e = self.bounds[k], self.bounds[k + 1]
        out = {"x": self.x[self._loc(torch.arange(a, e))].detach().cpu(), "t": self.t[a:e].clone(),
               "steps_done": self.steps_done[a:e].clone(), "restarts": torch.tensor(self.shard_restarts[k])}
        if self.y is not None:
            out["y"] = self.y[a:e].clone()
        return out

    def load_shard_state(self, k: int, tensors: dict[str, Any]) -> None:
        """Inverse of :meth:`shard_state` for held shard k; refuses a shard of another size."""
        a, e = self.bounds[k], self.bounds[k + 1]
        x = tensors.get("x")
        if x is None or tuple(x.shape) != (e - a, *self.shape):
            got = "none" if x is None else "x".join(map(str, x.shape))
            what = "" if len(self.bounds) == 2 else f" shard {k}"
            raise O2MError(f"checkpoint buffer{what} is {got}, this run's is {e - a}x{'x'.join(map(str, self.shape))} "
                           "(--rho, --batch-size, -k or the teacher changed); resume with the same settings")
        self.x[self._loc(torch.arange(a, e))] = x.to(self.device)
        self.t[a:e] = tensors["t"]
        self.steps_done[a:e] = tensors["steps_done"]
        self.shard_restarts[k] = int(tensors["restarts"])
        if self.y is not None:
            y = tensors.get("y")
            if y is None or tuple(y.shape) != (e - a,):
                raise O2MError("checkpoint buffer has no slot labels, this run's teacher is class-conditional; resume "
                               "with the same teacher")
            self.y[a:e] = y

    def absorb_counts(self, counts: dict[int, int]) -> None:
        """Other processes' shards' restart counts (rank 0, for the summary)."""
        for k, n in counts.items():
            self.shard_restarts[k] = int(n)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The whole buffer's state (a buffer holding every shard; the engine checkpoints shard by shard)."""
        parts = [self.shard_state(k) for k in range(len(self.bounds) - 1)]
        out = {n: torch.cat([p[n] for p in parts]) for n in parts[0] if n != "restarts"}
        out["restarts"] = torch.tensor(self.restarts)
        return out

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        """Inverse of :meth:`state_tensors` (one shard)."""
        if len(self.bounds) != 2:
            raise O2MError("a sharded buffer loads shard by shard")
        self.load_shard_state(0, tensors)
