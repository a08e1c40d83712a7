"""Collision stage (docs/design.md step 7): a centroid table per query block, integer key scores.

Every key block's sign id names one of 256 fixed centroids c = s / sqrt(8). For a query
block q_b, the table holds each centroid's inner product <s, q_b>, quantized to int8 with
one scale per (request, KV head): 127 for the largest |<s, q_b>| over the head's blocks.
A key's score is the sum over its B blocks of its centroids' entries, an estimate of
<sign(k), q> up to that scale, stored as ``128 + floor(sum / B)`` (a byte, 1..255).

Why inner products, not ranks or counts: the table depends on the query alone, so nothing
per request is kept or updated as keys arrive (a slot's code is all its key contributes),
and on real keys it keeps more of the true top-k than ranking centroids by key counts
(docs/retrieval_quality.md, "Candidate scores").
"""

from __future__ import annotations

import torch

from sglang_pariskv.codec.encode import unpack_signs

NUM_CENTROIDS = 256
#: Largest |entry| of a centroid table (int8).
TABLE_MAX = 127
#: Added to the floored mean entry so that a score fits a byte: 128 + [-127, 127].
SCORE_OFFSET = 128
#: Distinct key scores (the score histogram's bins): 0..255, of which 1..255 occur.
SCORE_BINS = 256


def centroid_signs(dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """[256, 8]: row c is the sign pattern (+-1) of id c (bit j set: +1 in coordinate j)."""
    ids = torch.arange(NUM_CENTROIDS, dtype=torch.int32, device=device)
    return unpack_signs(ids.to(torch.uint8)).to(dtype)


def centroid_table(query_blocks: torch.Tensor) -> torch.Tensor:
    """int8 [R, H, B, 256]: round(127 * <s_c, q_b> / S) with S = max_b sum_j |q_bj|.

    ``query_blocks`` [R, H, B, 8] (fp32, as the kernels hold them). <s_c, q_b> is summed
    in float64 in the order j = 0..7, the kernels' order: for fp32 inputs every partial sum
    is exact, so the kernels reproduce the table bit for bit. S is the largest entry's
    magnitude (the centroid of q_b's own signs) over the head's blocks; rounding is
    floor(x + 0.5). A zero query gives a zero table.
    """
    q = query_blocks.to(torch.float64)
    signs = centroid_signs(torch.float64, q.device)  # [256, 8]
    dots = torch.zeros(*q.shape[:-1], NUM_CENTROIDS, dtype=torch.float64, device=q.device)
    for j in range(8):  # fixed order, no fused multiply-add: bit-identical to the kernels
        dots = dots + signs[:, j] * q[..., j : j + 1]
    big = q.abs().sum(-1).amax(-1)  # [R, H]: S
    safe = torch.where(big > 0, big, 1.0)[..., None, None]
    table = torch.floor(TABLE_MAX * dots / safe + 0.5)
    return torch.where(big[..., None, None] > 0, table, 0.0).to(torch.int8)


def collision_scores(signs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per-key score ``128 + floor(sum_b table[id_b] / B)``: signs uint8 [R, N, H, B],
    table int8 [R, H, B, 256] -> int64 [R, N, H] in 1..255."""
    r, n, h, b = signs.shape
    t = table.to(torch.int64)[:, None].expand(r, n, h, b, NUM_CENTROIDS)
    total = torch.gather(t, -1, signs.to(torch.int64)[..., None]).squeeze(-1).sum(-1)
    return scores_from_totals(total, b)


def scores_from_totals(total: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The stored score of table sums ``total`` (int, |total| <= 127 B): one byte."""
    return torch.div(total + SCORE_OFFSET * num_blocks, num_blocks, rounding_mode="floor")
