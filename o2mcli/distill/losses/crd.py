"""Contrastive representation distillation (Tian et al. 2020), InfoNCE form with a memory bank of negatives.

Student and teacher features of one block (the mid block by default: the bottleneck) are pooled,
projected by a learned head per side to a shared embedding space and L2-normalized. The student
embedding of a sample must pick out the teacher embedding of the same sample among the other
samples of the batch and a queue of earlier teacher embeddings (the memory bank):
L = CE(z_s . [z_t ; bank]^T / tau, positive).
Both heads are trained with the student; the teacher network gets no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from o2mcli.distill.losses.base import KDLoss, Outputs


class ContrastiveRD(KDLoss):
    """InfoNCE between projected student and teacher block features, with a queue of negatives."""

    name = "crd"
    needs_features = True

    def __init__(self, student_channels: dict[str, int], teacher_channels: dict[str, int],
                 generator: torch.Generator | None = None, dim: int = 128, bank: int = 1024,
                 tau: float = 0.07) -> None:
        super().__init__(student_channels, teacher_channels, generator)
        point = "mid_block" if "mid_block" in student_channels else self.points[len(self.points) // 2]
        self.points = [point]
        g = generator or torch.Generator().manual_seed(0)
        self.s_head = nn.Linear(student_channels[point], dim)
        self.t_head = nn.Linear(teacher_channels[point], dim)
        for lin in (self.s_head, self.t_head):
            bound = lin.in_features ** -0.5
            with torch.no_grad():
                lin.weight.uniform_(-bound, bound, generator=g)
                lin.bias.zero_()
        self.tau = tau
        self.register_buffer("bank", F.normalize(torch.randn(bank, dim, generator=g), dim=1))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        p = self.points[0]
        zs = F.normalize(self.s_head(student.features[p].float().mean((2, 3))), dim=1)
        zt = F.normalize(self.t_head(teacher.features[p].float().mean((2, 3))), dim=1)
        bank = self.bank.clone()  # the queue is updated below, before backward reads it
        logits = torch.cat([zs @ zt.t(), zs @ bank.t()], dim=1) / self.tau
        loss = F.cross_entropy(logits, torch.arange(zs.shape[0], device=zs.device))
        if self.training:
            self._enqueue(zt.detach())
        return loss

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor) -> None:
        n, size = z.shape[0], self.bank.shape[0]
        idx = (self.bank_ptr + torch.arange(n, device=z.device)) % size  # no host sync: pointer stays on device
        self.bank[idx] = z[-size:] if n > size else z
        self.bank_ptr.copy_((self.bank_ptr + n) % size)
