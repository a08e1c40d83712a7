"""Retrieval reuse on the GPU: kept sets per request slot and layer, and the per-layer
decision of which rows retrieve (the rule of :mod:`codec.reuse`, granularity "layer").

Why per (request, layer) and not per KV head: the collision scan, the dominant pass over
the context, reads each token's sign bytes of every KV head at once (one contiguous
``Hkv * B``-byte row), so skipping single heads would save little of it; a request's layer
either retrieves for all its heads or for none.

The decision is made on the device, after the query stage, so nothing syncs with the host
and a captured graph replays it. Rows that reuse keep their launch slot but do no work:
:func:`decide_reuse` writes per-layer copies of the plan's sequence length, candidate
count and zone end with 0 / 0 / ``sink`` for them, which every retrieval kernel (CUDA and
Triton alike) already treats as "nothing to scan, select or rank". A retrieving row's top
``reuse_kept`` candidates (the top-k stage, run wider) go into the kept buffer and a
reusing row's come out of it (:func:`exchange_kept`); every row then attends the top-k of
its kept set by its own query (the rerank and top-k run again over that short list).

State is keyed by SGLang's ``req_pool_idx``; :meth:`ReuseState.reset` must run whenever a
request (re)starts on a slot (every extend), so no request ever reuses a selection another
request made on the same slot.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

#: Order of the per-row fields in :attr:`ReuseStep.eff` (then the flag row).
EFF_FIELDS = ("seq", "counts", "zone_end")


class LayerReuse(NamedTuple):
    """One layer's kept state (views of :class:`ReuseState`)."""

    query: torch.Tensor  #: float32 [max_reqs, Hkv, D]: unit rotated query of the kept set
    top: torch.Tensor  #: int32 [max_reqs, Hkv, W]: kept KV slots (-1: empty entry)
    seq: torch.Tensor  #: int32 [max_reqs] (strided view): seq_len when kept; -1: nothing
    counters: torch.Tensor  #: int64 [2]: (row-layers retrieved, row-layers reused), cumulative


