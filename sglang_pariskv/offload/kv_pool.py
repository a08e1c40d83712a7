"""The KV pool of ``--pariskv-offload host``: K/V in pinned host memory, codes on the GPU.

SGLang keeps working unchanged: its ``k_buffer[l]`` / ``v_buffer[l]`` are CUDA views of
the host pool (:meth:`HostKVPool.cuda_views`), so the KV store of extend and decode, KV
moves, FlashInfer's prefill over a cached prefix and the dense decode of short requests
read and write host memory over PCIe. Only the sparse decode of long requests, which
needs a few thousand rows per KV head, is routed through the GPU hot cache
(``attention.backend`` + ``offload.fetch``). The GPU keeps the ParisKV codes of every
token (about a fifth of the KV bytes), so capacity is set by host memory, not HBM.

Every write and move drops the written slots' rows from the hot cache (when the backend
has attached one): a slot freed by one request and reused by another must not serve the
first request's KV from the cache.

With ``--pariskv-prefill-copy side_stream`` the K/V stores of a ragged extend go to a
copy stream (:mod:`offload.write_behind`); every reader here drains them first.
"""

from __future__ import annotations

import torch

from sglang_pariskv.index.kv_pool import ParisKVTokenToKVPool
from sglang_pariskv.offload.host_pool import HostKVPool
from sglang_pariskv.offload.hot_cache import HotCache
from sglang_pariskv.offload.write_behind import WriteBehind
from sglang_pariskv.server_flags import ParisKVConfigError


class HostOffloadKVPool(ParisKVTokenToKVPool):
    """``ParisKVTokenToKVPool`` whose K/V buffers live in a :class:`HostKVPool`."""

    #: Attached by the attention backend once it knows the decode workspace's capacity.
    hot_cache: HotCache | None = None
    #: ``--pariskv-prefill-copy side_stream``: the copy stream extend stores go to.
    write_behind: WriteBehind | None = None
    #: Set by the attention backend around a ragged extend's layers only: their new K/V
    #: have no reader before a later forward, so their store may trail the forward.
    defer_writes: bool = False

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
        if self.pariskv_config.prefill_copy == "side_stream":
            self.write_behind = WriteBehind(self.host, self.device)

    def _clear_buffers(self):
        if self.write_behind is not None:
            self.write_behind.synchronize()  # no copy may land in unregistered memory
        super()._clear_buffers()
        self.host.close()

    def host_bytes(self) -> int:
        return self.host.nbytes()

    def _invalidate(self, loc: torch.Tensor, layer: int | None = None) -> None:
        if self.hot_cache is not None and loc.numel():
            self.hot_cache.invalidate(loc.to(self.hot_cache.tags.device), layer)

    # -- readers drain pending copy-stream stores first ------------------------------
    def _drain(self, local_layer: int | None = None) -> None:
        if self.write_behind is None:
            return
        if local_layer is None:
            self.write_behind.drain_all()
        else:
            self.write_behind.drain(local_layer)

    def drain_writes(self) -> None:
        """Make the current stream wait for every pending store (a decode step calls this
        before its layers run: a replayed CUDA graph cannot wait by itself)."""
        self._drain()

    def get_key_buffer(self, layer_id: int):
        self._drain(layer_id - self.start_layer)
        return super().get_key_buffer(layer_id)

    def get_value_buffer(self, layer_id: int):
        self._drain(layer_id - self.start_layer)
        return super().get_value_buffer(layer_id)

    # -- writers -----------------------------------------------------------------------
    def _deferrable(self, cache_k: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """A plain store (no scales, masks or dtype cast) of a ragged extend, on the copy
        stream's device and outside a graph capture: the copy stream may do it."""
        wb = self.write_behind
        if wb is None or not self.defer_writes or cache_k.device.type != wb.device.type:
            return False
        extra = [a for a in args if a is not None]
        extra += [v for k, v in kwargs.items() if k != "layer_id_override" and v is not None]
        if extra or not cache_k.dtype == self.dtype == self.store_dtype:
            return False
        return not (wb.on_cuda and torch.cuda.is_current_stream_capturing())

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, *args, **kwargs):
        local, loc = self.written_slots(layer, loc_info, kwargs)
        if self._deferrable(cache_k, args, kwargs):
            self.write_behind.write(local, loc, cache_k, cache_v)
            self.pariskv.write(local, loc, cache_k)  # codes: on the forward stream
        else:
            # An older pending copy of these slots must not land after this store.
            self._drain(local)
            super().set_kv_buffer(layer, loc_info, cache_k, cache_v, *args, **kwargs)
        self._invalidate(loc, local)

    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor):
        self._drain()
        super().move_kv_cache(tgt_loc, src_loc)
        self._invalidate(tgt_loc)

    def get_cpu_copy(self, indices, mamba_indices=None):
        self._drain()
        return super().get_cpu_copy(indices, mamba_indices)

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None):
        self._drain()
        super().load_cpu_copy(kv_cache_cpu, indices, mamba_indices)
        self._invalidate(indices)
