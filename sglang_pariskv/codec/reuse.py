"""Retrieval reuse (LouisKV-style) in plain torch: the specification of the serving path.

The keys a decode query needs change little from one step to the next while the query
itself barely moves. So each request keeps, per layer and KV head, the top-k it last
retrieved and the retrieval query (the GQA group mean, rotated and normalised: see
:mod:`codec.query`) it was retrieved for. A step retrieves again when

* nothing is kept (a new request, or one that was dense until now),
* ``max_age`` tokens or more were decoded since the kept retrieval, or
* the cosine between the new and the kept query of some KV head falls below
  ``threshold`` (granularity "layer": one decision for all KV heads of the request's
  layer, what the serving kernels skip together; "head": one per KV head);

otherwise it attends over sink ∪ the current local window ∪ the kept top-k. The kept
positions all lie before the kept step's window, so they never overlap the current window;
tokens newer than the kept retrieval join through the window as it moves, and the tokens
that slid out of the window since then (fewer than ``max_age``) are attended again at the
next retrieval.

The group mean is the query whose inner product with each key is the group's mean logit,
which is what the top-k ranks; its cosine therefore measures how far the ranking can have
moved, for the whole group at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_pariskv.codec.encode import KeyCodes
from sglang_pariskv.codec.pipeline import Retrieval, retrieve
from sglang_pariskv.codec.query import prepare_query
from sglang_pariskv.config import ParisKVConfig

GRANULARITIES = ("layer", "head")


@dataclass
class KeptSelection:
    """What one layer keeps per request between steps."""

    query: torch.Tensor  #: float [R, Hkv, D]: unit rotated retrieval query of the kept top-k
    top: torch.Tensor  #: int64 [R, Hkv, K]: kept top-k positions (-1 where invalid)
    seq: torch.Tensor  #: int64 [R, Hkv]: sequence length when retrieved; -1: nothing kept

    @staticmethod
    def empty(r: int, hkv: int, d: int, k: int, device="cpu") -> KeptSelection:
        return KeptSelection(
            query=torch.zeros(r, hkv, d, device=device),
            top=torch.full((r, hkv, k), -1, dtype=torch.int64, device=device),
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
    fresh = retrieve(query, codes, seq_lens, config, scale=scale)
    unit = unit_query(query, hkv, config.rotation_seed, scale).to(kept.query.dtype)
    sparse = ~fresh.dense[:, None].expand(r, hkv)
    if config.reuses:
        need = needs_retrieval(
            unit, kept, seq_lens, config.reuse_threshold, config.reuse_max_age, granularity
        )
    else:
        need = torch.ones_like(sparse)
    retrieved = need & sparse
    reused = ~need & sparse

    # A sparse row is [sink, window, top-k]: its zone is longer than top-k, so it always
    # holds exactly topk retrieved positions.
    first, k = config.sink + config.local, config.topk
    if kept.top.shape[-1] != k:
        raise ValueError(f"kept top-k of {kept.top.shape[-1]} positions, config.topk {k}")
    positions, valid = fresh.positions.clone(), fresh.valid.clone()
    new_top = kept.top.clone()
    if bool(sparse.any()):
        got = fresh.positions[..., first : first + k]
        sel = reused[..., None]
        positions[..., first : first + k] = torch.where(sel, kept.top, got)
        valid[..., first : first + k] = torch.where(sel, kept.top >= 0, got >= 0)
        new_top = torch.where(retrieved[..., None], got, kept.top)
    seq = seq_lens.to(kept.seq.device, torch.int64)[:, None].expand(r, hkv)
    new_kept = KeptSelection(
        query=torch.where(retrieved[..., None], unit, kept.query),
        top=new_top,
        seq=torch.where(retrieved, seq, kept.seq),
    )
    out = Retrieval(positions, valid, fresh.dense, fresh.num_candidates)
    return out, new_kept, retrieved
