"""Kept collision scores: the row of the score buffer each request of a decode step uses.

Sliced re-scoring (``kernels/collision.py``) re-scores one slice of a request's context
per step and reads the rest from the step before, so a request needs rows of the score
buffer that stay its own while it decodes, whatever its position in the batch (SGLang
moves rows when requests finish or join). :class:`KeptScoreRows` owns ``kept`` rows per
layer and hands them out by request (its ``req_to_token`` row); a request without one
(more sparse requests than kept rows, or a dense one) scores into a scratch row, its
batch position's, and re-scores everything.

:meth:`KeptScoreRows.assign` is one launch per step on the device (no host sync, so a
CUDA graph replays it): a request that owns a row keeps it, and re-scores everything
unless that row was last assigned at the step before (its sequence length one less);
the others take rows no request of the step owns, in batch order, and re-score
everything. :meth:`forget` drops the rows of requests SGLang (re)fills by prefill, so a
``req_to_token`` row handed to a new request never inherits the old one's scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Memory the kept scores may take per GPU (a byte per position, KV head and layer): 16
#: requests of 128K at the Llama-3.1-8B shape (32 layers x 8 KV heads), 4 of 1M at the
#: Qwen2.5-7B-1M shape (28 x 4), a request per decode slot at 32K contexts.
KEPT_SCORES_BYTES = 512 * 2**20


def kept_rows_for(max_batch: int, layers: int, kv_heads: int, max_context: int) -> int:
    """Requests whose scores a sliced scan keeps: as many as :data:`KEPT_SCORES_BYTES`
    holds, at least 1 and at most ``max_batch``."""
    per_request = max(layers * kv_heads * max_context, 1)
    return max(1, min(max_batch, KEPT_SCORES_BYTES // per_request))


@triton.jit
def _assign_kernel(
    rpi_ptr,
    seq_ptr,
    dense_ptr,
    owner_ptr,
    last_ptr,
    rows_ptr,
    fresh_ptr,
    R,
    K,
    LAYERS,
    RMAX,
    RB: tl.constexpr,
    KB: tl.constexpr,
):
    r = tl.arange(0, RB)
    k = tl.arange(0, KB)
    rv = r < R
    kv = k < K
    rpi = tl.load(rpi_ptr + r, mask=rv, other=-2)
    seq = tl.load(seq_ptr + r, mask=rv, other=0)
    want = rv & (tl.load(dense_ptr + r, mask=rv, other=1) == 0)
    owner = tl.load(owner_ptr + k, mask=kv, other=-1)
    last = tl.load(last_ptr + k, mask=kv, other=-1)
    mine = want[:, None] & kv[None, :] & (owner[None, :] == rpi[:, None])  # [RB, KB]
    own = tl.max(tl.where(mine, k[None, :], -1), axis=1)
    own_last = tl.max(tl.where(mine, last[None, :], -1), axis=1)
    free = kv & (tl.max(mine.to(tl.int32), axis=0) == 0)
    need = want & (own < 0)
    free_i, need_i = free.to(tl.int32), need.to(tl.int32)
    free_rank = tl.cumsum(free_i, 0) - free_i
    need_rank = tl.cumsum(need_i, 0) - need_i
    give = need[:, None] & free[None, :] & (free_rank[None, :] == need_rank[:, None])
    row = tl.where(own >= 0, own, tl.max(tl.where(give, k[None, :], -1), axis=1))
    fresh = (own < 0) | (own_last != seq - 1)
    tl.store(fresh_ptr + r, fresh.to(tl.int32), mask=rv)
    held = rv & (row >= 0)
    tl.store(owner_ptr + row, rpi, mask=held)
    tl.store(last_ptr + row, seq, mask=held)
    for layer in range(LAYERS):
        out = tl.where(row >= 0, layer * K + row, LAYERS * K + r)
        tl.store(rows_ptr + layer * RMAX + r, out.to(tl.int32), mask=rv)


class KeptScoreRows:
    """Which rows of a ``[layers * kept + max_batch, Hkv, NMAX]`` score buffer each request
    of a step reads and writes: layer l's kept row k is ``l * kept + k``, batch position
    r's scratch row ``layers * kept + r``."""

    def __init__(self, layers: int, kept: int, max_batch: int, device: torch.device) -> None:
        self.layers, self.kept, self.max_batch = layers, kept, max_batch
        i32 = dict(dtype=torch.int32, device=device)
        #: [layers, max_batch]: the row of each request, per layer (:meth:`assign`).
        self.rows = torch.zeros(layers, max_batch, **i32)
        #: [max_batch]: 1 where a request re-scores every position this step.
        self.fresh = torch.ones(max_batch, **i32)
        #: The rows of a step that keeps nothing: scratch rows, every position re-scored.
        self.scratch = torch.arange(max_batch, **i32) + layers * kept
        self.owner = torch.full((max(kept, 1),), -1, **i32)  # req_to_token row, -1 none
        self.last_seq = torch.full((max(kept, 1),), -1, dtype=torch.int64, device=device)

    @property
    def buffer_rows(self) -> int:
        return self.layers * self.kept + self.max_batch

    def assign(
        self, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, dense: torch.Tensor
    ) -> None:
        """Rows and fresh flags of a step's ``R`` requests (``req_pool_indices`` int32,
        ``seq_lens`` and ``dense`` int64, all [R] on the device)."""
        r = req_pool_indices.numel()
        if r == 0 or self.kept == 0:
            self.rows[:, :r].copy_(self.scratch[:r].expand(self.layers, r))
            self.fresh[:r].fill_(1)
            return
        _assign_kernel[(1,)](
            req_pool_indices,
            seq_lens,
            dense,
            self.owner,
            self.last_seq,
            self.rows,
            self.fresh,
            r,
            self.kept,
            self.layers,
            self.max_batch,
            RB=triton.next_power_of_2(r),
            KB=triton.next_power_of_2(self.kept),
        )

    def forget(self, req_pool_indices: torch.Tensor) -> None:
        """Release the rows these ``req_to_token`` rows own (their requests are prefilled
        anew)."""
        if self.kept == 0 or req_pool_indices.numel() == 0:
            return
        gone = torch.isin(self.owner, req_pool_indices.to(self.owner.dtype))
        self.owner.masked_fill_(gone, -1)
