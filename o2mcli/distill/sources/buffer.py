"""The DKDM dynamic buffer: rho*T*b noisy samples the teacher itself keeps denoising (Xiang et al., DKDM).

Each slot holds x_t and its own t. ``draw`` picks b slots at random (from a timestep range, for
data-free O2MKD); the engine's single teacher forward on them gives the KD target, and
``after_teacher`` writes one ancestral reverse step x_{t-1} back into the slots; a slot that
was at t = 0 restarts from fresh noise at t = T-1. Initialization ("shuffle denoise") brings
every slot from pure noise down to a uniform random t, either exactly (T-1-t ancestral teacher
steps) or, beyond the paper, with an S-step DDIM jump (``init_steps``). Under a class-conditional
teacher each slot also keeps a class label (the null class with the label dropout), drawn when the slot
starts from noise; the teacher's steps on the slot and the students' inputs use it.
Slot timesteps live on the CPU (drawing needs no device sync); images live on the device.
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
from o2mcli.models.denoise import predict
from o2mcli.runtime.run import progress
from o2mcli.errors import O2MError, OptionError


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
                 labels: Any = None) -> None:
        """``labels`` (a ``LabelPlan``, for a class-conditional teacher) gives every slot a class label."""
        self.shape, self.n, self.terms, self.device = tuple(shape), int(slots), terms, device
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
        self.x = torch.zeros((self.n, *self.shape), device=device)
        self.t = torch.zeros(self.n, dtype=torch.long)  # on the CPU
        self.steps_done = torch.zeros(self.n, dtype=torch.long)  # reverse steps applied by training, per slot
        self.label_plan = labels
        self.y: torch.Tensor | None = None if labels is None else torch.zeros(self.n, dtype=torch.long)  # on the CPU
        self.restarts = 0
        self.init_forwards = 0
        self._report: Callable[[], None] | None = None  # the build's progress reporter, while it runs
        self._taken = torch.zeros(self.n, dtype=torch.bool)  # slots already drawn in this training step

    @property
    def T(self) -> int:
        return self.terms.T

    def describe(self) -> str:
        table = getattr(self.label_plan, "table", None)
        text = "" if table is None else (f", each with one of {self.label_plan.n} prompts (their embeddings: "
                                         f"{table.numel() * 4 / 2**20:.1f} MiB on the CPU)")
        return (f"DKDM buffer: {self.n} samples of {'x'.join(map(str, self.shape))} "
                f"({self.bytes / 2**20:.1f} MiB on {self.device}){text}")

    # 1. Shuffle denoise ---------------------------------------------------------------------------

    def planned_forwards(self, target: torch.Tensor, init_steps: int | None) -> int:
        """Teacher forwards the build will run for slot goals ``target`` (exact: T-1-t each; DDIM: its moves)."""
        start = self.T - 1
        if not init_steps:
            return int((start - target).sum())
        moves = 0
        for j in range(init_steps):
            t_cur = start - torch.div((start - target) * j, init_steps, rounding_mode="floor")
            t_next = start - torch.div((start - target) * (j + 1), init_steps, rounding_mode="floor")
            moves += int((t_next < t_cur).sum())
        return moves

    @torch.no_grad()
    def initialize(self, teacher: nn.Module, generator: torch.Generator, init_steps: int | None,
                   batch_size: int, log: Callable[[str], None] | None = None) -> None:
        """Bring each slot from N(0, I) at T-1 down to a uniform random t (exact, or S DDIM steps).

        ``log`` gets the cost before the build (teacher forwards, and the ``--init-steps`` alternative), a time
        estimate measured on the build's first 2 seconds (or first 2%), and a line per 10% of the build when no
        progress bar is shown.
        """
        T = self.T
        target = torch.randint(0, T, (self.n,), generator=generator)
        if self.label_plan is not None:
            self.y = self.label_plan.draw(self.n, generator)
        total = self.planned_forwards(target, init_steps)
        say = log or (lambda _msg: None)
        how = f"{init_steps}-step DDIM jumps" if init_steps else "exact shuffle denoise"
        hint = "" if init_steps else (f"; --init-steps 10 would need about {self.planned_forwards(target, 10):,} "
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
        for lo in range(0, self.n, batch_size):
            idx = torch.arange(lo, min(lo + batch_size, self.n))
            noise = torch.randn((len(idx), *self.shape), generator=generator).to(self.device)
            goal = target[idx]
            y = None if self.y is None else self.y[idx]
            if init_steps:
                x = self._ddim_init(teacher, noise, goal, init_steps, y)
            else:
                x = self._exact_init(teacher, noise, goal, generator, y)
            self.x[idx.to(self.device)] = x
        self._report = None
        bar.close()
        self.t = target.clone()

    def _eps(self, teacher: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = self.shape[0]
        with autocast(self.device):
            cond = None if y is None else self.label_plan.cond(y.to(self.device))
            out = predict(teacher, x, t.to(self.device), cond).float()
        self.init_forwards += x.shape[0]
        if self._report is not None:
            self._report()
        return out[:, :c], (out[:, c:2 * c] if self.learned else None)

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

    def draw(self, lo: int, hi: int, n: int, generator: torch.Generator) -> Batch:
        """``n`` distinct slots at random among those with t in [lo, hi) (all slots if there are fewer).

        Slots already drawn in this step are excluded, so the draws of one step are disjoint and every
        slot advances exactly one reverse step per use.
        """
        free = ~self._taken
        if lo == 0 and hi >= self.T and not bool(self._taken.any()):
            slots = torch.randperm(self.n, generator=generator)[:n]
        else:
            mask = free & (self.t >= lo) & (self.t < hi)
            if not bool(mask.any()):
                mask = free  # an empty range borrows from all free slots
            have = int(mask.sum())
            if have == 0:
                raise O2MError(f"DKDM buffer: all {self.n} slots were already drawn in this step; raise --rho")
            slots = torch.multinomial(mask.float(), min(n, have), replacement=False, generator=generator)
        self._taken[slots] = True
        t_host = self.t[slots].clone()
        cond = None if self.y is None else self.label_plan.cond(self.y[slots].to(self.device))
        return Batch(x_t=self.x[slots.to(self.device)], t=t_host.to(self.device), slots=slots, t_host=t_host,
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
        eps = teacher_out[:, :c].float()
        v = teacher_out[:, c:2 * c].float() if self.learned else None
        x_prev = reverse_step(self.terms, batch.x_t.float(), batch.t, eps, v, z, self.variance_type, self.clip)
        t = batch.t_host
        done = t == 0
        fresh = torch.randn((int(done.sum()), *self.shape), generator=g).to(self.device) if bool(done.any()) else None
        d = slots.to(self.device)
        self.x[d] = x_prev
        if fresh is not None:
            self.x[slots[done].to(self.device)] = fresh
            self.restarts += int(done.sum())
            if self.y is not None:  # a restarted slot is a new sample: a new label too
                self.y[slots[done]] = self.label_plan.draw(int(done.sum()), g)
        self.t[slots] = torch.where(done, torch.full_like(t, self.T - 1), t - 1)
        self.steps_done[slots] += 1

    # 3. Checkpoint state -------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"x": self.x.detach().cpu(), "t": self.t.clone(), "steps_done": self.steps_done.clone(),
               "restarts": torch.tensor(self.restarts)}
        if self.y is not None:
            out["y"] = self.y.clone()
        return out

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        x = tensors.get("x")
        if x is None or tuple(x.shape) != (self.n, *self.shape):
            got = "none" if x is None else "x".join(map(str, x.shape))
            raise O2MError(f"checkpoint buffer is {got}, this run's is {self.n}x{'x'.join(map(str, self.shape))} "
                           "(--rho, --batch-size or the teacher changed); resume with the same settings")
        self.x = x.to(self.device)
        self.t = tensors["t"].clone()
        self.steps_done = tensors["steps_done"].clone()
        self.restarts = int(tensors["restarts"])
        if self.y is not None:
            y = tensors.get("y")
            if y is None or tuple(y.shape) != (self.n,):
                raise O2MError("checkpoint buffer has no slot labels, this run's teacher is class-conditional; resume "
                               "with the same teacher")
            self.y = y.clone()
