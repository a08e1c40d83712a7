"""Candidate selection, rerank and final top-k (docs/design.md steps 8–9).

Candidates are the C zone keys with the highest integer collision score; among equal
scores the earlier position wins (a stable order, so kernels and oracle agree exactly).
The rerank estimates <k, q> = ||q|| Σ_b w_b <v_b, q_b> from the 3-bit codes (or, with
``rerank="keys"``, computes the exact group-mean q·k from the stored keys) and keeps the
best ``topk`` candidates.
"""

from __future__ import annotations

import torch

from sglang_pariskv.codec.encode import KeyCodes, decode_directions
from sglang_pariskv.codec.query import PreparedQuery


def zone_mask(n: int, start: int, end: torch.Tensor) -> torch.Tensor:
    """bool [R, n]: position p is in [start, end[r])."""
    pos = torch.arange(n, device=end.device)[None, :]
    return (pos >= start) & (pos < end[:, None])


def select_candidates(
    scores: torch.Tensor, in_zone: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``counts[r]`` zone positions by score, per (request, head).

    scores int [R, N, H]; in_zone bool [R, N]; counts int [R].
    Returns (positions int64 [R, H, Cmax], valid bool [R, H, Cmax]), Cmax = max(counts).
    """
    masked = torch.where(in_zone[:, :, None], scores.to(torch.int64), -1)
    order = torch.sort(masked.transpose(1, 2), dim=-1, descending=True, stable=True).indices
    cmax = int(counts.max()) if counts.numel() else 0
    pos = order[..., :cmax]
    valid = torch.arange(cmax, device=scores.device)[None, None, :] < counts[:, None, None]
    return pos, valid.expand_as(pos)


def estimate_inner_products(
    codes: KeyCodes, query_blocks: torch.Tensor, query_norm: torch.Tensor
) -> torch.Tensor:
    """RSQ-IP estimate of <k, q> = ||q|| Σ_b w_b <v_b, q_b>, float32.

    codes has leading shape S; query_blocks [..., B, 8] and query_norm [...] broadcast
    against S (``query_norm`` is the norm of the query the blocks came from, so the
    estimate is of the raw inner product).
    """
    v = decode_directions(codes)  # [*S, B, 8]
    per_block = (v * query_blocks.to(v.dtype)).sum(-1)  # [*S, B]
    return (per_block * codes.weights.to(v.dtype)).sum(-1) * query_norm.to(v.dtype)


def rerank_topk(
    codes: KeyCodes,
    query: PreparedQuery,
    positions: torch.Tensor,
    valid: torch.Tensor,
    topk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``topk`` candidates with the highest estimated <k, q>.

    codes [R, N, H, ...] (all keys of each request); positions / valid [R, H, C] from
    :func:`select_candidates`. Returns (positions [R, H, k'], valid [R, H, k']) with
    k' = min(topk, C), best first; ties keep the earlier candidate.
    """
    cand = codes.index(*candidate_index(positions))  # [R, H, C, ...]
    est = estimate_inner_products(cand, query.blocks[:, :, None], query.norm[..., None])
    return keep_best(est, positions, valid, topk)


def rerank_topk_by_keys(
    keys: torch.Tensor,
    mean_query: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    topk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rerank_topk` with the exact inner products of the stored keys ``[R, N, H, D]``
    and the group-mean queries ``[R, H, D]`` (float64 when the keys are)."""
    dt = torch.float64 if keys.dtype == torch.float64 else torch.float32
    cand = keys[candidate_index(positions)].to(dt)  # [R, H, C, D]
    est = (cand * mean_query.to(dt)[:, :, None]).sum(-1)
    return keep_best(est, positions, valid, topk)


def candidate_index(positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(request, position, head) index tensors, each [R, H, C], that pick each candidate of
    ``positions [R, H, C]`` from a per-request ``[R, N, H, ...]`` tensor."""
    r, h, c = positions.shape
    heads = torch.arange(h, device=positions.device)[None, :, None].expand(r, h, c)
    reqs = torch.arange(r, device=positions.device)[:, None, None].expand(r, h, c)
    return reqs, positions, heads


def keep_best(
    est: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``topk`` valid candidates of highest ``est`` [R, H, C], best first, ties to the
    earlier candidate: (positions, valid), each [R, H, min(topk, C)]."""
    est = torch.where(valid, est, float("-inf"))
    k = min(topk, positions.shape[-1])
    order = torch.sort(est, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.gather(positions, -1, order), torch.gather(valid, -1, order)
