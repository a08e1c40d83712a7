"""Query side of retrieval in one launch (codec.query.prepare_query).

Per (request, KV head): mean of the GQA group's query heads, its norm, the unit mean
rotated by the same D x D matrix the keys were rotated with. Same formula as the codec in
fp32; summation order differs, so values agree to float rounding (not bit-for-bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_pariskv.codec.query import PreparedQuery

_TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def group_unit_mean(
    q_ptr, stride_qr, stride_qh, r, h, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr
):
    """Mean of KV head h's query group for request r (fp32 [D]) as (unit vector, norm)."""
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    qs = tl.load(
        q_ptr + r.to(tl.int64) * stride_qr + (h * G + g[:, None]) * stride_qh + d[None, :],
        mask=(g < G)[:, None],
        other=0.0,
    ).to(tl.float32)
    mean = tl.sum(qs, axis=0) / G
    norm = tl.sqrt(tl.sum(mean * mean, axis=0))
    return mean / tl.maximum(norm, _TINY), norm


@triton.jit
def _query_kernel(
    q_ptr,
    stride_qr,
    stride_qh,
    rot_ptr,
    blocks_ptr,
    norm_ptr,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0)  # r * H + h
    r = pid // H
    h = pid % H
    d = tl.arange(0, D)
    unit, norm = group_unit_mean(q_ptr, stride_qr, stride_qh, r, h, G, GP, D)
    tl.store(norm_ptr + pid, norm)
    for i0 in tl.static_range(0, D, ROWS):
        i = i0 + tl.arange(0, ROWS)
        rot = tl.load(rot_ptr + i[:, None] * D + d[None, :])  # rows of R
        tl.store(blocks_ptr + pid.to(tl.int64) * D + i, tl.sum(rot * unit[None, :], axis=1))


def prepare_query_gpu(
    q: torch.Tensor,
    num_kv_heads: int,
    rotation: torch.Tensor,
    out: PreparedQuery | None = None,
) -> PreparedQuery:
    """q ``[R, Hq, D]`` (any float dtype, last dim contiguous) -> blocks fp32
    ``[R, Hkv, D/8, 8]`` and norm fp32 ``[R, Hkv]``; ``rotation`` is R (fp32 [D, D])."""
    r, hq, d = q.shape
    g = hq // num_kv_heads
    if out is None:
        out = PreparedQuery(
            blocks=torch.empty(r, num_kv_heads, d // 8, 8, dtype=torch.float32, device=q.device),
            norm=torch.empty(r, num_kv_heads, dtype=torch.float32, device=q.device),
        )
    if r == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    _query_kernel[(r * num_kv_heads,)](
        q,
        q.stride(0),
        q.stride(1),
        rotation,
        out.blocks,
        out.norm,
        H=num_kv_heads,
        G=g,
        GP=triton.next_power_of_2(g),
        D=d,
        ROWS=min(32, d),
    )
    return out
