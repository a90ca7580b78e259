"""Weighted parameter average (model soup, Wortsman et al. 2022): theta = sum_k w_k theta_k / sum_k w_k."""

from __future__ import annotations

import torch


def weighted_average(base: dict[str, torch.Tensor] | None, models: list[dict[str, torch.Tensor]],
                     weights: list[float], lam: float | None = None) -> dict[str, torch.Tensor]:
    """The ``weights``-weighted mean of ``models`` (``base`` and ``lam`` are not used)."""
    total = float(sum(weights))
    out = {}
    for key, first in models[0].items():
        if not first.dtype.is_floating_point:
            out[key] = first.clone()
            continue
        out[key] = (sum(w * m[key].double() for w, m in zip(weights, models)) / total).to(first.dtype)
    return out