class ReuseState:
    """Persistent kept selections of every request slot and layer (planned GPU memory:
    ``attention.memory_plan`` builds one on the meta device to count its bytes)."""

    def __init__(
        self, max_reqs: int, num_layers: int, num_kv_heads: int, head_dim: int, width: int,
        device,
    ) -> None:  # fmt: skip
        """``width``: kept slots per (request, layer, KV head), the workspace's
        ``kept_width``."""
        f32 = dict(dtype=torch.float32, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.query = [
            torch.zeros(max_reqs, num_kv_heads, head_dim, **f32) for _ in range(num_layers)
        ]
        self.top = [
            torch.full((max_reqs, num_kv_heads, width), -1, **i32) for _ in range(num_layers)
        ]
        self.seq = torch.full((max_reqs, num_layers), -1, **i32)
        self.counters = torch.zeros(2, dtype=torch.int64, device=device)

    def nbytes(self) -> int:
        tensors = [*self.query, *self.top, self.seq, self.counters]
        return sum(t.numel() * t.element_size() for t in tensors)

    def layer(self, layer: int) -> LayerReuse:
        return LayerReuse(self.query[layer], self.top[layer], self.seq[:, layer], self.counters)

    def reset(self, req_pool_indices: torch.Tensor) -> None:
        """Forget every layer's kept selection of these slots (graph-safe, no sync)."""
        if req_pool_indices.numel():
            self.seq.index_fill_(0, req_pool_indices.to(torch.int64), -1)


@triton.jit
def _decide_kernel(
    meta_seq_ptr,
    meta_dense_ptr,
    meta_counts_ptr,
    meta_zend_ptr,
    req_ptr,
    qb_ptr,
    kq_ptr,
    kseq_ptr,
    stride_kseq,
    eff_ptr,
    flag_ptr,
    cnt_ptr,
    rmax,
    threshold,
    max_age,
    zone_start,
    H: tl.constexpr,
    HP: tl.constexpr,
    D: tl.constexpr,
):
    r = tl.program_id(0)
    seq = tl.load(meta_seq_ptr + r)
    sparse = tl.load(meta_dense_ptr + r) == 0
    req = tl.load(req_ptr + r).to(tl.int64)
    kept_seq = tl.load(kseq_ptr + req * stride_kseq).to(tl.int64)
    h = tl.arange(0, HP)
    d = tl.arange(0, D)
    m = (h < H)[:, None]
    at = h[:, None] * D + d[None, :]
    q = tl.load(qb_ptr + r.to(tl.int64) * (H * D) + at, mask=m, other=0.0)
    kq = tl.load(kq_ptr + req * (H * D) + at, mask=m, other=0.0)
    cos = tl.sum(q * kq, axis=1)
    min_cos = tl.min(tl.where(h < H, cos, 2.0), axis=0)
    need = (kept_seq < 0) | (seq - kept_seq >= max_age) | (min_cos < threshold)
    fresh = sparse & need
    tl.store(eff_ptr + r, tl.where(fresh, seq, 0))
    tl.store(eff_ptr + rmax + r, tl.where(fresh, tl.load(meta_counts_ptr + r), 0))
    tl.store(eff_ptr + 2 * rmax + r, tl.where(fresh, tl.load(meta_zend_ptr + r), zone_start))
    tl.store(flag_ptr + r, fresh.to(tl.int32))
    tl.store(kq_ptr + req * (H * D) + at, q, mask=m & fresh)
    tl.store(kseq_ptr + req * stride_kseq, seq.to(tl.int32), mask=fresh)
    tl.atomic_add(cnt_ptr, fresh.to(tl.int64), sem="relaxed")
    tl.atomic_add(cnt_ptr + 1, (sparse & ~need).to(tl.int64), sem="relaxed")


class ReuseStep(NamedTuple):
    """What :func:`decide_reuse` wrote for one layer: the retrieval kernels' inputs."""

    seq: torch.Tensor  #: int64 [R]: seq_len where the row retrieves, else 0 (nothing to scan)
    counts: torch.Tensor  #: int64 [R]: candidate count where it retrieves, else 0
    zone_end: torch.Tensor  #: int64 [R]: zone end where it retrieves, else the zone start
    fresh: torch.Tensor  #: int32 [R]: 1 where the row retrieves


def decide_reuse(
    meta_seq: torch.Tensor,
    meta_dense: torch.Tensor,
    meta_counts: torch.Tensor,
    meta_zone_end: torch.Tensor,
    req_pool_indices: torch.Tensor,
    query_blocks: torch.Tensor,
    kept: LayerReuse,
    eff: torch.Tensor,
    flag: torch.Tensor,
    threshold: float,
    max_age: int,
    zone_start: int,
) -> ReuseStep:
    """Decide, per request, whether this layer retrieves; update the kept query and length
    of those that do. ``meta_*``: the workspace plan's int64 [R] fields; ``query_blocks``:
    float32 [R, Hkv, B, 8] from the query stage; ``eff`` int64 [3, Rmax] and ``flag`` int32
    [Rmax]: scratch the result views live in."""
    r, h = query_blocks.shape[:2]
    d = query_blocks.shape[2] * query_blocks.shape[3]
    rmax = eff.shape[1]
    out = ReuseStep(eff[0, :r], eff[1, :r], eff[2, :r], flag[:r])
    if r == 0:
        return out
    _decide_kernel[(r,)](
        meta_seq,
        meta_dense,
        meta_counts,
        meta_zone_end,
        req_pool_indices,
        query_blocks,
        kept.query,
        kept.seq,
        kept.seq.stride(0),
        eff,
        flag,
        kept.counters,
        rmax,
        float(threshold),
        int(max_age),
        int(zone_start),
        H=h,
        HP=triton.next_power_of_2(h),
        D=d,
    )
    return out


@triton.jit
def _exchange_kernel(
    sets_ptr, fresh_ptr, dense_ptr, req_ptr, kept_ptr, cnt_ptr, W, H: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # r * H + h
    blk = tl.program_id(1)
    r = row // H
    h = row % H
    fresh = tl.load(fresh_ptr + r) != 0
    req = tl.load(req_ptr + r).to(tl.int64)
    idx = blk * BLOCK + tl.arange(0, BLOCK)
    m = idx < W
    here = sets_ptr + row.to(tl.int64) * W + idx
    there = kept_ptr + (req * H + h) * W + idx
    if fresh:
        tl.store(there, tl.load(here, mask=m), mask=m)
    else:
        tl.store(here, tl.load(there, mask=m), mask=m)
    if (h == 0) & (blk == 0):
        tl.store(cnt_ptr + r, tl.where(tl.load(dense_ptr + r) != 0, 0, W).to(tl.int64))


def exchange_kept(
    kept_sets: torch.Tensor,
    fresh: torch.Tensor,
    dense: torch.Tensor,
    req_pool_indices: torch.Tensor,
    kept: LayerReuse,
    counts: torch.Tensor,
    block: int = 1024,
) -> None:
    """Rows that retrieved store their new kept set (``kept_sets`` int32 [R, Hkv, W], this
    step's widened top-k, -1 past its candidates) into ``kept.top`` at their request slot;
    the others load theirs from it. ``counts`` int64 [R] receives the list length each
    request's kept-set rerank reads: W, or 0 for a dense request."""
    r, h, w = kept_sets.shape
    if kept.top.shape[1:] != (h, w):
        raise ValueError(f"kept sets {tuple(kept.top.shape)} do not match {(r, h, w)}")
    if r == 0:
        return
    _exchange_kernel[(r * h, triton.cdiv(w, block))](
        kept_sets, fresh, dense, req_pool_indices, kept.top, counts, w, H=h, BLOCK=block
    )
