"""The plain diffusion loss on real data, weighted against KD by alpha (O2MKD: L = L_diff + alpha L_KD).

L_diff = ||eps - eps_S(x_t, t)||^2 (Ho et al. Eq. 14); a learned-variance student adds the
improved-DDPM vlb term (stop-gradient on the mean), L_hybrid = L_simple + lambda T L_t.
"""

from __future__ import annotations

import torch

from o2mcli.diffusion.gaussian import DiffusionTerms, mean_flat, vlb_loss
from o2mcli.distill.losses.base import Outputs
from o2mcli.distill.sources.base import Batch


def diffusion_loss(student: Outputs, batch: Batch, terms: DiffusionTerms, vlb_weight: float = 0.001) -> torch.Tensor:
    """L_simple (+ lambda T L_vlb for a learned-variance student) against the true noise of ``batch``."""
    loss = mean_flat((student.eps - batch.noise) ** 2).mean()
    if student.v is not None and vlb_weight > 0:
        loss = loss + vlb_weight * terms.T * vlb_loss(terms, batch.x0, batch.x_t, batch.t, student.eps.detach(),
                                                      student.v).mean()
    return loss
