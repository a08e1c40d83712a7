"""One decode step of ParisKV retrieval, end to end, in plain torch.

This is the executable spec: every GPU kernel is tested against it. Inputs are padded
per request (token-major, like SGLang's KV pool gathered through ``req_to_token``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_pariskv.codec.budget import candidate_ratios, num_candidates, zone_lengths
from sglang_pariskv.codec.collision import centroid_table, collision_scores
from sglang_pariskv.codec.encode import KeyCodes
from sglang_pariskv.codec.query import group_queries, prepare_query
from sglang_pariskv.codec.select import (
    rerank_topk,
    rerank_topk_by_keys,
    select_candidates,
    zone_mask,
)
from sglang_pariskv.config import ParisKVConfig


@dataclass
class Retrieval:
    """The attended set of one decode step, per (request, KV head)."""

    positions: torch.Tensor  #: int64 [R, Hkv, M]: token positions (sink, local, top-k)
    valid: torch.Tensor  #: bool [R, Hkv, M]
    dense: torch.Tensor  #: bool [R]: request attended densely
    num_candidates: torch.Tensor  #: int64 [R]: candidates kept by the collision stage


def retrieve(
    query: torch.Tensor,
    codes: KeyCodes,
    seq_lens: torch.Tensor,
    config: ParisKVConfig,
    scale: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> Retrieval:
    """Pick the attended token positions for decode queries ``[R, Hq, D]``.

    codes: [R, N, Hkv, ...] codes of every request's keys (positions >= seq_len ignored;
    with ``config.rerank == "keys"`` only the signs are read); scale: the calibration's
    channel scales [Hkv, D] the codes were encoded with (None: 1); keys: the stored keys
    [R, N, Hkv, D] themselves, which ``config.rerank == "keys"`` ranks the candidates by.
    """
    r, n, hkv, _ = codes.signs.shape
    dev = codes.signs.device
    seq_lens = seq_lens.to(device=dev, dtype=torch.int64)
    dense = torch.tensor([config.is_dense(int(s)) for s in seq_lens], device=dev)
    zone = zone_lengths(seq_lens, config)
    zone = torch.where(dense, 0, zone)
    counts = num_candidates(zone, candidate_ratios(zone, config), config)

    q = prepare_query(query, hkv, config.rotation_seed, scale)
    scores = collision_scores(codes.signs, centroid_table(q.blocks))
    in_zone = zone_mask(n, config.sink, config.sink + zone)
    cand_pos, cand_valid = select_candidates(scores, in_zone, counts)
    if config.rerank == "keys":
        if keys is None:
            raise ValueError('rerank "keys" ranks candidates by the stored keys: pass keys')
        dt = torch.float64 if query.dtype == torch.float64 else torch.float32
        mean = group_queries(query.to(dt), hkv).mean(dim=2)
        top_pos, top_valid = rerank_topk_by_keys(keys, mean, cand_pos, cand_valid, config.topk)
    else:
        top_pos, top_valid = rerank_topk(codes, q, cand_pos, cand_valid, config.topk)

    # Sink and local window, per request (absent where the request is dense).
    sink = torch.arange(config.sink, device=dev)[None, :].expand(r, -1)
    sink_valid = (sink < seq_lens[:, None]) & ~dense[:, None]
    local = (seq_lens - config.local)[:, None] + torch.arange(config.local, device=dev)
    local_valid = (local >= config.sink) & ~dense[:, None]
    sparse_pos = torch.cat(
        [sink[:, None].expand(r, hkv, -1), local[:, None].expand(r, hkv, -1), top_pos], -1
    )
    sparse_valid = torch.cat(
        [
            sink_valid[:, None].expand(r, hkv, -1),
            local_valid[:, None].expand(r, hkv, -1),
            top_valid & ~dense[:, None, None],
        ],
        -1,
    )
    dense_len = int(torch.where(dense, seq_lens, 0).max()) if r else 0
    m = max(sparse_pos.shape[-1], dense_len)
    positions = torch.full((r, hkv, m), -1, dtype=torch.int64, device=dev)
    valid = torch.zeros((r, hkv, m), dtype=torch.bool, device=dev)
    positions[..., : sparse_pos.shape[-1]] = torch.where(sparse_valid, sparse_pos, -1)
    valid[..., : sparse_pos.shape[-1]] = sparse_valid
    if dense_len:
        all_pos = torch.arange(dense_len, device=dev)
        dense_valid = dense[:, None] & (all_pos[None, :] < seq_lens[:, None])
        rows = dense.nonzero().squeeze(-1)
        positions[rows] = -1
        valid[rows] = False
        positions[rows, :, :dense_len] = torch.where(dense_valid[rows], all_pos, -1)[:, None]
        valid[rows, :, :dense_len] = dense_valid[rows][:, None]
    return Retrieval(positions=positions, valid=valid, dense=dense, num_candidates=counts)
