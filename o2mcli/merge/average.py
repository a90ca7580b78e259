"""Weighted parameter average (model soup, Wortsman et al. 2022): theta = sum_k w_k theta_k / sum_k w_k."""

from __future__ import annotations

import math

import torch

# Weights up to this magnitude keep every w_k theta_k and their sum finite in float64 (float32 weights are below
# 3.4e38); larger ones are first divided by the largest |w_k|, which leaves the average unchanged.
SAFE_WEIGHT = 1e200


def weighted_average(base: dict[str, torch.Tensor] | None, models: list[dict[str, torch.Tensor]],
                     weights: list[float], lam: float | None = None) -> dict[str, torch.Tensor]:
    """The ``weights``-weighted mean of ``models`` (``base`` and ``lam`` are not used). The mean does not depend on
    the weights' scale, so weights too large for float64 sums (``1e308,1e308``) are rescaled, not overflowed."""
    peak = max(abs(float(w)) for w in weights)
    if peak > SAFE_WEIGHT or not math.isfinite(float(sum(weights))):
        weights = [float(w) / peak for w in weights]
    total = float(sum(weights))
    out = {}
    for key, first in models[0].items():
        if not first.dtype.is_floating_point:
            out[key] = first.clone()
            continue
        out[key] = (sum(w * m[key].double() for w, m in zip(weights, models)) / total).to(first.dtype)
    return out
