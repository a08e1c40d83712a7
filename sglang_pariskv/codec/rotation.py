"""Random-sign Walsh–Hadamard rotation of keys and queries.

Rotating by H·diag(s)/sqrt(n) spreads outlier channels evenly over all coordinates, so the
sign pattern of each 8-dim block carries information about every channel, and it is
orthonormal, so inner products are unchanged. The signs come from a fixed seed: keys
encoded by one process and queries prepared by another agree without sharing state.
For a head_dim that is not a power of two, the rotation is block-diagonal with Hadamard
blocks of the largest power of two that divides head_dim (at least 8).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from sglang_pariskv.support import check_head_dim


def hadamard_block_size(head_dim: int) -> int:
    """Largest power of two dividing head_dim: the size of each Hadamard block."""
    check_head_dim(head_dim)
    return head_dim & -head_dim


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Walsh–Hadamard matrix of order n (a power of two), entries ±1, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotation_signs(head_dim: int, seed: int) -> torch.Tensor:
    """The fixed ±1 diagonal s, drawn from ``seed`` with a private CPU generator."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bits = torch.randint(0, 2, (head_dim,), generator=gen, dtype=torch.int64)
    return (bits * 2 - 1).to(torch.float64)


@lru_cache(maxsize=64)
def _rotation_f64(head_dim: int, seed: int) -> torch.Tensor:
    n = hadamard_block_size(head_dim)
    block = hadamard(n) / n**0.5
    mat = torch.block_diag(*([block] * (head_dim // n)))
    return mat * rotation_signs(head_dim, seed)[None, :]


def rotation_matrix(
    head_dim: int, seed: int = 0, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """R with rotated = R @ x (orthonormal, [head_dim, head_dim])."""
    return _rotation_f64(head_dim, seed).to(dtype=dtype, device=device)


def rotate(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Rotate the last dimension of x (in x's dtype if floating point >= fp32)."""
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    r = rotation_matrix(x.shape[-1], seed, dtype=dtype, device=x.device)
    return x.to(dtype) @ r.T
