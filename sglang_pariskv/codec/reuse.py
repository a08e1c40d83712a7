"""Retrieval reuse (LouisKV-style) in plain torch: the specification of the serving path.

The keys a decode query needs change little from one step to the next while the query
itself barely moves. So each request keeps, per layer and KV head, the ``reuse_keep * k``
best candidates of its last retrieval (by rerank estimate) and the retrieval query (the
GQA group mean, rotated and normalised: see :mod:`codec.query`) they were retrieved for.
A step retrieves again when

* nothing is kept (a new request, or one that was dense until now),
* ``max_age`` tokens or more were decoded since the kept retrieval, or
* the cosine between the new and the kept query of some KV head falls below
  ``threshold`` (granularity "layer": one decision for all KV heads of the request's
  layer, what the serving kernels skip together; "head": one per KV head);

otherwise it keeps the kept set. Every sparse step attends sink ∪ the current local
window ∪ the top-k of its kept set by its own query's rerank estimates (at a retrieval,
the top-k of all candidates: the best of the kept set), so a reused selection still
follows the query among the kept keys; with ``reuse_keep`` 1 it is the kept top-k as
retrieved. The kept positions all lie before the kept step's window, so they never
overlap the current window; tokens newer than the kept retrieval join through the window
as it moves, and the tokens that slid out of the window since then (fewer than
``max_age``) are attended again at the next retrieval.

The group mean is the query whose inner product with each key is the group's mean logit,
which is what the top-k ranks; its cosine therefore measures how far the ranking can have
moved, for the whole group at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_pariskv.codec.encode import KeyCodes
from sglang_pariskv.codec.pipeline import Retrieval, assemble, retrieval_candidates
from sglang_pariskv.codec.query import prepare_query
from sglang_pariskv.codec.select import rerank_topk
from sglang_pariskv.config import ParisKVConfig

GRANULARITIES = ("layer", "head")


@dataclass
class KeptSelection:
    """What one layer keeps per request between steps."""

    query: torch.Tensor  #: float [R, Hkv, D]: unit rotated retrieval query of the kept set
    top: torch.Tensor  #: int64 [R, Hkv, W]: kept positions (W = ``reuse_kept``; -1: none)
    seq: torch.Tensor  #: int64 [R, Hkv]: sequence length when retrieved; -1: nothing kept

    @staticmethod
    def empty(r: int, hkv: int, d: int, width: int, device="cpu") -> KeptSelection:
        return KeptSelection(
            query=torch.zeros(r, hkv, d, device=device),
            top=torch.full((r, hkv, width), -1, dtype=torch.int64, device=device),
            seq=torch.full((r, hkv), -1, dtype=torch.int64, device=device),
        )


def unit_query(
    query: torch.Tensor, num_kv_heads: int, seed: int, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The rotated unit group-mean query [R, Hkv, D] of decode queries [R, Hq, D] (with the
    calibration's channel scales [Hkv, D], as retrieval prepares it)."""
    return prepare_query(query, num_kv_heads, seed, scale).blocks.flatten(-2)


def needs_retrieval(
    unit: torch.Tensor,
    kept: KeptSelection,
    seq_lens: torch.Tensor,
    threshold: float,
    max_age: int,
    granularity: str = "layer",
) -> torch.Tensor:
    """bool [R, Hkv]: which (request, KV head) rows retrieve at this step (before the
    dense rule: a dense request retrieves nothing either way)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r}: expected one of {GRANULARITIES}")
    cos = (unit.double() * kept.query.double()).sum(-1)  # [R, Hkv]
    seq = seq_lens.to(kept.seq.device, torch.int64)[:, None]
    stale = (kept.seq < 0) | (seq - kept.seq >= max_age)
    need = stale | (cos < threshold)
    if granularity == "layer":
        need = need.any(-1, keepdim=True).expand_as(need)
    return need


def retrieve_with_reuse(
    query: torch.Tensor,
    codes: KeyCodes,
    seq_lens: torch.Tensor,
    config: ParisKVConfig,
    kept: KeptSelection,
    granularity: str = "layer",
    scale: torch.Tensor | None = None,
) -> tuple[Retrieval, KeptSelection, torch.Tensor]:
    """One decode step of one layer with reuse: (attended set, the new kept state, bool
    [R, Hkv] rows that retrieved). Inputs as :func:`codec.pipeline.retrieve`; ``kept``
    from the previous step (or :meth:`KeptSelection.empty`). With
    ``config.reuse_threshold`` 0 every sparse row retrieves: exactly ``retrieve``."""
    r, _, hkv, _ = codes.signs.shape
    cand = retrieval_candidates(query, codes, seq_lens, config, scale)
    unit = unit_query(query, hkv, config.rotation_seed, scale).to(kept.query.dtype)
    sparse = ~cand.dense[:, None].expand(r, hkv)
    if config.reuses:
        need = needs_retrieval(
            unit, kept, seq_lens, config.reuse_threshold, config.reuse_max_age, granularity
        )
    else:
        need = torch.ones_like(sparse)
    retrieved = need & sparse

    k = config.topk
    if not config.reuses:
        top_pos, top_valid = rerank_topk(codes, cand.query, cand.positions, cand.valid, k)
        return assemble(top_pos, top_valid, cand, seq_lens, config), kept, retrieved
    width = config.reuse_kept
    if kept.top.shape[-1] != width:
        raise ValueError(
            f"kept set of {kept.top.shape[-1]} positions, config.reuse_kept {width}"
        )
    # A retrieving row keeps its `width` best candidates (all of them when it has fewer);
    # every sparse row then attends the top-k of its kept set by this step's estimates.
    best, best_valid = rerank_topk(codes, cand.query, cand.positions, cand.valid, width)
    fresh_top = torch.full_like(kept.top, -1)
    fresh_top[..., : best.shape[-1]] = torch.where(best_valid, best, -1)
    new_top = torch.where(retrieved[..., None], fresh_top, kept.top)  # retrieved: sparse
    listed = new_top >= 0
    top_pos, top_valid = rerank_topk(codes, cand.query, new_top.clamp_min(0), listed, k)
    top_valid = top_valid & sparse[..., None]
    seq = seq_lens.to(kept.seq.device, torch.int64)[:, None].expand(r, hkv)
    new_kept = KeptSelection(
        query=torch.where(retrieved[..., None], unit, kept.query),
        top=new_top,
        seq=torch.where(retrieved, seq, kept.seq),
    )
    return assemble(top_pos, top_valid, cand, seq_lens, config), new_kept, retrieved
