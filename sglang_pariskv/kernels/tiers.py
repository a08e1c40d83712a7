"""Tier table of one (request, KV head, block) for the collision scan (docs/design.md 7), as the
Triton device function :func:`block_tiers` that the fused query + tier kernel
(:mod:`kernels.query_tiers`) calls.

Exactly :func:`codec.collision.centroid_tiers`, without a sort: a centroid's rank-preceding
key count is the sum of the histogram over the centroids that beat it (higher score, or
equal score and lower id), which is a 256 x 256 masked reduction per (request, head,
block) and fits one program. Scores are sums of +-q_j in float64: for fp32 query blocks
those sums are exact, so the ranking (and its ties) is the mathematical one that the
codec's float64 matmul also produces. The output is uint8 (at most 15 tiers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _centroid_scores(c, q0, q1, q2, q3, q4, q5, q6, q7):
    """sum_j (+q_j if bit j of c else -q_j), in a fixed order (elementwise, float64)."""
    s = tl.where((c & 1) != 0, q0, -q0)
    s += tl.where((c & 2) != 0, q1, -q1)
    s += tl.where((c & 4) != 0, q2, -q2)
    s += tl.where((c & 8) != 0, q3, -q3)
    s += tl.where((c & 16) != 0, q4, -q4)
    s += tl.where((c & 32) != 0, q5, -q5)
    s += tl.where((c & 64) != 0, q6, -q6)
    s += tl.where((c & 128) != 0, q7, -q7)
    return s


@triton.jit
def block_tiers(qv, hrow, thr_row, NT: tl.constexpr, NTP: tl.constexpr, CHUNK: tl.constexpr):
    """Tier of each of the 256 centroids of one (request, head, block): query block ``qv``
    (fp32 [8]), the block's key histogram row ``hrow`` and the request's thresholds."""
    j = tl.arange(0, 8)
    q0 = tl.sum(tl.where(j == 0, qv, 0.0)).to(tl.float64)  # exact: the other terms are 0
    q1 = tl.sum(tl.where(j == 1, qv, 0.0)).to(tl.float64)
    q2 = tl.sum(tl.where(j == 2, qv, 0.0)).to(tl.float64)
    q3 = tl.sum(tl.where(j == 3, qv, 0.0)).to(tl.float64)
    q4 = tl.sum(tl.where(j == 4, qv, 0.0)).to(tl.float64)
    q5 = tl.sum(tl.where(j == 5, qv, 0.0)).to(tl.float64)
    q6 = tl.sum(tl.where(j == 6, qv, 0.0)).to(tl.float64)
    q7 = tl.sum(tl.where(j == 7, qv, 0.0)).to(tl.float64)
    c = tl.arange(0, 256)
    s = _centroid_scores(c, q0, q1, q2, q3, q4, q5, q6, q7)  # [256]
    # acc[k, c] sums, over the "better" candidates c2 = c0 + k, n[c2] * [c2 beats c]: the
    # loop is elementwise and the one cross-thread reduction happens after it.
    acc = tl.zeros((CHUNK, 256), dtype=tl.int32)
    for c0 in range(0, 256, CHUNK):
        c2 = c0 + tl.arange(0, CHUNK)
        s2 = _centroid_scores(c2, q0, q1, q2, q3, q4, q5, q6, q7)  # [CHUNK]
        n2 = tl.load(hrow + c2)
        better = (s2[:, None] > s[None, :]) | (
            (s2[:, None] == s[None, :]) & (c2[:, None] < c[None, :])
        )
        acc += tl.where(better, n2[:, None], 0)
    pre = tl.sum(acc, axis=0)  # keys of better-ranked centroids
    t = tl.arange(0, NTP)
    thr = tl.load(thr_row + t, mask=t < NT, other=-1)
    return tl.sum((pre[:, None] < thr[None, :]).to(tl.int32), axis=1)


def default_chunk(hist: torch.Tensor) -> int:
    """Centroids compared per loop step of :func:`block_tiers`: small on the GPU
    (registers), large in the CPU interpreter (speed)."""
    return 16 if hist.is_cuda else 64
