"""Real images: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at timesteps of the plan (Ho et al. Eq. 4)."""

from __future__ import annotations

from typing import Callable

import torch

from o2mcli.diffusion.gaussian import DiffusionTerms, q_sample
from o2mcli.distill.plan import draw_timesteps
from o2mcli.distill.sources.base import Batch


class ImageSource:
    """Batches of real images noised to timesteps drawn on ``[lo, hi)``; all randomness from ``generator``."""

    name = "images"
    needs_teacher = False
    shared = True  # students that drew the same range share one batch

    def __init__(self, images: torch.Tensor, terms: DiffusionTerms, device: torch.device,
                 labels: torch.Tensor | None = None, null_class: int | None = None, label_dropout: float = 0.0,
                 embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """``labels`` make the batches conditional; a label is replaced by ``null_class`` with probability
        ``label_dropout`` (classifier-free guidance trains both branches; Ho & Salimans 2022). ``embed`` maps label
        indices to what the model takes (captions' text embeddings); labels are passed as they are without it."""
        self.images = images.to(device)  # [-1, 1], (N, C, H, W)
        self.terms = terms
        self.device = device
        self.labels = None if labels is None else labels.to(torch.int64)
        self.null_class, self.label_dropout = null_class, float(label_dropout)
        self.embed = embed

    def begin_step(self) -> None:
        """Independent draws: nothing to reset."""

    def draw(self, lo: int, hi: int, n: int, generator: torch.Generator, student: int = 0) -> Batch:
        """``n`` images noised to timesteps on [lo, hi); ``student`` is ignored (students on a range share it)."""
        idx = torch.randint(0, self.images.shape[0], (n,), generator=generator)
        t = draw_timesteps(lo, hi, n, generator)
        noise = torch.randn((n, *self.images.shape[1:]), generator=generator)
        x0 = self.images[idx.to(self.device)]
        cond = None
        if self.labels is not None:  # (unconditional draws take nothing more from the generator)
            cond = self.labels[idx].clone()
            if self.label_dropout > 0:
                cond[torch.rand(n, generator=generator) < self.label_dropout] = self.null_class
            cond = cond.to(self.device) if self.embed is None else self.embed(cond).to(self.device)
        t, noise = t.to(self.device), noise.to(self.device)
        return Batch(x_t=q_sample(self.terms, x0, t, noise), t=t, noise=noise, x0=x0, cond=cond)

    def after_teacher(self, batch: Batch, teacher_out: torch.Tensor, generator: torch.Generator) -> None:
        """Real data does not depend on the teacher."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Stateless."""
