"""Rerank candidates with the 3-bit estimator and keep the final top-k (DESIGN.md 9).

``_rerank_kernel`` decodes each candidate's record (signs, packed magnitudes, fp16 weights,
pool row ``slot * Hkv + head``; candidates arrive as KV slots, so there is no dependent
``req_to_token`` load) and computes ``||q|| * sum_b w_b <v_b, q_b>`` like
:func:`codec.select.estimate_inner_products`. It writes a sortable int64 key: the
estimate's order-preserving int32 image in the high word and ``~slot`` in the low word,
so one ``torch.topk`` gives a deterministic top-k, ties broken by lower slot (codec breaks
them by candidate order: the two differ only for candidates whose float32 estimates are
bit-identical).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_pariskv.codec.levels import magnitude_levels

#: Key of an empty candidate slot: below every real key.
EMPTY_KEY = -(2**31 - 1) * 2**32


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
    key_ptr,
    est_ptr,
    CMAX,
    H: tl.constexpr,
    B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WRITE_EST: tl.constexpr,
    EMPTY: tl.constexpr,
):
    row = tl.program_id(0)  # r * H + h
    blk = tl.program_id(1)
    r = row // H
    h = row % H
    c = tl.load(counts_ptr + r)
    idx = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    out = row.to(tl.int64) * CMAX + idx
    if blk * BLOCK_C < c:
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
        if WRITE_EST:
            tl.store(est_ptr + out, est, mask=valid)
        bits = est.to(tl.int32, bitcast=True)
        okey = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # order-preserving int32
        low = (tl.full((BLOCK_C,), 1, tl.int64) << 32) - 1 - slot  # ~slot, 32 bit
        key = (okey.to(tl.int64) << 32) | low
        tl.store(key_ptr + out, tl.where(valid, key, EMPTY), mask=idx < CMAX)
    else:
        tl.store(key_ptr + out, tl.full((BLOCK_C,), EMPTY, tl.int64), mask=idx < CMAX)


def rerank_keys(
    cand: torch.Tensor,
    counts: torch.Tensor,
    signs: torch.Tensor,
    mags: torch.Tensor,
    weights: torch.Tensor,
    query_blocks: torch.Tensor,
    query_norm: torch.Tensor,
    keys: torch.Tensor,
    est: torch.Tensor | None = None,
    block_c: int = 64,
) -> None:
    """Sort keys int64 ``[R, Hkv, CMAX]`` of candidates ``cand`` (int32 KV slots, first
    ``counts[r]`` valid); empty entries get :data:`EMPTY_KEY`. ``est`` (float32, same
    shape), when given, receives the raw estimates (for tests)."""
    r, h, cmax = cand.shape
    if r == 0:
        return
    b = signs.shape[-1]
    lev = _levels(cand.device)
    _rerank_kernel[(r * h, triton.cdiv(cmax, block_c))](
        cand,
        counts,
        signs,
        mags,
        weights,
        query_blocks,
        query_norm,
        lev,
        keys,
        est if est is not None else keys,
        cmax,
        H=h,
        B=b,
        BLOCK_C=block_c,
        WRITE_EST=est is not None,
        EMPTY=EMPTY_KEY,
    )


_LEVELS: dict = {}


def _levels(device) -> torch.Tensor:
    key = str(device)
    if key not in _LEVELS:
        _LEVELS[key] = magnitude_levels(torch.float32, device)
    return _LEVELS[key]


def topk_slots(keys: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [R, Hkv, k] KV slots of the k largest keys (unordered; the attended set is a
    set). Entries that came from empty keys are garbage: callers use min(k, C) of them."""
    k = min(k, keys.shape[-1])
    top = torch.topk(keys, k, dim=-1, sorted=False).values
    return (0xFFFFFFFF - (top & 0xFFFFFFFF)).to(torch.int32)
