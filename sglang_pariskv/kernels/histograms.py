"""Per-request centroid histograms from the pool's codes (``index.histograms``).

The encode kernel (:mod:`.encode`) writes codes by slot; these kernels count them per
request from the pool, through ``req_to_token``: :func:`add_to_histograms` when a request
extends (a radix-cache prefix hit's codes are there, slot-keyed), and :func:`count_new_keys`
once per decode layer for the rows above the dense limit (the new key, or every key at the
step a row crosses the limit), or :func:`count_new_keys_layers` once for all layers after a
step whose codes were written after its last layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rebuild_hist_kernel(
    signs_ptr,
    rtt_ptr,
    stride_rtt,
    req_ptr,
    start_ptr,
    end_ptr,
    hist_ptr,
    H: tl.constexpr,
    B: tl.constexpr,
    HBP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    r = tl.program_id(1)
    req = tl.load(req_ptr + r).to(tl.int64)
    pos = tl.load(start_ptr + r) + pid * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = pos < tl.load(end_ptr + r)
    slot = tl.load(rtt_ptr + req * stride_rtt + pos, mask=valid, other=0).to(tl.int64)
    hb = tl.arange(0, HBP)
    m = valid[:, None] & (hb < H * B)[None, :]
    sg = tl.load(signs_ptr + slot[:, None] * (H * B) + hb[None, :], mask=m, other=0)
    hptr = hist_ptr + (req * (H * B) + hb[None, :]) * 256 + sg.to(tl.int32)
    tl.atomic_add(hptr, 1, mask=m, sem="relaxed")


def add_to_histograms(
    signs: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    hist: torch.Tensor,
    max_len: int,
    block_n: int = 128,
) -> None:
    """Add the sign ids of positions [start, end) of each request to ``hist``.

    Extend recounts a request from the pool's codes through ``req_to_token``: a
    radix-cache prefix hit's codes are already there (slot-keyed).
    ``max_len`` bounds end - start (it sizes the grid; the kernel masks the rest).
    """
    _, h, b = signs.shape
    r = req_pool_indices.shape[0]
    if r == 0 or max_len <= 0:
        return
    grid = (triton.cdiv(max_len, block_n), r)
    _rebuild_hist_kernel[grid](
        signs,
        req_to_token,
        req_to_token.stride(0),
        req_pool_indices,
        start,
        end,
        hist,
        H=h,
        B=b,
        HBP=triton.next_power_of_2(h * b),
        BLOCK_N=block_n,
    )


@triton.jit
def _count_row(
    signs_ptr, rtt_ptr, stride_rtt, req_ptr, seq_ptr, hist_ptr, limit, r, part,
    H: tl.constexpr, B: tl.constexpr, HBP: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Part ``part`` of decode row ``r``'s count into one layer's signs / histograms."""
    seq = tl.load(seq_ptr + r)
    # Rows at or below the limit (CUDA-graph padding rows have seq_len 1) count nothing; the
    # step at which a row reaches limit + 1 counts all its tokens, later steps the new one.
    start = tl.where(seq == limit + 1, 0, seq - 1)
    n = tl.where(seq > limit, seq - start, 0)
    req = tl.load(req_ptr + r).to(tl.int64)
    hb = tl.arange(0, HBP)
    for off in range(part * BLOCK_N, n, SPLIT * BLOCK_N):
        pos = start + off + tl.arange(0, BLOCK_N)
        valid = pos < seq
        slot = tl.load(rtt_ptr + req * stride_rtt + pos, mask=valid, other=0).to(tl.int64)
        m = valid[:, None] & (hb < H * B)[None, :]
        sg = tl.load(signs_ptr + slot[:, None] * (H * B) + hb[None, :], mask=m, other=0)
        hptr = hist_ptr + (req * (H * B) + hb[None, :]) * 256 + sg.to(tl.int32)
        tl.atomic_add(hptr, 1, mask=m, sem="relaxed")


