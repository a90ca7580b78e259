"""First-order Taylor importance |w * dL/dw| from denoising losses on real images (Diff-Pruning, Fang et al. 2023).

The gradients come from the teacher's own training objective, ||eps - eps_theta(x_t, t)||^2
(Ho et al. 2020, eq. 14), at timesteps drawn uniformly, accumulated over a few batches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from o2mcli.diffusion.gaussian import DiffusionTerms, q_sample
from o2mcli.errors import O2MError
from o2mcli.models.denoise import predict
from o2mcli.models.parametrization import Parametrization


def accumulate_denoising_grads(unet: nn.Module, images: torch.Tensor, terms: DiffusionTerms, *, batches: int,
                               batch_size: int, seed: int, labels: torch.Tensor | None = None,
                               param: Parametrization | None = None) -> float:
    """Fill ``p.grad`` with the summed gradient of the denoising MSE (against ``param``'s target: the noise for an
    eps model, v for a v model) over ``batches`` batches; returns the mean loss.

    ``labels`` (a class-conditional teacher): each image's class goes with it, so the conditional branch the
    model serves is what ranks the channels."""
    g = torch.Generator().manual_seed(seed)
    device = next(unet.parameters()).device
    unet.zero_grad(set_to_none=True)
    c = images.shape[1]
    total = 0.0
    for _ in range(batches):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x0 = images[idx].to(device)
        t = torch.randint(0, terms.T, (batch_size,), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        x_t = q_sample(terms, x0, t, noise)
        cond = None if labels is None else labels[idx].to(device)
        pred = predict(unet, x_t, t, cond)[:, :c]
        loss = F.mse_loss(pred, noise if param is None else param.target(terms, x0, noise, t))
        loss.backward()
        total += float(loss.detach())
    return total / batches


def taylor(*, data: bool = False, **_: Any) -> tp.importance.Importance:
    """Group Taylor importance; the caller must have run :func:`accumulate_denoising_grads` first."""
    if not data:
        raise O2MError("--importance taylor needs --data: the gradients come from denoising losses on real images "
                       "(use magnitude or random for a data-free prune)")
    return tp.importance.GroupTaylorImportance()
