"""The KV pool of ``--pariskv-offload host``: K/V in pinned host memory, codes on the GPU.

SGLang keeps working unchanged: its ``k_buffer[l]`` / ``v_buffer[l]`` are CUDA views of
the host pool (:meth:`HostKVPool.cuda_views`), so the KV store of extend and decode, KV
moves and the dense decode of short requests read and write host memory over PCIe. Two
reads go through GPU copies instead: the sparse decode of long requests, which needs a
few thousand rows per KV head, through the hot cache (``attention.offload_wiring`` +
``offload.fetch``), and an extend's attention over its cached prefix, through a copy of
the layer's prefix rows (``offload.prefill_staging``; inside :meth:`staged_reads`,
``get_kv_buffer`` of that layer returns it). The GPU keeps the ParisKV codes of every
token (about a fifth of the KV bytes), so capacity is set by host memory, not HBM.

Every write and move drops the written slots' rows from the hot cache (once the backend
has attached one): a slot freed by one request and reused by another must not serve the
first request's KV from the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from sglang_pariskv.config import ParisKVConfigError
from sglang_pariskv.index.kv_pool import ParisKVTokenToKVPool
from sglang_pariskv.offload.host_pool import HostKVPool
from sglang_pariskv.offload.hot_cache import HotCache
from sglang_pariskv.offload.prefill_staging import PrefillStaging


class HostOffloadKVPool(ParisKVTokenToKVPool):
    """``ParisKVTokenToKVPool`` whose K/V buffers live in a :class:`HostKVPool`."""

    #: The GPU hot cache whose rows writes invalidate (:meth:`attach_hot_cache`).
    hot_cache: HotCache | None = None
    #: The prefill staging buffer the backend attaches; None: every read is of host memory.
    staging: PrefillStaging | None = None
    _staged_layer: int | None = None

    def _create_buffers_normal(self):
        layout = str(getattr(self, "kv_cache_layout", "nhd")).lower()
        if getattr(self, "use_hnd", False) or layout != "nhd":
            raise ParisKVConfigError(
                "--pariskv-offload host keeps SGLang's default NHD KV layout in host memory: "
                "unset SGLANG_USE_HND_KVCACHE and any KV layout override"
            )
        on_gpu = torch.device(self.device).type == "cuda"
        self.host = HostKVPool(
            self.size + self.page_size,
            self.layer_num,
            self.head_num,
            self.head_dim,
            dtype=self.store_dtype,
            pin=on_gpu,
        )
        if on_gpu:
            self.k_buffer, self.v_buffer = self.host.cuda_views(self.device)
        else:  # CPU tests: the host tensors are the buffers
            self.k_buffer = [self.host.data[i, 0] for i in range(self.layer_num)]
            self.v_buffer = [self.host.data[i, 1] for i in range(self.layer_num)]

    def attach_hot_cache(self, cache: HotCache | None) -> None:
        """The backend attaches the hot cache once it has sized it (None detaches it,
        before a larger one is allocated): from then on every write drops its slots' rows."""
        self.hot_cache = cache

    @contextlib.contextmanager
    def staged_reads(self, layer_id: int) -> Iterator[None]:
        """Within: ``get_kv_buffer(layer_id)`` gathers the planned prefix rows of that layer
        into the staging buffer and returns it (when a batch is staged). Only the extend
        attention of that layer reads inside; writes still go to host memory."""
        self._staged_layer = layer_id
        try:
            yield
        finally:
            self._staged_layer = None

    def get_kv_buffer(self, layer_id: int):
        st = self.staging
        if layer_id == self._staged_layer and st is not None and st.active:
            return st.layer_kv(layer_id - self.start_layer)
        return super().get_kv_buffer(layer_id)

    def _clear_buffers(self):
        super()._clear_buffers()
        self.host.close()

    def host_bytes(self) -> int:
        return self.host.nbytes()

    def _invalidate(self, loc: torch.Tensor, layer: int | None = None) -> None:
        if self.hot_cache is not None and loc.numel():
            self.hot_cache.invalidate(loc.to(self.hot_cache.tags.device), layer)

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, *args, **kwargs):
        super().set_kv_buffer(layer, loc_info, cache_k, cache_v, *args, **kwargs)
        local, loc = self.written_slots(layer, loc_info, kwargs)
        self._invalidate(loc, local)

    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor):
        super().move_kv_cache(tgt_loc, src_loc)
        self._invalidate(tgt_loc)

    def load_cpu_copy(self, kv_cache_cpu, indices, *args, **kwargs):
        super().load_cpu_copy(kv_cache_cpu, indices, *args, **kwargs)
        self._invalidate(indices)
