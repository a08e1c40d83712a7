"""Collision scan: byte key scores through ``req_to_token`` plus a score histogram.

The one pass over every token of every request (docs/design.md 7-8), so it is the part that must
run at HBM speed. A program owns a contiguous run of positions of one request and reads
whole pool rows (all heads of a token, ``Hkv * B`` contiguous sign bytes), looks each sign
id up in the request's centroid table (``[Hkv, B, 256]`` int8, small enough to stay in
L1), sums per head, writes the score ``128 + floor(sum / B)`` as uint8
(:func:`codec.collision.collision_scores`) and counts zone scores into a per-(request,
head) histogram held in registers, flushed with one atomic add per bin at the end.
Candidate selection then only needs the histogram and a light pass over the uint8 scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scan_kernel(
    signs_ptr,
    rtt_ptr,
    stride_rtt,
    req_ptr,
    seq_ptr,
    zend_ptr,
    table_ptr,
    scores_ptr,
    shist_ptr,
    zone_start,
    NMAX,
    H: tl.constexpr,
    B: tl.constexpr,
    HP: tl.constexpr,
    NBP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILES: tl.constexpr,
):
    chunk = tl.program_id(0)
    r = tl.program_id(1)
    seq = tl.load(seq_ptr + r)
    start = chunk * (BLOCK_N * TILES)
    if start < seq:
        req = tl.load(req_ptr + r).to(tl.int64)
        zend = tl.load(zend_ptr + r)
        h = tl.arange(0, HP)
        b = tl.arange(0, B)
        hb = h[:, None] * B + b[None, :]  # [HP, B]
        hmask = h < H
        table_base = table_ptr + (r * (H * B) + hb).to(tl.int64) * 256  # [HP, B]
        acc = tl.zeros((2 * HP * NBP,), dtype=tl.int32)
        for i in range(TILES):
            pos = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = pos < seq
            slot = tl.load(rtt_ptr + req * stride_rtt + pos, mask=valid, other=0).to(tl.int64)
            m3 = valid[:, None, None] & hmask[None, :, None]
            sg = tl.load(
                signs_ptr + slot[:, None, None] * (H * B) + hb[None, :, :], mask=m3, other=0
            )
            entry = tl.load(table_base[None, :, :] + sg.to(tl.int32), mask=m3, other=0)
            total = tl.sum(entry.to(tl.int32), axis=2)  # [BLOCK_N, HP], |total| <= 127 B
            score = (total + 128 * B) // B  # a non-negative numerator: floor
            smask = valid[:, None] & hmask[None, :]
            tl.store(
                scores_ptr + (r * H + h[None, :]).to(tl.int64) * NMAX + pos[:, None],
                score.to(tl.uint8),
                mask=smask,
            )
            in_zone = (pos >= zone_start) & (pos < zend)
            # Out-of-zone entries go to a dump bin in an upper half that is dropped
            # (tl.histogram's mask argument is ignored by the GPU lowering in Triton 3.6).
            zm = in_zone[:, None] & hmask[None, :]
            key = tl.where(zm, h[None, :] * NBP + score, HP * NBP)
            acc += tl.histogram(tl.reshape(key, (BLOCK_N * HP,)), 2 * HP * NBP)
        bins = tl.arange(0, 2 * HP * NBP)
        tl.atomic_add(
            shist_ptr + r * (H * NBP) + bins,
            acc,
            mask=(bins < H * NBP) & (acc > 0),
            sem="relaxed",
        )


def collision_scan(
    signs: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    zone_end: torch.Tensor,
    table: torch.Tensor,
    scores: torch.Tensor,
    score_hist: torch.Tensor,
    zone_start: int,
    block_n: int = 64,
    tiles: int = 16,
) -> None:
    """Scores uint8 ``[R, Hkv, NMAX]`` of positions < seq_len and the zone score histogram.

    signs uint8 pool ``[S, Hkv, B]``; table int8 ``[R, Hkv, B, 256]``; zone is positions
    ``[zone_start, zone_end[r])``; score_hist int32 ``[R, Hkv, 256]`` must be zeroed by the
    caller (it is accumulated). Fixed grid over ``NMAX``: programs past a request's length
    exit at once, so it replays in a CUDA graph for any lengths <= NMAX. ``block_n``
    positions per tile, ``tiles`` tiles per program.
    """
    _, h, b = signs.shape
    r, _, nmax = scores.shape
    if r == 0:
        return
    nbp = score_hist.shape[-1]
    grid = (triton.cdiv(nmax, block_n * tiles), r)
    _scan_kernel[grid](
        signs,
        req_to_token,
        req_to_token.stride(0),
        req_pool_indices,
        seq_lens,
        zone_end,
        table,
        scores,
        score_hist,
        zone_start,
        nmax,
        H=h,
        B=b,
        HP=triton.next_power_of_2(h),
        NBP=nbp,
        BLOCK_N=block_n,
        TILES=tiles,
        num_warps=4,
    )
