"""Index assembly: sink + local window + top-k -> FlashInfer ``kv_indices`` (docs/design.md 10).

"Head as batch" layout: the K/V pool ``[slots, Hkv, D]`` is viewed as ``[slots * Hkv, 1, D]``
(page size 1, one KV head), a (request, KV head) pair is one batch row with the GQA group
as its query heads, and row ``r * Hkv + h`` lists ``slot * Hkv + h`` for its attended
tokens. A dense request (``ParisKVConfig.is_dense``) gets a one-token row (its first
token): the SGLang backend attends it through its own dense decode call and discards that
row, so neither the index buffer nor the sparse call pays for its length.

Row lengths depend only on sequence lengths (a sparse row always holds exactly
``config.budget`` tokens, because a request is sparse only when its zone exceeds top-k),
so :func:`kv_indptr_for` computes ``kv_indptr`` on the host at plan time, where
FlashInfer's plan needs it, before any retrieval ran.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_pariskv.codec.budget import dense_mask
from sglang_pariskv.config import ParisKVConfig


def row_lengths(seq_lens: torch.Tensor, config: ParisKVConfig) -> torch.Tensor:
    """Row length per request (int64 [R]): 1 if dense, else sink + local + top-k."""
    seq = seq_lens.to(torch.int64)
    return torch.where(dense_mask(seq, config), 1, config.budget)


def kv_indptr_for(seq_lens: torch.Tensor, config: ParisKVConfig, num_kv_heads: int) -> torch.Tensor:
    """int32 [R * Hkv + 1] row offsets of the head-as-batch layout."""
    lens = row_lengths(seq_lens, config).repeat_interleave(num_kv_heads)
    out = torch.empty(lens.numel() + 1, dtype=torch.int32, device=seq_lens.device)
    out[:1].zero_()
    torch.cumsum(lens, 0, dtype=torch.int32, out=out[1:])
    return out


@triton.jit
def _assemble_kernel(
    rtt_ptr,
    stride_rtt,
    req_ptr,
    seq_ptr,
    dense_ptr,
    top_ptr,
    indptr_ptr,
    out_ptr,
    K,
    H: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    r = row // H
    h = row % H
    start = tl.load(indptr_ptr + row)
    length = tl.load(indptr_ptr + row + 1) - start
    if blk * BLOCK < length:
        i = blk * BLOCK + tl.arange(0, BLOCK)
        valid = i < length
        seq = tl.load(seq_ptr + r).to(tl.int32)
        dense = tl.load(dense_ptr + r)
        j = i - SINK - LOCAL
        is_top = (j >= 0) & (dense == 0)
        req = tl.load(req_ptr + r).to(tl.int64)
        top = tl.load(top_ptr + row.to(tl.int64) * K + j, mask=valid & is_top, other=0)
        pos = tl.where(i < SINK, i, seq - LOCAL + (i - SINK))
        pos = tl.where(dense != 0, i, pos)
        slot = tl.load(rtt_ptr + req * stride_rtt + pos, mask=valid & ~is_top, other=0)
        slot = tl.where(is_top, top, slot)
        tl.store(out_ptr + start + i, slot * H + h, mask=valid)


def assemble_indices(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    dense: torch.Tensor,
    top_slots: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    config: ParisKVConfig,
    max_row: int,
    block: int = 512,
) -> None:
    """Write ``kv_indices`` (int32) of every row; ``top_slots`` int32 [R, Hkv, K] holds
    each sparse row's top-k KV slots (K >= config.topk)."""
    r, h, k = top_slots.shape
    if r == 0:
        return
    _assemble_kernel[(r * h, triton.cdiv(max_row, block))](
        req_to_token,
        req_to_token.stride(0),
        req_pool_indices,
        seq_lens,
        dense,
        top_slots,
        kv_indptr,
        kv_indices,
        k,
        H=h,
        SINK=config.sink,
        LOCAL=config.local,
        BLOCK=block,
    )
