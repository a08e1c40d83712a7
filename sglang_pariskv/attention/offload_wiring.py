"""Host offload inside the forward pass: the decode step's hot cache and fetcher, and the
prefill's staged prefix reads.

With ``--pariskv-offload host`` the K/V of every token is in pinned host memory. A sparse
decode layer stages its retrieved rows in the GPU hot cache (misses come over UVA) and
the head-as-batch FlashInfer call reads the staging buffer. The cache is sized by the
decode workspace (its overflow rows hold one step's misses), so it is rebuilt with it.
With ``--pariskv-hot-cache-lines 0`` there is no cache: FlashInfer reads the retrieved
rows from host memory directly, through the pool's CUDA views.

An extend batch with a cached prefix (a chunked prefill's later chunks, a radix hit)
attends over a GPU copy of each layer's prefix rows (``offload.prefill_staging``):
:class:`OffloadPrefill` plans the copy after SGLang plans the batch and arms the pool's
staged reads around each layer's extend attention.
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
from sglang_pariskv.offload.prefill_staging import PrefillStaging

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


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class OffloadPrefill:
    """The prefill staging of one host-offload pool."""

    def __init__(self, pool: HostOffloadKVPool, rows: int, device: torch.device | str):
        """``rows``: the staging buffer's rows (the context length)."""
        self.pool = pool
        self.staging = PrefillStaging(pool.host, rows, device)
        pool.staging = self.staging
        self._explained: set[str] = set()

    @staticmethod
    def build(pool, rows: int, device: torch.device | str) -> OffloadPrefill | None:
        """The prefill staging of this pool, or None (not a host-offload pool)."""
        if not isinstance(pool, HostOffloadKVPool):
            return None
        return OffloadPrefill(pool, rows, device)

    def plan(self, forward_batch, metadata, page_size: int) -> dict[str, int]:
        """After SGLang planned ``forward_batch`` (``metadata``: its FlashInfer prefill
        metadata; None where a prefill CUDA graph planned it): stage the prefix rows of an
        extend with a prefix, giving the paged wrapper the staged rows as its indices.
        Returns what this plan added to the counters."""
        before = dict(self.staging.counters)
        prefix = _prefix_lens(forward_batch)
        if not forward_batch.forward_mode.is_extend() or not any(prefix):
            self.staging.clear()
        else:
            wrapper, why = _stageable_wrapper(metadata, page_size)
            n = sum(prefix)
            slots = None if wrapper is None else wrapper._paged_kv_indices_buf[:n]
            rows = self.staging.plan(slots)
            if rows is not None:
                wrapper._paged_kv_indices_buf = rows
            else:
                self._explain(why or f"{n} prefix tokens, more than the {self.staging.capacity}"
                              " rows of the staging buffer")  # fmt: skip
        return {k: v - before[k] for k, v in self.staging.counters.items()}

    def _explain(self, why: str) -> None:
        """Log, once per reason, that an extend read its prefix from host memory (slow)."""
        if why not in self._explained:
            self._explained.add(why)
            logger.warning(
                "ParisKV offload: an extend reads its prefix from host memory, not from a "
                "GPU copy (%s); its prefill is slower (counted in prefill_direct_extends)",
                why,
            )

    def reads(self, layer_id: int):
        """Context of one layer's extend attention: its prefix reads come from staging
        while a batch is staged.

        Every extend is planned by the backend's ``init_forward_metadata`` (eager, and
        on a breakable prefill graph's replay, whose attention runs eagerly with the
        wrapper planned there) or ``init_forward_metadata_out_graph`` (full prefill
        graphs: nothing staged), and each plan replaces the staging state. The layers
        may see another ``ForwardBatch`` object than the plan did (a graph's static
        batch), so the state is not tied to the object: the wrapper planned with staged
        rows must always be served the staged buffer."""
        return self.pool.staged_reads(layer_id)

    def snapshot(self) -> dict[str, int]:
        return dict(self.staging.counters)


def _prefix_lens(forward_batch) -> list[int]:
    lens = getattr(forward_batch, "extend_prefix_lens_cpu", None)
    return [] if lens is None else [int(x) for x in lens]


def _stageable_wrapper(metadata, page_size: int) -> tuple[Any, str | None]:
    """(the paged prefill wrapper whose indices are the batch's prefix slots alone, None)
    for SGLang's ragged-plus-paged extend with one wrapper and one-token pages planned
    outside a CUDA graph; else (None, why not): the batch reads host memory directly."""
    if metadata is None:
        return None, "planned for a prefill CUDA graph"
    if not getattr(metadata, "use_ragged", False):
        return None, "SGLang's extend without the ragged wrapper (prefix and chunk paged together)"
    wrappers = list(metadata.prefill_wrappers)
    if len(wrappers) != 1:
        return None, f"{len(wrappers)} prefill wrappers (sliding window or cross attention)"
    if page_size != 1:
        return None, f"--page-size {page_size}"
    if _capturing() or getattr(wrappers[0], "is_cuda_graph_enabled", False):
        return None, "a CUDA-graph prefill wrapper"
    return wrappers[0], None
