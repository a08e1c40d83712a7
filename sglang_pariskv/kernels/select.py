"""Candidate selection: top-C zone positions by uint8 collision score (docs/design.md 8).

Exact, stable (lower position first among equal scores), with no sort:
  1. ``_count_kernel``: from the score histogram of the scan, the threshold score s* (the
     lowest score still needed to reach C), how many keys score above it (all taken) and
     how many of the keys *at* it to take; and per chunk of positions and head, how many
     keys score above / at s*.
  2. ``_write_kernel`` compacts the positions (or their KV slots): keys above s* in
     position order first, then the first ``take`` keys at s*, in position order. Each
     chunk's output offset (the exclusive prefix of the chunk counts) is summed by the
     chunk's own program from the counts of the chunks before it: a few KB of L2 reads
     instead of a third launch, which costs more at decode batch sizes.
The selected set is exactly codec's ``select_candidates`` set; the order inside it differs
(codec orders by score), which the rerank does not depend on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _count_kernel(
    scores_ptr,
    shist_ptr,
    counts_ptr,
    zend_ptr,
    thr_ptr,
    take_ptr,
    ngt_ptr,
    gt_ptr,
    eq_ptr,
    zone_start,
    NMAX,
    NCH,
    H: tl.constexpr,
    HP: tl.constexpr,
    NBP: tl.constexpr,
    CH: tl.constexpr,
):
    """Threshold s* per head (recomputed by every program from the small score histogram:
    cheaper than a launch) and this chunk's counts of keys above / at s*."""
    chunk = tl.program_id(0)
    r = tl.program_id(1)
    h = tl.arange(0, HP)
    hmask = h < H
    row = r * H + h
    s = tl.arange(0, NBP)
    hist = tl.load(shist_ptr + row[:, None] * NBP + s[None, :], mask=hmask[:, None], other=0)
    c = tl.load(counts_ptr + r).to(tl.int32)
    # suffix[s] = keys scoring >= s (a forward scan: no reverse-scan dependence)
    suffix = tl.sum(hist, axis=1)[:, None] - tl.cumsum(hist, axis=1) + hist
    thr = tl.max(tl.where(suffix >= c, s[None, :], -1), axis=1)  # [HP]
    n_gt_all = tl.sum(tl.where(s[None, :] > thr[:, None], hist, 0), axis=1)
    if chunk == 0:
        tl.store(thr_ptr + row, thr, mask=hmask)
        tl.store(take_ptr + row, c - n_gt_all, mask=hmask)
        tl.store(ngt_ptr + row, n_gt_all, mask=hmask)
    zend = tl.load(zend_ptr + r)
    start = chunk * CH
    pos = start + tl.arange(0, CH)
    live = (start + CH > zone_start) & (start < zend)
    m = hmask[:, None] & ((pos >= zone_start) & (pos < zend))[None, :] & live
    sc = tl.load(scores_ptr + row[:, None].to(tl.int64) * NMAX + pos[None, :], mask=m, other=0)
    sc = sc.to(tl.int32)
    n_gt = tl.sum((m & (sc > thr[:, None])).to(tl.int32), axis=1)
    n_eq = tl.sum((m & (sc == thr[:, None])).to(tl.int32), axis=1)
    tl.store(gt_ptr + row * NCH + chunk, n_gt, mask=hmask)
    tl.store(eq_ptr + row * NCH + chunk, n_eq, mask=hmask)


@triton.jit
def _write_kernel(
    scores_ptr,
    thr_ptr,
    take_ptr,
    ngt_ptr,
    zend_ptr,
    gt_ptr,
    eq_ptr,
    cand_ptr,
    rtt_ptr,
    stride_rtt,
    req_ptr,
    zone_start,
    NMAX,
    NCH,
    CMAX,
    H: tl.constexpr,
    HP: tl.constexpr,
    CH: tl.constexpr,
    PB: tl.constexpr,
    WRITE_SLOTS: tl.constexpr,
):
    chunk = tl.program_id(0)
    r = tl.program_id(1)
    zend = tl.load(zend_ptr + r)
    start = chunk * CH
    if (start + CH > zone_start) & (start < zend):
        h = tl.arange(0, HP)
        hmask = h < H
        row = r * H + h
        pos = start + tl.arange(0, CH)
        m = hmask[:, None] & ((pos >= zone_start) & (pos < zend))[None, :]
        sc = tl.load(
            scores_ptr + row[:, None].to(tl.int64) * NMAX + pos[None, :], mask=m, other=0
        ).to(tl.int32)
        thr = tl.load(thr_ptr + row, mask=hmask, other=0)
        take = tl.load(take_ptr + row, mask=hmask, other=0)
        n_gt = tl.load(ngt_ptr + row, mask=hmask, other=0)
        gt = (m & (sc > thr[:, None])).to(tl.int32)
        eq = (m & (sc == thr[:, None])).to(tl.int32)
        # This chunk's output offsets: the counts of the chunks before it, summed.
        gt_base = tl.zeros((HP,), dtype=tl.int32)
        eq_base = tl.zeros((HP,), dtype=tl.int32)
        for c0 in range(0, chunk, PB):
            prev = c0 + tl.arange(0, PB)
            pm = hmask[:, None] & (prev < chunk)[None, :]
            at = row[:, None] * NCH + prev[None, :]
            gt_base += tl.sum(tl.load(gt_ptr + at, mask=pm, other=0), axis=1)
            eq_base += tl.sum(tl.load(eq_ptr + at, mask=pm, other=0), axis=1)
        gt_rank = gt_base[:, None] + (tl.cumsum(gt, axis=1) - gt)
        eq_rank = eq_base[:, None] + (tl.cumsum(eq, axis=1) - eq)
        take_eq = (eq == 1) & (eq_rank < take[:, None])
        dest = tl.where(gt == 1, gt_rank, n_gt[:, None] + eq_rank)
        keep = (gt == 1) | take_eq
        val = pos
        if WRITE_SLOTS:  # the rerank then reads codes without a dependent req_to_token load
            req = tl.load(req_ptr + r).to(tl.int64)
            val = tl.load(rtt_ptr + req * stride_rtt + pos, mask=(pos >= zone_start) & (pos < zend))
        tl.store(
            cand_ptr + row[:, None].to(tl.int64) * CMAX + dest,
            val[None, :].broadcast_to((HP, CH)),
            mask=keep,
        )


