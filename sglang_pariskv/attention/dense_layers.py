"""``--pariskv-dense-layers``: layers that attend over every request's whole context at
every decode step, through their own FlashInfer decode plan.

On a step that retrieves, SGLang's dense decode call is planned with one token per sparse
request (their output comes from the sparse call), so a dense layer needs a second plan
over the full lengths. It gets its own wrappers and its own ``kv_indptr`` (FlashInfer keeps
a reference to the indptr a plan was made with, and SGLang's is rewritten by the other
plan), and, under CUDA graphs, its own ``kv_indices`` buffer of SGLang's size (max batch x
max context). A dense layer then runs SGLang's decode with this plan: it stores the K/V and
codes as every layer does and skips retrieval. On a step with no sparse request every
layer is dense already and this plan is not made.

Why: the first layers of small models attend diffusely (SmolLM2's layer 0 keeps 0.53 of
its attention at a 10% budget even with the exact top-k), so they lose the most to any
sparse selection; each dense layer costs its full KV read (1/L of dense decoding).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import torch


class FullContextDecode:
    """FlashInfer decode wrappers planned over the full lengths, for the dense layers."""

    def __init__(self, backend: Any, layers: tuple[int, ...]) -> None:
        self.backend = backend
        self.layers = frozenset(layers)
        self.indptr = torch.zeros_like(backend.kv_indptr[0])
        self._eager: list | None = None
        self._graph: dict[int, list] = {}
        self._graph_indices: torch.Tensor | None = None
        #: The metadata a dense layer runs with this step (None: not a sparse step).
        self.active: Any = None

    def _wrapper(self, **kw) -> Any:
        from flashinfer import BatchDecodeWithPagedKVCacheWrapper

        b = self.backend
        return BatchDecodeWithPagedKVCacheWrapper(
            b.workspace_buffer,
            "NHD",
            backend=b.decode_backend,
            use_tensor_cores=b.decode_use_tensor_cores,
            **kw,
        )

    def init_graph_state(self, max_bs: int, max_context: int) -> None:
        """The CUDA-graph ``kv_indices`` buffer, as large as SGLang's own."""
        dev = self.indptr.device
        self._graph_indices = torch.zeros(max_bs * max_context, dtype=torch.int32, device=dev)

    def _graph_wrappers(self, bs: int, in_capture: bool) -> list:
        if in_capture or bs not in self._graph:
            if self._graph_indices is None:
                raise RuntimeError("dense layers: CUDA-graph state was not initialised")
            self._graph[bs] = [
                self._wrapper(
                    use_cuda_graph=True,
                    paged_kv_indptr_buffer=self.indptr[: bs + 1],
                    paged_kv_indices_buffer=self._graph_indices,
                    paged_kv_last_page_len_buffer=self.backend.kv_last_page_len[:bs],
                )
            ]
        return self._graph[bs]

    def plan(self, forward_batch, graph_bs: int | None = None, in_capture: bool = False) -> None:
        """Plan the full-length decode of this step's rows (eager, or the captured batch
        size ``graph_bs``)."""
        from sglang.srt.layers.attention.flashinfer_backend import (
            DecodeMetadata,
            fast_decode_plan,
        )

        fb, b = forward_batch, self.backend
        bs = fb.batch_size
        if graph_bs is None:
            if self._eager is None:
                self._eager = [self._wrapper()]
            wrappers, split, no_split = self._eager, b.decode_split_tile_size, False
        else:
            wrappers = self._graph_wrappers(graph_bs, in_capture)
            split, no_split = None, b.disable_cuda_graph_kv_split
        updater = b.indices_updater_decode
        saved = updater.kv_indptr
        updater.kv_indptr = [self.indptr]
        try:
            updater.update(
                fb.req_pool_indices[:bs],
                fb.seq_lens[:bs],
                fb.seq_lens_cpu[:bs] if fb.seq_lens_cpu is not None else None,
                fb.seq_lens_sum,
                decode_wrappers=wrappers,
                encoder_lens=None,
                spec_info=None,
                fixed_split_size=split,
                disable_split_kv=no_split,
            )
        finally:
            updater.kv_indptr = saved
        if in_capture:  # as SGLang does: later replans of a graph wrapper use the fast plan
            for w in wrappers:
                w.begin_forward = partial(fast_decode_plan, w)
        self.active = DecodeMetadata(wrappers)

    @contextlib.contextmanager
    def planned(self):
        """SGLang's decode call inside runs with this step's full-length plan; the
        backend's own plan is restored after."""
        b = self.backend
        saved = b.forward_metadata
        b.forward_metadata = self.active
        try:
            yield
        finally:
            b.forward_metadata = saved

    def clear(self) -> None:
        self.active = None

    def runs(self, layer_index: int) -> bool:
        """Whether this layer attends densely at this (sparse) step."""
        return self.active is not None and layer_index in self.layers
