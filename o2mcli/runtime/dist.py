"""Distributed state read from torchrun's environment (nanoGPT style): one ``is_main`` flag, the placement.

Under ``torchrun --nproc_per_node W`` the K students are spread over the W ranks (student-parallel,
:class:`Placement`): each rank trains only its own students, a student with several ranks is trained
data-parallel by its group (DDP within the group only), and rank 0 gathers every student's state and
alone writes checkpoints and manifests. Randomness comes from per-step, per-student streams
(:func:`stream`) that do not depend on the placement. Without torchrun this is a world of one and
nothing is initialized.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from o2mcli.errors import O2MError


@dataclass(frozen=True)
class DistState:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_type: str) -> DistState:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistState()
    state = DistState(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return state


def local_device(state: DistState, device: torch.device) -> torch.device:
    """Each rank takes its own GPU (LOCAL_RANK); CPU ranks share the CPU."""
    if device.type == "cuda" and state.enabled:
        torch.cuda.set_device(state.local_rank)
        return torch.device("cuda", state.local_rank)
    return device


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier(state: DistState) -> None:
    if state.enabled:
        dist.barrier()


def broadcast_flag(flag: bool, state: DistState) -> bool:
    """True on every rank if ``flag`` is true on any (a NaN on one rank stops all)."""
    if not state.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def agree_path(path: Path, state: DistState) -> Path:
    """Rank 0's ``path`` on every rank: a default output name is chosen (and reserved) by rank 0 alone."""
    if not state.enabled:
        return path
    dev = _comm_device()
    data = os.fsencode(str(path)) if state.is_main else b""
    n = torch.tensor([len(data)], dtype=torch.long, device=dev)
    dist.broadcast(n, src=0)
    buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=dev)
    if state.is_main:
        buf.copy_(torch.tensor(list(data), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return Path(os.fsdecode(bytes(buf.cpu().tolist())))


def shutdown(state: DistState) -> None:
    if state.enabled and dist.is_initialized():
        dist.destroy_process_group()


# Student-parallel placement ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Which ranks train which of the K students (student-parallel distillation).

    ``W <= K``: rank r holds the students k with ``k % W == r`` (round-robin), each on that rank alone.
    ``W > K`` (``W % K == 0``): student k is trained data-parallel by the G = W/K contiguous ranks
    ``k*G ... (k+1)*G - 1`` (contiguous, so a group stays on one machine when W/K divides the ranks per node),
    each taking its slice of the student's batch. ``groups[k]`` is the process group of student k (None for a
    group of one rank, which needs no communication).
    """

    rank: int
    world: int
    owners: tuple[tuple[int, ...], ...]
    groups: tuple[Any, ...] = ()

    @property
    def K(self) -> int:
        return len(self.owners)

    def held(self) -> list[int]:
        """The students this rank trains, in index order."""
        return [k for k, ranks in enumerate(self.owners) if self.rank in ranks]

    def group_size(self, k: int) -> int:
        return len(self.owners[k])

    def position(self, k: int) -> int:
        """This rank's place in student k's group (its slice of the batch)."""
        return self.owners[k].index(self.rank)

    def leads(self, k: int) -> bool:
        """Whether this rank contributes student k's state to checkpoints (the group's first rank)."""
        return self.owners[k][0] == self.rank

    def group(self, k: int) -> Any:
        return self.groups[k] if self.groups else None


def place_students(K: int, state: DistState) -> Placement:
    """The placement of K students on this run's W processes (see :class:`Placement`); creates the groups."""
    W = state.world
    if W <= K:
        owners = tuple((k % W,) for k in range(K))
    else:
        if W % K:
            raise O2MError(f"{W} processes for {K} students: with more processes than students the number of "
                           f"processes must be a multiple of K (each student gets W/K ranks); use "
                           f"--nproc_per_node {W - W % K} or {W + K - W % K}, or -k {W}")
        G = W // K
        owners = tuple(tuple(range(k * G, (k + 1) * G)) for k in range(K))
    groups: tuple[Any, ...] = ()
    if state.enabled and any(len(o) > 1 for o in owners):
        # Every rank must create every group, in the same order (torch.distributed.new_group's contract).
        groups = tuple(dist.new_group(list(o)) if len(o) > 1 else None for o in owners)
    return Placement(rank=state.rank, world=W, owners=owners, groups=groups)


def all_reduce_mean_group(tensors: list[torch.Tensor], group: Any, size: int) -> None:
    """Average ``tensors`` in place over the ranks of ``group`` (nothing to do for a group of one)."""
    if group is None or size <= 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        t.div_(size)


def all_gather_group(t: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """The group ranks' same-shape tensors concatenated along dim 0, in group order."""
    if group is None or size <= 1:
        return t
    dev = _comm_device()
    out = [torch.empty_like(t, device=dev) for _ in range(size)]
    dist.all_gather(out, t.contiguous().to(dev), group=group)
    return torch.cat(out).to(t.device)


def gather_objects(obj: Any, state: DistState) -> list[Any] | None:
    """Every rank's picklable ``obj`` on rank 0 (in rank order); None on the other ranks."""
    if not state.enabled:
        return [obj]
    out = [None] * state.world if state.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj: Any, state: DistState) -> list[Any]:
    """Every rank's picklable ``obj`` on every rank (in rank order)."""
    if not state.enabled:
        return [obj]
    out: list[Any] = [None] * state.world
    dist.all_gather_object(out, obj)
    return out


def sum_int(value: int, state: DistState) -> int:
    """The sum of an integer over all ranks."""
    if not state.enabled:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def stream_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (SplitMix64 rounds): the per-step, per-student random streams."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for p in parts:
        z = (h ^ (int(p) & mask)) + 0x9E3779B97F4A7C15 & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        h = z ^ (z >> 31)
    return h & ((1 << 63) - 1)


def stream(*parts: int) -> torch.Generator:
    """A CPU generator seeded by :func:`stream_seed` of ``parts``."""
    return torch.Generator().manual_seed(stream_seed(*parts))
