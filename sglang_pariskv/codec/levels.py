"""3-bit Lloyd–Max magnitude levels for one coordinate of a uniform direction on S^7.

A ParisKV block is a unit 8-vector u. For a uniform direction, u_j^2 ~ Beta(1/2, 7/2),
so x = |u_j| has density proportional to (1 - x^2)^(5/2) on [0, 1]. The 8 levels are the
Lloyd–Max quantizer of that density: fixed, data-independent, computed once. Both the
partial mass and the partial first moment have closed forms (x = sin(theta) turns the
mass into an integral of cos^6), so the iteration is exact up to float64 rounding.
"""

from __future__ import annotations

import math
from functools import cache

import torch

NUM_LEVELS = 8
BLOCK = 8


def _mass(x: float) -> float:
    """Unnormalised integral of (1 - t^2)^(5/2) from 0 to x."""
    th = math.asin(min(max(x, 0.0), 1.0))
    return (
        5 * th / 16
        + 15 * math.sin(2 * th) / 64
        + 3 * math.sin(4 * th) / 64
        + math.sin(6 * th) / 192
    )


def _moment(x: float) -> float:
    """Unnormalised integral of t (1 - t^2)^(5/2) from 0 to x."""
    x = min(max(x, 0.0), 1.0)
    return (1.0 - (1.0 - x * x) ** 3.5) / 7.0


def conditional_mean(lo: float, hi: float) -> float:
    """E[|u_j| | lo < |u_j| <= hi]: the Lloyd centroid of one cell."""
    m = _mass(hi) - _mass(lo)
    return (_moment(hi) - _moment(lo)) / m


def lloyd_step(levels: list[float]) -> list[float]:
    """One Lloyd iteration: thresholds at midpoints, levels at cell means."""
    cuts = [0.0] + [(a + b) / 2 for a, b in zip(levels, levels[1:])] + [1.0]
    return [conditional_mean(cuts[i], cuts[i + 1]) for i in range(len(levels))]


@cache
def _levels_tuple(tol: float = 1e-15, max_iter: int = 100_000) -> tuple[float, ...]:
    # Start from quantiles-ish uniform spacing over the bulk of the mass; Lloyd converges
    # monotonically for log-concave densities, so the result does not depend on the start.
    levels = [(i + 0.5) / NUM_LEVELS * 0.8 for i in range(NUM_LEVELS)]
    for _ in range(max_iter):
        new = lloyd_step(levels)
        if max(abs(a - b) for a, b in zip(new, levels)) < tol:
            return tuple(new)
        levels = new
    raise RuntimeError("Lloyd-Max iteration for ParisKV magnitude levels did not converge")


def magnitude_levels(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The 8 increasing reconstruction levels a[0..7] of |u_j|."""
    return torch.tensor(_levels_tuple(), dtype=dtype, device=device)


def magnitude_thresholds(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The 7 decision thresholds (midpoints between consecutive levels)."""
    a = torch.tensor(_levels_tuple(), dtype=torch.float64)
    return ((a[1:] + a[:-1]) / 2).to(dtype=dtype, device=device)
