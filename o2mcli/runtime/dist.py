"""Distributed state read from torchrun's environment (nanoGPT style): one ``is_main`` flag, per-rank seeds.

Under ``torchrun --nproc_per_node N`` every rank trains all students on its own batches
(DDP averages the gradients); rank 0 alone writes checkpoints and manifests. Without torchrun
this is a world of one and nothing is initialized.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def all_reduce_mean(tensors: list[torch.Tensor], state: DistState) -> None:
    """Average ``tensors`` across ranks in place (for the few parameters DDP does not own)."""
    if not state.enabled:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(state.world)


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


def gather_tensors(t: torch.Tensor, state: DistState) -> list[torch.Tensor]:
    """Every rank's copy of a same-shape CPU tensor (RNG states for the checkpoint)."""
    if not state.enabled:
        return [t]
    dev = _comm_device()
    out = [torch.empty_like(t, device=dev) for _ in range(state.world)]
    dist.all_gather(out, t.contiguous().to(dev))
    return [o.cpu() for o in out]


def shutdown(state: DistState) -> None:
    if state.enabled and dist.is_initialized():
        dist.destroy_process_group()
