"""Query side of retrieval (codec.query.prepare_query) as a Triton device function.

Per (request, KV head): mean of the GQA group's query heads (times the calibration's
channel scales, when given) and its norm; the caller
rotates the unit mean by the same D x D matrix the keys were rotated with. Decode runs it
inside the fused query + table kernel (``query_table.py``), which its test checks against
the codec: same formula in fp32, summation order differs, so values agree to float
rounding (not bit-for-bit).
"""

from __future__ import annotations

import triton
import triton.language as tl

_TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def group_unit_mean(
    q_ptr,
    stride_qr,
    stride_qh,
    scale_ptr,
    r,
    h,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    """Mean of KV head h's query group for request r (fp32 [D]), times head h's channel
    scales (fp32 [H, D] at ``scale_ptr``) when HAS_SCALE, as (unit vector, norm)."""
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    qs = tl.load(
        q_ptr + r.to(tl.int64) * stride_qr + (h * G + g[:, None]) * stride_qh + d[None, :],
        mask=(g < G)[:, None],
        other=0.0,
    ).to(tl.float32)
    mean = tl.sum(qs, axis=0) / G
    if HAS_SCALE:
        mean = mean * tl.load(scale_ptr + h * D + d)
    norm = tl.sqrt(tl.sum(mean * mean, axis=0))
    return mean / tl.maximum(norm, _TINY), norm
