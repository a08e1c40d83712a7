"""The per-layer fetch step of offloaded decoding: retrieved indices -> staged rows.

Given the retrieval workspace's head-as-batch ``kv_indptr`` / ``kv_indices`` (entry =
``slot·Hkv + head``; the valid ones are ``[0, kv_indptr[-1])``), :meth:`OffloadFetcher.fetch`
looks the entries up in the :class:`HotCache`, gathers the missing rows from the
:class:`HostKVPool` over UVA into the cache's data buffer and tags the installed lines
(the fused Triton fetch, :mod:`kernels.hot_cache_fetch`), and returns, per entry, the
staging row where FlashInfer finds it. The same ``kv_indptr`` with these staging indices,
over :meth:`OffloadFetcher.staging_kv` (FlashInfer's ``[pages, 2, 1, 1, D]`` paged layout),
is the sparse call of ``attention.sparse_decode`` with the pool swapped for the staging
buffer. The rows are bit-identical, so the attention output is the non-offloaded one.

Design choice: every attended row goes through the cache, sink and local window
included; nothing is pinned on the GPU. Sink and window rows are re-selected at every
step, so after their first fetch they are hits; the one new token per step is fetched
once, just after it was written (its write invalidated the line). Keeping them resident
in a region filled at extend time would save that one row per head and layer, at the
price of a second index space and a per-step window shift. The simplest correct design
wins until the benchmark says otherwise.

Everything here has fixed shapes and no host sync, so the step can run inside the
decode CUDA graph (the shapes are set by the workspace's capacity, not by the batch).
"""

from __future__ import annotations

import torch

from sglang_pariskv.kernels.hot_cache_fetch import FetchScratch, hot_cache_fetch
from sglang_pariskv.offload.host_pool import HostKVPool
from sglang_pariskv.offload.hot_cache import HotCache


class OffloadFetcher:
    """Host pool + hot cache: the per-layer fetch. The writers of the host pool
    (:class:`offload.kv_pool.HostOffloadKVPool`) drop rewritten slots from the cache."""

    def __init__(self, pool: HostKVPool, cache: HotCache):
        if cache.row_width != pool.row_width or cache.hkv != pool.num_kv_heads:
            raise ValueError("the hot cache's rows must be the host pool's (slot, head) rows")
        if cache.num_layers != pool.num_layers:
            raise ValueError("one cache layer per pool layer")
        self.pool, self.cache = pool, cache
        self.scratch = FetchScratch(cache.lines, cache.max_entries, cache.data.device)

    def staging_kv(self) -> torch.Tensor:
        """The buffer FlashInfer reads: ``[rows, 2, 1, 1, D]`` (K, V; page size 1, 1 head)."""
        return self.cache.data.view(-1, 2, 1, 1, self.pool.head_dim)

    def fetch(
        self,
        layer: int,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Staging indices (int32, shaped like ``kv_indices``) of this layer's entries.

        ``kv_indptr``: the int32 ``[rows + 1]`` offsets of the step (device);
        ``kv_indices``: int32 entries, capacity-sized. ``out`` may be ``kv_indices``
        itself (the entries are read before it is written) or the buffer the FlashInfer
        wrapper was planned with; entries past ``kv_indptr[-1]`` get 0.
        """
        if out is None:
            out = torch.empty(kv_indices.numel(), dtype=torch.int32, device=kv_indices.device)
        hot_cache_fetch(
            layer, kv_indices, kv_indptr[-1:], self.cache.tags[layer], self.cache.data,
            self.cache.counters[layer], self.pool.layer_rows(layer, 0),
            self.pool.layer_rows(layer, 1), out, self.scratch, self.cache.overflow_base,
        )  # fmt: skip
        return out
