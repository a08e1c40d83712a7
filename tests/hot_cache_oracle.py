"""The hot cache's replacement rules as plain tensor ops: the oracle of the fused fetch.

The package fetches with four Triton launches (``kernels.hot_cache_fetch``); this module
states the same rules (``offload.hot_cache``'s docstring) as a lookup, a plain-torch copy
of the rows to fetch, and an insert, so the tests can compare positions, tags, counters
and staged rows step by step. ``tests/test_offload_hot_cache.py`` checks it against a
one-entry-at-a-time Python model. :func:`fetch_reference` is the plainer oracle of what
any fetch must stage: the host pool's rows, in entry order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sglang_pariskv.offload.host_pool import HostKVPool
from sglang_pariskv.offload.hot_cache import HotCache


class Lookup(NamedTuple):
    """One layer's lookup: what to fetch and where FlashInfer finds each entry."""

    rows: torch.Tensor  #: int64 [E] row ids (0 where not valid)
    valid: torch.Tensor  #: bool [E]
    hit: torch.Tensor  #: bool [E]
    pos: torch.Tensor  #: int64 [E] staging row of each entry (0 where not valid)
    fill: torch.Tensor  #: bool [E]: fetch ``rows[i]`` from host into ``pos[i]``
    winner: torch.Tensor  #: int64 [C] row installed in each line (-1: line unchanged)


def lookup(cache: HotCache, layer: int, rows: torch.Tensor, valid: torch.Tensor) -> Lookup:
    """Plan one layer's step for entries ``rows`` [E] (``valid`` [E] selects the real
    ones). Changes nothing: fetch the ``fill`` rows, then call :func:`insert`."""
    e, c = rows.numel(), cache.lines
    if e > cache.max_entries:
        raise ValueError(f"{e} entries > max_entries {cache.max_entries}")
    dev = rows.device
    idx = torch.arange(e, device=dev)
    rows = torch.where(valid, rows.to(torch.int64), 0)
    line = rows % c
    hit = valid & (cache.tags[layer].gather(0, line) == rows)
    miss = valid & ~hit
    protected = torch.zeros(c, dtype=torch.int64, device=dev)
    protected.scatter_reduce_(0, line, hit.to(torch.int64), "amax")
    winner = torch.full((c,), -1, dtype=torch.int64, device=dev)
    winner.scatter_reduce_(0, line, torch.where(miss, rows, -1), "amax")
    winner = torch.where(protected.bool(), -1, winner)
    install = miss & (winner.gather(0, line) == rows)
    # One fetch per installed line: its first entry (duplicates share the line).
    first = torch.full((c,), e, dtype=torch.int64, device=dev)
    first.scatter_reduce_(0, line, torch.where(install, idx, e), "amin")
    fill = (install & (first.gather(0, line) == idx)) | (miss & ~install)
    pos = torch.where(hit | install, layer * c + line, cache.overflow_base + idx)
    pos = torch.where(valid, pos, 0)
    return Lookup(rows, valid, hit, pos, fill, winner)


def insert(cache: HotCache, layer: int, lk: Lookup) -> None:
    """After the ``fill`` rows were fetched: tag the installed lines, count."""
    tags = cache.tags[layer]
    tags.copy_(torch.where(lk.winner >= 0, lk.winner, tags))
    counts = torch.stack([lk.hit.sum(), (lk.valid & ~lk.hit).sum(), lk.fill.sum()])
    cache.counters[layer] += counts.to(torch.int64)


def fetch(
    pool: HostKVPool,
    cache: HotCache,
    layer: int,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
) -> torch.Tensor:
    """What ``OffloadFetcher.fetch`` must do, in tensor ops: the staging row of every
    entry (int32, 0 past ``kv_indptr[-1]``), the missing rows copied from the host pool
    into ``cache.data`` (K into the row's first half, V into its second)."""
    e = kv_indices.numel()
    valid = torch.arange(e, device=kv_indices.device) < kv_indptr[-1].to(torch.int64)
    lk = lookup(cache, layer, kv_indices, valid)
    d, fill = pool.head_dim, lk.fill.cpu()
    src = lk.rows.cpu()[fill]
    dst = lk.pos[lk.fill]
    for part in (0, 1):
        rows = pool.layer_rows(layer, part)[src]
        cache.data[dst, part * d : (part + 1) * d] = rows.to(cache.data.device)
    insert(cache, layer, lk)
    return lk.pos.to(torch.int32)


def fetch_reference(
    pool: HostKVPool, layer: int, kv_indptr: torch.Tensor, kv_indices: torch.Tensor
) -> torch.Tensor:
    """The rows FlashInfer must see, in entry order: ``[kv_indptr[-1], 2·D]`` (CPU), K in
    the first half of each row and V in the second."""
    idx = kv_indices[: int(kv_indptr[-1])].cpu().long()
    return torch.cat([pool.layer_rows(layer, part)[idx] for part in (0, 1)], dim=1)


def rewrite(
    pool: HostKVPool,
    caches: list[HotCache],
    layer: int,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """What a KV store of ``offload.kv_pool.HostOffloadKVPool`` does: new K/V at ``slots``
    of ``layer`` in the host pool, and those slots' rows dropped from each cache."""
    pool.write(layer, slots, k, v)
    for cache in caches:
        cache.invalidate(slots.to(cache.tags.device), layer)


class TensorOpFetcher:
    """``OffloadFetcher.fetch`` with the tensor-op rules above."""

    def __init__(self, pool: HostKVPool, cache: HotCache):
        self.pool, self.cache = pool, cache

    def fetch(self, layer: int, kv_indptr: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
        return fetch(self.pool, self.cache, layer, kv_indptr, kv_indices)
