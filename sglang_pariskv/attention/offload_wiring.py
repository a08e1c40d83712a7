"""Host offload inside the decode step: the hot cache and fetcher the sparse call reads.

With ``--pariskv-offload host`` the K/V of every token is in pinned host memory. A sparse
decode layer stages its retrieved rows in the GPU hot cache (misses come over UVA) and
the head-as-batch FlashInfer call reads the staging buffer. The cache is sized by the
decode workspace (its overflow rows hold one step's misses), so it is rebuilt with it.
With ``--pariskv-hot-cache-lines 0`` there is no cache: FlashInfer reads the retrieved
rows from host memory directly, through the pool's CUDA views.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sglang_pariskv.attention.sparse_decode import HeadAsBatchDecode
from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.kernels.workspace import DecodeWorkspace
from sglang_pariskv.offload.counters import FIELDS as HOT_CACHE_FIELDS
from sglang_pariskv.offload.counters import HotCacheCounterReader
from sglang_pariskv.offload.fetch import OffloadFetcher
from sglang_pariskv.offload.hot_cache import HotCache
from sglang_pariskv.offload.kv_pool import HostOffloadKVPool

logger = logging.getLogger("sglang_pariskv")


class OffloadDecode:
    """The hot cache, its fetcher and its counter reader for one host-offload pool."""

    def __init__(self, pool: HostOffloadKVPool, config: ParisKVConfig, ws: DecodeWorkspace):
        # Drop every reference to an old cache (rebuilt for a larger workspace) before
        # allocating the new one, so the two never coexist in GPU memory.
        pool.attach_hot_cache(None)
        self.pool = pool
        cache = HotCache(
            pool.layer_num,
            config.hot_cache_lines,
            pool.head_num,
            2 * pool.head_dim,
            max_entries=ws.kv_indices.numel(),
            dtype=pool.dtype,
            device=ws.device,
        )
        pool.attach_hot_cache(cache)
        self.fetcher = OffloadFetcher(pool.host, cache)
        self.counters = HotCacheCounterReader(cache)
        logger.info(
            "ParisKV offload: host pool %.1f GiB, hot cache %d lines/layer (%.1f MiB)",
            pool.host_bytes() / 2**30,
            config.hot_cache_lines,
            cache.nbytes() / 2**20,
        )

    @staticmethod
    def build(pool, config: ParisKVConfig, ws: DecodeWorkspace) -> OffloadDecode | None:
        """The offload path of this pool, or None (no offload, or no hot cache)."""
        if not isinstance(pool, HostOffloadKVPool) or config.hot_cache_lines == 0:
            return None
        return OffloadDecode(pool, config, ws)

    def run(
        self, layer: int, sparse: HeadAsBatchDecode, ws: DecodeWorkspace, q3: torch.Tensor
    ) -> torch.Tensor:
        """Stage the layer's retrieved rows and attend over them. The indices are
        rewritten in place to their staging rows."""
        indices = ws.kv_indices[: sparse.entries()]
        self.fetcher.fetch(layer, ws.kv_indptr[: sparse.rows + 1], indices, out=indices)
        return sparse.run_staged(q3, self.fetcher.staging_kv())

    def poll(self) -> dict[str, int]:
        """Hot-cache counter increments readable since the last poll (no device sync)."""
        return self.counters.poll()

    def snapshot(self) -> dict[str, Any]:
        st: dict[str, Any] = {"offload_host_pool_gib": self.pool.host_bytes() / 2**30}
        for key in HOT_CACHE_FIELDS:  # flat: stats files sum numbers
            st[f"hot_cache_{key}"] = self.counters.totals.get(key, 0)
        return st
