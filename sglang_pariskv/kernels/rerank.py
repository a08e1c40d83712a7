"""Rerank candidates with the 3-bit estimator and keep the final top-k (docs/design.md 9).

``_rerank_kernel`` decodes each candidate's record (signs, packed magnitudes, fp16 weights,
pool row ``slot * Hkv + head``; candidates arrive as KV slots, so there is no dependent
``req_to_token`` load) and computes ``||q|| * sum_b w_b <v_b, q_b>`` like
:func:`codec.select.estimate_inner_products`, writing float32 estimates with ``-inf`` at
and past each row's count C. :func:`topk_slots` is one ``torch.topk`` over the row and a
gather of the winners' slots. Ties between bit-identical float32 estimates are broken
arbitrarily (codec keeps the earlier candidate); the tests allow exactly that difference.
:func:`rerank_by_keys` is the exact alternative (``--pariskv-rerank keys``): each candidate's
stored key row times its group's mean query.
Where the CUDA kernels build, the workspace runs the rerank fused with the candidate
write instead (csrc/select_rerank.cu, :func:`cuda_ops.select_rerank_cuda`), and the top-k
in CUDA (:func:`cuda_ops.topk_cuda`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_pariskv.codec.levels import magnitude_levels


@triton.jit
def _candidate_block(counts_ptr, CMAX, H: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's block of one (request, KV head) row's candidates: the row r * H + h,
    the request r, the head h, the row's count C, the block's first index, its candidate
    indices [BLOCK_C] and their offsets in the row-major ``[R * H, CMAX]`` candidate and
    estimate arrays."""
    row = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_C
    r = row // H
    c = tl.load(counts_ptr + r)
    idx = first + tl.arange(0, BLOCK_C)
    return row, r, row % H, c, first, idx, row.to(tl.int64) * CMAX + idx


