"""The query side of a decode step in one launch: query prep + tier table + scan reset.

At decode batch sizes every launch of the per-layer pipeline costs several microseconds
of fixed latency, more than the work of these stages. This kernel does, per (request,
KV head, block):

* the query prep of :mod:`kernels.query` (group mean, channel scales, norm, rotation),
  restricted to the block's 8 rotated coordinates, which it writes to the prepared-query
  buffers the rerank reads;
* that block's tier table, by :func:`kernels.tiers.block_tiers` (the rule of
  :mod:`kernels.tiers`), from the coordinates it just computed;
* the zeroing of the (request, head)'s score histogram that the collision scan then
  accumulates into (block 0's program).

Each program recomputes its head's group mean (G x D loads, cached in L1/L2): cheaper than
a second launch. The tiers are exactly :func:`codec.collision.centroid_tiers` of the
blocks written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_pariskv.codec.query import PreparedQuery
from sglang_pariskv.kernels.encode import check_head_rows
from sglang_pariskv.kernels.query import group_unit_mean
from sglang_pariskv.kernels.tiers import block_tiers, default_chunk


@triton.jit
def _query_tier_kernel(
    q_ptr,
    stride_qr,
    stride_qh,
    scale_ptr,
    rot_ptr,
    hist_ptr,
    req_ptr,
    thr_ptr,
    blocks_ptr,
    norm_ptr,
    tiers_ptr,
    shist_ptr,
    H: tl.constexpr,
    B: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    NT: tl.constexpr,
    NTP: tl.constexpr,
    NBP: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    pid = tl.program_id(0)  # (r * H + h) * B + b
    rh = pid // B
    b = pid % B
    r = rh // H
    h = rh % H
    unit, norm = group_unit_mean(q_ptr, stride_qr, stride_qh, scale_ptr, r, h, G, GP, D, HAS_SCALE)
    i = b * 8 + tl.arange(0, 8)
    d = tl.arange(0, D)
    qv = tl.sum(tl.load(rot_ptr + i[:, None] * D + d[None, :]) * unit[None, :], axis=1)
    tl.store(blocks_ptr + rh.to(tl.int64) * D + i, qv)
    if b == 0:
        tl.store(norm_ptr + rh, norm)
        s = tl.arange(0, NBP)
        tl.store(shist_ptr + rh.to(tl.int64) * NBP + s, tl.zeros((NBP,), dtype=tl.int32))
    req = tl.load(req_ptr + r).to(tl.int64)
    tiers = block_tiers(
        qv, hist_ptr + (req * (H * B) + h * B + b) * 256, thr_ptr + r * NT, NT, NTP, CHUNK
    )
    tl.store(tiers_ptr + pid.to(tl.int64) * 256 + tl.arange(0, 256), tiers.to(tl.uint8))


def query_tier_table(
    q: torch.Tensor,
    rotation: torch.Tensor,
    hist: torch.Tensor,
    req_pool_indices: torch.Tensor,
    thresholds: torch.Tensor,
    query_out: PreparedQuery,
    tiers_out: torch.Tensor,
    score_hist: torch.Tensor,
    chunk: int | None = None,
    scale: torch.Tensor | None = None,
) -> None:
    """q ``[R, Hq, D]`` (last dim contiguous) -> ``query_out`` (blocks fp32 [R, Hkv, B, 8],
    norm fp32 [R, Hkv]), ``tiers_out`` uint8 [R, Hkv, B, 256], and ``score_hist`` int32
    [R, Hkv, NBP] zeroed. hist int32 [max_reqs, Hkv, B, 256]; thresholds int64 [R, tiers]
    (contiguous); ``rotation`` fp32 [D, D]; ``scale``: the layer's calibration channel
    scales, fp32 [Hkv, D] contiguous (None: 1)."""
    r, hq, d = q.shape
    _, h, b, _ = tiers_out.shape
    nt, nbp = thresholds.shape[-1], score_hist.shape[-1]
    if r == 0:
        return
    if q.stride(-1) != 1:
        q = q.contiguous()
    if chunk is None:
        chunk = default_chunk(hist)
    check_head_rows("scale", scale, h, d)
    _query_tier_kernel[(r * h * b,)](
        q,
        q.stride(0),
        q.stride(1),
        scale if scale is not None else rotation,
        rotation,
        hist,
        req_pool_indices,
        thresholds,
        query_out.blocks,
        query_out.norm,
        tiers_out,
        score_hist,
        H=h,
        B=b,
        G=hq // h,
        GP=triton.next_power_of_2(hq // h),
        D=d,
        NT=nt,
        NTP=max(triton.next_power_of_2(nt), 2),
        NBP=nbp,
        CHUNK=chunk,
        HAS_SCALE=scale is not None,
        num_warps=4,
    )
