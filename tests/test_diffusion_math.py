"""Gaussian terms against closed forms."""

from __future__ import annotations

import math

import torch
from torch.distributions import Normal, kl_divergence

from o2mcli.diffusion.gaussian import (DiffusionTerms, discretized_gaussian_log_likelihood, learned_log_variance,
                                       normal_kl, vlb_loss)


def _terms() -> DiffusionTerms:
    return DiffusionTerms(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


def test_normal_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    lv1, lv2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), ref, atol=1e-5)
    assert torch.allclose(normal_kl(m1, lv1, m1, lv1), torch.zeros(50), atol=1e-7)


def test_discretized_likelihood_is_a_distribution_over_256_bins() -> None:
    bins = torch.linspace(-1, 1, 256)
    mean, log_scale = torch.full_like(bins, 0.1), torch.full_like(bins, math.log(0.3))
    total = discretized_gaussian_log_likelihood(bins, mean, log_scale).exp().sum()
    assert abs(float(total) - 1.0) < 1e-3


def test_learned_variance_interpolates_between_bounds() -> None:
    terms, t = _terms(), torch.tensor([10, 500])
    hi = learned_log_variance(terms, torch.ones(2, 1), t).squeeze(1)
    lo = learned_log_variance(terms, -torch.ones(2, 1), t).squeeze(1)
    assert torch.allclose(hi, terms.log_betas[t]) and torch.allclose(lo, terms.posterior_log_variance_clipped[t])


def test_vlb_is_zero_for_the_true_posterior_and_grows_otherwise() -> None:
    terms = _terms()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([5, 100, 500, 900])
    abar = terms.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    v_true = -torch.ones_like(x0)  # v = -1 gives the posterior variance beta~_t
    exact = vlb_loss(terms, x0, x_t, t, eps, v_true)
    assert torch.all(exact.abs() < 1e-3), exact
    wrong = vlb_loss(terms, x0, x_t, t, eps + 0.5, torch.ones_like(x0))
    assert torch.all(wrong > exact) and torch.isfinite(wrong).all()
