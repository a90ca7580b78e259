"""Run one ``o2m`` command as a DDP world of one process, for ``test_cuda.py`` (not a test module itself).

    python -m torch.distributed.run --nproc_per_node 1 tests/gpu/ddp_one_rank.py distill TEMPLATE ... -o OUT

With WORLD_SIZE 1 o2m stays single-process (``runtime.dist.init_distributed`` returns a world of one and
nothing is wrapped), so a single GPU never exercises DDP. This launcher joins the process group itself
(nccl on CUDA, gloo on CPU, from torchrun's environment) and hands the stage a ``DistState`` whose
``enabled`` is true: the students are DDP-wrapped and every collective o2m uses (all_reduce of the KD
heads' gradients and of the NaN flag, all_gather of the RNG states, barriers) runs on that backend.
It prints ``ddp-check:`` lines that the test reads.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

import o2mcli.distill.engine as engine
import o2mcli.runtime.dist as rdist


@dataclass(frozen=True)
class OneRankDDP(rdist.DistState):
    """A world of one that still takes the distributed code paths."""

    @property
    def enabled(self) -> bool:
        return True


def _init(device_type: str) -> rdist.DistState:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    print(f"ddp-check: backend {dist.get_backend()}, world {dist.get_world_size()}", flush=True)
    return OneRankDDP(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


_student_init = engine.Student.__init__


def _student(self, *args, **kwargs) -> None:
    _student_init(self, *args, **kwargs)
    print(f"ddp-check: student {self.k} is {type(self.model).__name__}", flush=True)


def main() -> None:
    rdist.init_distributed = _init
    engine.Student.__init__ = _student
    from o2mcli.cli import main as o2m

    sys.argv = ["o2m", *sys.argv[1:]]
    o2m()


if __name__ == "__main__":
    main()