class CandidateBuffers:
    """Preallocated scratch of :func:`select_candidates_gpu` for one (R, Hkv, NMAX)."""

    def __init__(self, rows: int, nmax: int, chunk: int, device) -> None:
        self.chunk = chunk
        self.nch = triton.cdiv(max(nmax, 1), chunk)
        i32 = dict(dtype=torch.int32, device=device)
        self.thr = torch.empty(rows, **i32)
        self.take = torch.empty(rows, **i32)
        self.ngt = torch.empty(rows, **i32)
        self.gt = torch.empty(rows, self.nch, **i32)
        self.eq = torch.empty(rows, self.nch, **i32)


def count_candidates(
    scores: torch.Tensor,
    score_hist: torch.Tensor,
    counts: torch.Tensor,
    zone_start: int,
    zone_end: torch.Tensor,
    buf: CandidateBuffers,
) -> None:
    """The count pass alone: per (request, head) row the threshold score, the keys above
    it and at it to take (``buf.thr`` / ``buf.ngt`` / ``buf.take``), and per chunk of
    ``buf.chunk`` positions the keys above / at it (``buf.gt`` / ``buf.eq``). The CUDA
    candidate write + rerank (``csrc/select_rerank.cu``) starts from these."""
    r, h, nmax = scores.shape
    if r == 0:
        return
    rows = r * h
    _count_kernel[(buf.nch, r)](
        scores,
        score_hist,
        counts,
        zone_end,
        buf.thr,
        buf.take,
        buf.ngt,
        buf.gt[:rows],
        buf.eq[:rows],
        zone_start,
        nmax,
        buf.nch,
        H=h,
        HP=triton.next_power_of_2(h),
        NBP=score_hist.shape[-1],
        CH=buf.chunk,
    )


def select_candidates_gpu(
    scores: torch.Tensor,
    score_hist: torch.Tensor,
    counts: torch.Tensor,
    zone_start: int,
    zone_end: torch.Tensor,
    cand: torch.Tensor,
    buf: CandidateBuffers,
    req_to_token: torch.Tensor | None = None,
    req_pool_indices: torch.Tensor | None = None,
) -> None:
    """Write the top-``counts[r]`` zone positions of each (request, head) into ``cand``
    (their KV slots ``req_to_token[req_pool_indices[r], pos]`` when those are given).

    scores uint8 [R, Hkv, NMAX]; score_hist int32 [R, Hkv, NBP]; counts int [R]
    (C from :func:`codec.budget.num_candidates`, <= zone length); zone_end int [R];
    cand int32 [R, Hkv, CMAX] with CMAX >= max C: entries [0, C) are written.
    """
    r, h, nmax = scores.shape
    if r == 0:
        return
    count_candidates(scores, score_hist, counts, zone_start, zone_end, buf)
    rows = r * h
    slots = req_to_token is not None
    _write_kernel[(buf.nch, r)](
        scores,
        buf.thr,
        buf.take,
        buf.ngt,
        zone_end,
        buf.gt[:rows],
        buf.eq[:rows],
        cand,
        req_to_token if slots else cand,
        req_to_token.stride(0) if slots else 0,
        req_pool_indices if slots else cand,
        zone_start,
        nmax,
        buf.nch,
        cand.shape[-1],
        H=h,
        HP=triton.next_power_of_2(h),
        CH=buf.chunk,
        PB=min(128, triton.next_power_of_2(buf.nch)),
        WRITE_SLOTS=slots,
    )
