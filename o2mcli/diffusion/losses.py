"""The diffusion training loss, once, for training and for distillation on data (it is not a KD loss)."""

from __future__ import annotations

from typing import Optional

import torch

from o2mcli.diffusion.gaussian import DiffusionTerms, mean_flat, vlb_loss


def hybrid_loss(terms: DiffusionTerms, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor,
                target: torch.Tensor, eps: torch.Tensor, v: Optional[torch.Tensor] = None,
                vlb_weight: float = 0.001) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_simple = ||target - pred||^2 (Ho et al. Eq. 14 for eps; Salimans & Ho's v loss for v), + lambda T L_t for a
    learned variance.

    ``pred`` is the model's output and ``target`` its parametrization's target; ``eps`` the eps ``pred`` implies.
    The vlb term (improved DDPM Eq. 16, L_vlb estimated by T L_t) trains only the variance: the mean is
    stop-gradient. Returns (loss, L_simple, L_t averaged over the batch; zero without ``v`` or weight).
    """
    mse = mean_flat((pred - target) ** 2).mean()
    if v is None or not vlb_weight > 0:
        return mse, mse, torch.zeros((), device=pred.device)
    vlb = vlb_loss(terms, x0, x_t, t, eps.detach(), v).mean()
    return mse + vlb_weight * terms.T * vlb, mse, vlb