@triton.jit
def _count_new_keys_kernel(
    signs_ptr, rtt_ptr, stride_rtt, req_ptr, seq_ptr, hist_ptr, limit,
    H: tl.constexpr, B: tl.constexpr, HBP: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    _count_row(
        signs_ptr, rtt_ptr, stride_rtt, req_ptr, seq_ptr, hist_ptr, limit,
        tl.program_id(0), tl.program_id(1), H, B, HBP, SPLIT, BLOCK_N,
    )  # fmt: skip


@triton.jit
def _count_new_keys_layers_kernel(
    signs_table, rtt_ptr, stride_rtt, req_ptr, seq_ptr, hist_ptr, stride_hl, limit,
    H: tl.constexpr, B: tl.constexpr, HBP: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    layer = tl.program_id(2)
    # this layer's signs, through a table of their addresses; its histograms, by stride
    signs_ptr = tl.load(signs_table + layer).to(tl.pointer_type(tl.uint8))
    _count_row(
        signs_ptr, rtt_ptr, stride_rtt, req_ptr, seq_ptr, hist_ptr + layer * stride_hl, limit,
        tl.program_id(0), tl.program_id(1), H, B, HBP, SPLIT, BLOCK_N,
    )  # fmt: skip


def _count_constants(signs: torch.Tensor, split: int, block_n: int) -> dict:
    """The count kernels' compile-time sizes for pool signs uint8 ``[S, Hkv, B]``."""
    _, h, b = signs.shape
    return dict(H=h, B=b, HBP=triton.next_power_of_2(h * b), SPLIT=split, BLOCK_N=block_n)


def check_count_limit(limit: int) -> None:
    """The dense limit of :func:`count_new_keys` must be >= 1: CUDA-graph padding rows have
    length 1 and must count nothing."""
    if limit < 1:
        raise ValueError(f"limit {limit}: must be >= 1 (CUDA-graph padding rows have length 1)")


def count_new_keys(
    signs: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    hist: torch.Tensor,
    limit: int,
    split: int = 8,
    block_n: int = 32,
) -> None:
    """Bring each decode row's histogram up to date (``RequestHistograms.count_decode``).

    A row whose ``seq_lens`` reaches ``limit + 1`` counts its tokens [0, seq_len) (its
    histogram was zeroed at extend and left alone while it decoded densely); a row above
    that counts its new key, position seq_len - 1; rows at or below ``limit`` count
    nothing. One launch per layer with a grid fixed by the batch size and no host sync, so
    it is CUDA-graph safe; ``split`` programs per row share a catch-up.
    """
    check_count_limit(limit)
    r = req_pool_indices.shape[0]
    if r == 0:
        return
    _count_new_keys_kernel[(r, split)](
        signs, req_to_token, req_to_token.stride(0), req_pool_indices, seq_lens, hist, limit,
        **_count_constants(signs, split, block_n),
    )  # fmt: skip


def count_new_keys_layers(
    signs_table: torch.Tensor,
    signs: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    hist_all: torch.Tensor,
    limit: int,
    split: int = 8,
    block_n: int = 32,
) -> None:
    """:func:`count_new_keys` for every layer in one launch: the count of a dense decode
    step whose codes were written after its last layer (``attention.deferred_codes``).

    ``signs_table``: int64 [layers] addresses of each layer's signs (``address_table``),
    made before capture; ``signs``: one layer's signs, for the shape; ``hist_all``: the
    histograms of all layers, int32 [layers, max_reqs, Hkv, B, 256] contiguous.
    """
    check_count_limit(limit)
    layers, r = hist_all.shape[0], req_pool_indices.shape[0]
    if signs_table.shape != (layers,) or not hist_all[0].is_contiguous():
        raise ValueError(
            f"signs table {tuple(signs_table.shape)} for {layers} layers of histograms "
            "(one address per layer, each layer's histograms contiguous)"
        )
    if r == 0:
        return
    _count_new_keys_layers_kernel[(r, split, layers)](
        signs_table, req_to_token, req_to_token.stride(0), req_pool_indices, seq_lens,
        hist_all, hist_all.stride(0), limit, **_count_constants(signs, split, block_n),
    )  # fmt: skip
