"""The query side of a decode step in one launch: query prep + centroid table + scan reset.

At decode batch sizes every launch of the per-layer pipeline costs several microseconds
of fixed latency, more than the work of these stages. This kernel does, per (request,
KV head):

* the query prep of :mod:`kernels.query` (group mean, channel scales, norm, rotation),
  whose rotated blocks it writes to the prepared-query buffers the rerank reads;
* the head's centroid table, exactly :func:`codec.collision.centroid_table` of the
  blocks it wrote: int8 ``round(127 * <s_c, q_b> / S)``, S the largest block L1 norm;
* the zeroing of the (request, head)'s score histogram that the collision scan then
  accumulates into.

One program per (request, head), because S spans all of the head's blocks. The rotated
blocks are computed twice (once for S, once for the table) rather than stored and
reloaded: the second pass then needs no barrier between the program's threads, and the
same code gives the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_pariskv.codec.query import PreparedQuery
from sglang_pariskv.kernels.encode import check_head_rows
from sglang_pariskv.kernels.query import group_unit_mean


@triton.jit
def _coord(qv, j: tl.constexpr):
    """Coordinate j of an fp32 [8] block, as float64 (exact: the other terms are 0)."""
    return tl.sum(tl.where(tl.arange(0, 8) == j, qv, 0.0)).to(tl.float64)


@triton.jit
def _block(rot_ptr, unit, b, D: tl.constexpr):
    """Rotated coordinates 8b..8b+7 of the unit query: fp32 [8]."""
    i = b * 8 + tl.arange(0, 8)
    d = tl.arange(0, D)
    return tl.sum(tl.load(rot_ptr + i[:, None] * D + d[None, :]) * unit[None, :], axis=1)


@triton.jit
def _query_table_kernel(
    q_ptr,
    stride_qr,
    stride_qh,
    scale_ptr,
    rot_ptr,
    blocks_ptr,
    norm_ptr,
    table_ptr,
    shist_ptr,
    H: tl.constexpr,
    B: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    NBP: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    rh = tl.program_id(0)  # r * H + h
    r = rh // H
    h = rh % H
    unit, norm = group_unit_mean(q_ptr, stride_qr, stride_qh, scale_ptr, r, h, G, GP, D, HAS_SCALE)
    tl.store(norm_ptr + rh, norm)
    s = tl.arange(0, NBP)
    tl.store(shist_ptr + rh.to(tl.int64) * NBP + s, tl.zeros((NBP,), dtype=tl.int32))
    big = tl.zeros((), dtype=tl.float64)
    for b in range(B):
        qv = _block(rot_ptr, unit, b, D)
        tl.store(blocks_ptr + rh.to(tl.int64) * D + b * 8 + tl.arange(0, 8), qv)
        l1 = tl.abs(_coord(qv, 0))
        for j in tl.static_range(1, 8):
            l1 += tl.abs(_coord(qv, j))
        big = tl.maximum(big, l1)
    safe = tl.where(big > 0, big, 1.0)
    c = tl.arange(0, 256)
    for b in range(B):
        qv = _block(rot_ptr, unit, b, D)
        x = _coord(qv, 0)
        dot = tl.where((c & 1) != 0, x, -x)
        for j in tl.static_range(1, 8):
            x = _coord(qv, j)
            dot += tl.where(((c >> j) & 1) != 0, x, -x)
        entry = tl.floor(127.0 * dot / safe + 0.5)
        entry = tl.where(big > 0, entry, 0.0)
        tl.store(table_ptr + (rh.to(tl.int64) * B + b) * 256 + c, entry.to(tl.int8))


def query_table(
    q: torch.Tensor,
    rotation: torch.Tensor,
    query_out: PreparedQuery,
    table_out: torch.Tensor,
    score_hist: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> None:
    """q ``[R, Hq, D]`` (last dim contiguous) -> ``query_out`` (blocks fp32 [R, Hkv, B, 8],
    norm fp32 [R, Hkv]), ``table_out`` int8 [R, Hkv, B, 256] and ``score_hist`` int32
    [R, Hkv, NBP] zeroed. ``rotation`` fp32 [D, D]; ``scale``: the layer's calibration
    channel scales, fp32 [Hkv, D] contiguous (None: 1)."""
    r, hq, d = q.shape
    _, h, b, _ = table_out.shape
    if r == 0:
        return
    if q.stride(-1) != 1:
        q = q.contiguous()
    check_head_rows("scale", scale, h, d)
    _query_table_kernel[(r * h,)](
        q,
        q.stride(0),
        q.stride(1),
        scale if scale is not None else rotation,
        rotation,
        query_out.blocks,
        query_out.norm,
        table_out,
        score_hist,
        H=h,
        B=b,
        G=hq // h,
        GP=triton.next_power_of_2(hq // h),
        D=d,
        NBP=score_hist.shape[-1],
        HAS_SCALE=scale is not None,
        num_warps=4,
    )
