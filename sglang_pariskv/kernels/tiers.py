"""Tier table per (request, KV head, block, centroid) for the collision scan (DESIGN.md 7).

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

from sglang_pariskv.codec.collision import NUM_CENTROIDS


@triton.jit
def _tier_kernel(
    qb_ptr,
    hist_ptr,
    req_ptr,
    thr_ptr,
    out_ptr,
    HB: tl.constexpr,
    NT: tl.constexpr,
    NTP: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)  # r * HB + hb
    r = pid // HB
    hb = pid % HB
    req = tl.load(req_ptr + r).to(tl.int64)
    j = tl.arange(0, 8)
    q = tl.load(qb_ptr + pid.to(tl.int64) * 8 + j).to(tl.float64)
    c = tl.arange(0, 256)
    bit = ((c[:, None] >> j[None, :]) & 1) == 1
    s = tl.sum(tl.where(bit, q[None, :], -q[None, :]), axis=1)  # [256]
    hrow = hist_ptr + (req * HB + hb) * 256
    pre = tl.zeros((256,), dtype=tl.int32)
    # Small chunks of "better" candidates keep the [CHUNK, 256] compare tile in registers.
    for c0 in range(0, 256, CHUNK):
        c2 = c0 + tl.arange(0, CHUNK)
        bit2 = ((c2[:, None] >> j[None, :]) & 1) == 1
        s2 = tl.sum(tl.where(bit2, q[None, :], -q[None, :]), axis=1)  # [CHUNK]
        n2 = tl.load(hrow + c2)
        better = (s2[:, None] > s[None, :]) | (
            (s2[:, None] == s[None, :]) & (c2[:, None] < c[None, :])
        )
        pre += tl.sum(tl.where(better, n2[:, None], 0), axis=0)
    t = tl.arange(0, NTP)
    thr = tl.load(thr_ptr + r * NT + t, mask=t < NT, other=-1)
    tiers = tl.sum((pre[:, None] < thr[None, :]).to(tl.int32), axis=1)
    tl.store(out_ptr + pid.to(tl.int64) * 256 + c, tiers.to(tl.uint8))


def centroid_tier_table(
    query_blocks: torch.Tensor,
    hist: torch.Tensor,
    req_pool_indices: torch.Tensor,
    thresholds: torch.Tensor,
    out: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """uint8 [R, Hkv, B, 256]: codec's ``centroid_tiers`` for requests ``req_pool_indices``.

    query_blocks float32 [R, Hkv, B, 8]; hist int32 [max_reqs, Hkv, B, 256] (rows picked by
    ``req_pool_indices`` [R]); thresholds int64 [R, num_tiers] from
    :func:`codec.budget.tier_thresholds`.
    """
    r, h, b, _ = query_blocks.shape
    nt = thresholds.shape[-1]
    if out is None:
        out = torch.empty((r, h, b, NUM_CENTROIDS), dtype=torch.uint8, device=hist.device)
    if r == 0:
        return out
    if chunk is None:  # small on the GPU (registers); large in the CPU interpreter (speed)
        chunk = 8 if hist.is_cuda else 64
    qb = query_blocks.to(torch.float32).contiguous()
    _tier_kernel[(r * h * b,)](
        qb,
        hist,
        req_pool_indices,
        thresholds.to(torch.int64).contiguous(),
        out,
        HB=h * b,
        NT=nt,
        NTP=max(triton.next_power_of_2(nt), 2),
        CHUNK=chunk,
        num_warps=4,
    )
    return out