@triton.jit
def _rerank_kernel(
    cand_ptr,
    counts_ptr,
    signs_ptr,
    mags_ptr,
    w_ptr,
    qb_ptr,
    qn_ptr,
    lev_ptr,
    est_ptr,
    CMAX,
    H: tl.constexpr,
    B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row, _, h, c, first, idx, out = _candidate_block(counts_ptr, CMAX, H, BLOCK_C)
    if first < c:
        valid = idx < c
        slot = tl.load(cand_ptr + out, mask=valid, other=0).to(tl.int64)
        rec = slot * H + h
        b = tl.arange(0, B)
        j = tl.arange(0, 8)
        m2 = valid[:, None]
        sg = tl.load(signs_ptr + rec[:, None] * B + b[None, :], mask=m2, other=0).to(tl.int32)
        mb = mags_ptr + rec[:, None] * (3 * B) + 3 * b[None, :]
        word = tl.load(mb, mask=m2, other=0).to(tl.int32)
        word |= tl.load(mb + 1, mask=m2, other=0).to(tl.int32) << 8
        word |= tl.load(mb + 2, mask=m2, other=0).to(tl.int32) << 16
        t = (word[:, :, None] >> (3 * j)[None, None, :]) & 7  # [BLOCK_C, B, 8]
        a = tl.zeros((BLOCK_C, B, 8), dtype=tl.float32)
        for i in tl.static_range(8):
            a = tl.where(t == i, tl.load(lev_ptr + i), a)
        pos_bit = ((sg[:, :, None] >> j[None, None, :]) & 1) == 1
        v = tl.where(pos_bit, a, -a)
        q = tl.load(qb_ptr + row.to(tl.int64) * (B * 8) + b[:, None] * 8 + j[None, :])
        per_block = tl.sum(v * q[None, :, :], axis=2)  # [BLOCK_C, B]
        w = tl.load(w_ptr + rec[:, None] * B + b[None, :], mask=m2, other=0.0).to(tl.float32)
        est = tl.sum(per_block * w, axis=1) * tl.load(qn_ptr + row)
        tl.store(est_ptr + out, tl.where(valid, est, float("-inf")), mask=idx < CMAX)
    else:
        tl.store(est_ptr + out, tl.full((BLOCK_C,), float("-inf"), tl.float32), mask=idx < CMAX)


def rerank_estimates(
    cand: torch.Tensor,
    counts: torch.Tensor,
    signs: torch.Tensor,
    mags: torch.Tensor,
    weights: torch.Tensor,
    query_blocks: torch.Tensor,
    query_norm: torch.Tensor,
    est: torch.Tensor,
    block_c: int = 64,
) -> None:
    """Estimates float32 ``est [R, Hkv, CMAX]`` of candidates ``cand`` (int32 KV slots,
    the first ``counts[r]`` valid; the rest get ``-inf``)."""
    r, h, cmax = cand.shape
    if r == 0:
        return
    b = signs.shape[-1]
    _rerank_kernel[(r * h, triton.cdiv(cmax, block_c))](
        cand,
        counts,
        signs,
        mags,
        weights,
        query_blocks,
        query_norm,
        levels(cand.device),
        est,
        cmax,
        H=h,
        B=b,
        BLOCK_C=block_c,
    )


@triton.jit
def _rerank_keys_kernel(
    cand_ptr,
    counts_ptr,
    keys_ptr,
    q_ptr,
    stride_qr,
    stride_qh,
    est_ptr,
    CMAX,
    H: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    _, r, h, c, first, idx, out = _candidate_block(counts_ptr, CMAX, H, BLOCK_C)
    if first < c:
        valid = idx < c
        d = tl.arange(0, D)
        g = tl.arange(0, BLOCK_G)
        q_rows = q_ptr + r.to(tl.int64) * stride_qr + (h * G + g)[:, None] * stride_qh
        qg = tl.load(q_rows + d[None, :], mask=(g < G)[:, None], other=0.0).to(tl.float32)
        qm = tl.sum(qg, axis=0) / G  # the group's mean query [D]
        slot = tl.load(cand_ptr + out, mask=valid, other=0).to(tl.int64)
        k_rows = keys_ptr + (slot * H + h)[:, None] * D + d[None, :]
        k = tl.load(k_rows, mask=valid[:, None], other=0.0).to(tl.float32)
        est = tl.sum(k * qm[None, :], axis=1)
        tl.store(est_ptr + out, tl.where(valid, est, float("-inf")), mask=idx < CMAX)
    else:
        tl.store(est_ptr + out, tl.full((BLOCK_C,), float("-inf"), tl.float32), mask=idx < CMAX)


def rerank_by_keys(
    cand: torch.Tensor,
    counts: torch.Tensor,
    keys: torch.Tensor,
    query: torch.Tensor,
    est: torch.Tensor,
    block_c: int = 32,
) -> None:
    """Exact scores float32 ``est [R, Hkv, CMAX]`` of candidates ``cand`` (int32 KV slots,
    the first ``counts[r]`` valid; the rest get ``-inf``): the inner product of the key
    stored at each candidate's slot (``keys``, the layer's contiguous ``[slots, Hkv, D]``
    K buffer) with the mean of its group's queries (``query [R, Hq, D]``, rows contiguous)."""
    r, h, cmax = cand.shape
    if r == 0:
        return
    d = keys.shape[-1]
    if not keys.is_contiguous() or keys.shape[1] != h or query.stride(-1) != 1:
        raise ValueError(
            f"rerank_by_keys: keys must be contiguous [slots, {h}, {d}] and the query's rows "
            f"contiguous, got keys {tuple(keys.shape)} and a query of strides {query.stride()}"
        )
    g = query.shape[1] // h
    _rerank_keys_kernel[(r * h, triton.cdiv(cmax, block_c))](
        cand,
        counts,
        keys,
        query,
        query.stride(0),
        query.stride(1),
        est,
        cmax,
        H=h,
        G=g,
        D=d,
        BLOCK_G=triton.next_power_of_2(g),
        BLOCK_C=block_c,
    )


_LEVELS: dict = {}


def levels(device) -> torch.Tensor:
    """The 8 magnitude levels as a cached device tensor (no copy inside a CUDA graph)."""
    key = str(device)
    if key not in _LEVELS:
        _LEVELS[key] = magnitude_levels(torch.float32, device)
    return _LEVELS[key]


def topk_slots(est: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [R, Hkv, k] KV slots of the k best estimates (unordered: the attended set is
    a set). Entries picked from ``-inf`` estimates are garbage: callers use min(k, C)."""
    k = min(k, est.shape[-1])
    idx = torch.topk(est, k, dim=-1, sorted=False).indices
    return torch.gather(cand, -1, idx)
