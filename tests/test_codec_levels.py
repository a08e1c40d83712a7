"""The magnitude levels against an independent numerical oracle (scipy quadrature)."""

import math

import pytest
import torch
from scipy import integrate, stats

from sglang_pariskv.codec.levels import magnitude_levels, magnitude_thresholds


def _cell_mean_by_quadrature(lo: float, hi: float) -> float:
    # u_j^2 ~ Beta(1/2, 7/2); E[|u_j| | lo < |u_j| <= hi] = E[sqrt(y) | lo^2 < y <= hi^2].
    beta = stats.beta(0.5, 3.5)
    num = integrate.quad(lambda y: math.sqrt(y) * beta.pdf(y), lo * lo, hi * hi, limit=200)[0]
    den = beta.cdf(hi * hi) - beta.cdf(lo * lo)
    return num / den


def test_levels_are_a_lloyd_fixed_point():
    a = magnitude_levels(torch.float64).tolist()
    thr = magnitude_thresholds(torch.float64).tolist()
    assert len(a) == 8 and all(0 < x < y < 1 for x, y in zip(a, a[1:]))
    cuts = [0.0] + thr + [1.0]
    for i in range(8):
        assert _cell_mean_by_quadrature(cuts[i], cuts[i + 1]) == pytest.approx(a[i], abs=1e-4)
    for i in range(7):
        assert thr[i] == pytest.approx((a[i] + a[i + 1]) / 2, abs=1e-12)


def test_levels_beat_perturbed_levels_on_sampled_directions():
    # Lloyd-Max optimality means the MSE on real samples is a local minimum.
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(200_000, 8, generator=gen, dtype=torch.float64)
    x = (u / u.norm(dim=-1, keepdim=True)).abs().flatten()
    a = magnitude_levels(torch.float64)

    def mse(levels):
        return ((x[:, None] - levels[None]) ** 2).min(dim=1).values.mean()

    base = mse(a)
    for i in range(8):
        for delta in (-0.01, 0.01):
            b = a.clone()
            b[i] += delta
            assert mse(b) > base
