"""Collision stage (docs/design.md step 7): centroid histograms, tiers and integer key scores.

The 256 sign patterns of an 8-dim block are fixed centroids c = s / sqrt(8). For a query
block, centroids are ranked by <c, q_b>; walking down that ranking, a centroid is in tier
t when the keys of all better-ranked centroids number fewer than T_t. The tiers are
nested, so a key earns, per block, the number of tiers its sign id falls in (0..6), and
its score is the sum over blocks, an integer in [0, 6B]. Counting keys (not centroids)
makes the tiers adapt to how keys actually cluster in this request.
"""

from __future__ import annotations

import torch

from sglang_pariskv.codec.encode import unpack_signs

NUM_CENTROIDS = 256


def centroid_vectors(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """[256, 8]: row c is the sign pattern of id c, scaled to unit norm."""
    ids = torch.arange(NUM_CENTROIDS, dtype=torch.int32, device=device)
    return (unpack_signs(ids.to(torch.uint8)) / 8**0.5).to(dtype)


def centroid_histogram(signs: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Count sign ids per (request, head, block) over each request's first seq_len keys.

    signs: uint8 [R, N, H, B]; returns int32 [R, H, B, 256].
    """
    r, n, h, b = signs.shape
    valid = torch.arange(n, device=signs.device)[None, :] < seq_lens.to(signs.device)[:, None]
    # Flat bin of (request, head, block, id); bincount keeps memory at O(keys).
    base = (
        torch.arange(r, device=signs.device)[:, None, None] * h
        + torch.arange(h, device=signs.device)[None, :, None]
    ) * b
    base = (base + torch.arange(b, device=signs.device)[None, None, :]) * NUM_CENTROIDS
    bins = base[:, None] + signs.to(torch.int64)  # [R, N, H, B]
    counts = torch.bincount(bins[valid].reshape(-1), minlength=r * h * b * NUM_CENTROIDS)
    return counts.reshape(r, h, b, NUM_CENTROIDS).to(torch.int32)


def centroid_tiers(
    query_blocks: torch.Tensor, hist: torch.Tensor, thresholds: torch.Tensor
) -> torch.Tensor:
    """How many tiers each centroid belongs to: int64 [R, H, B, 256] in [0, num_tiers].

    query_blocks [R, H, B, 8]; hist [R, H, B, 256]; thresholds [R, num_tiers] (T_t).
    Ties in centroid score rank the lower id first.
    """
    scores = query_blocks.to(torch.float64) @ centroid_vectors(torch.float64, query_blocks.device).T
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    counts = torch.gather(hist.to(torch.int64), -1, order)
    preceding = torch.cumsum(counts, dim=-1) - counts  # keys of better-ranked centroids
    thr = thresholds[:, None, None, None, :]  # [R, 1, 1, 1, T]
    in_tiers = (preceding[..., None] < thr).sum(-1)
    return torch.empty_like(in_tiers).scatter_(-1, order, in_tiers)


def collision_scores(signs: torch.Tensor, tiers: torch.Tensor) -> torch.Tensor:
    """Per-key score Σ_b tiers[id_b]: signs uint8 [R, N, H, B] -> int64 [R, N, H]."""
    r, n, h, b = signs.shape
    t = tiers[:, None].expand(r, n, h, b, NUM_CENTROIDS)
    return torch.gather(t, -1, signs.to(torch.int64)[..., None]).squeeze(-1).sum(-1)
