"""``ParisKVAttnBackend``: SGLang's FlashInfer backend with ParisKV sparse decoding.

* Extend (prefill, chunked prefill, radix prefix hits): FlashInfer's dense attention,
  unchanged. The KV pool encodes every key it stores (``index.kv_pool``), by slot, so a
  radix prefix hit's codes are already there. With host offload the prefix rows are
  read from a GPU copy of each layer's (``offload_wiring.OffloadPrefill``).
* Decode: requests at or below the dense threshold attend through SGLang's own dense
  decode call, so their outputs are exactly dense ones. On a sparse step the longer
  requests attend through one "head as batch" FlashInfer call over the indices the retrieval
  workspace assembled (sink + local window + top-k per KV head). In a mixed batch the
  dense call is planned with one token for the sparse rows and the sparse call's dense
  rows are discarded, so each request pays for one attention.
* Overlap: on the GPU pool a sparse decode layer stores its K/V (and codes) first, then
  forks a second stream for retrieval and the sparse call, while SGLang's
  dense call runs on the forward stream; the streams join before the select.
* CUDA graphs: all host work (both plans) runs in ``init_forward_metadata_out_graph``;
  the captured layer work has fixed shapes and no host sync. Each batch size has a
  sparse-step and a dense-step graph (``step_graphs``); steps with no request above the
  threshold replay the one without retrieval.

Other concerns live beside this module: ``deferred_codes`` (a dense step's code writes
in one launch), ``model_info`` (heads, TP rank, softmax scale),
``observability`` (counters, metrics, timing, stats files), ``offload_wiring`` (host
offload's hot cache and fetch, and its prefill staging), ``step_graphs`` (graph
bookkeeping), ``plan_fence`` (each batch's plans after the previous batch's plan copies).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

from sglang_pariskv import sglang_compat
from sglang_pariskv.attention.deferred_codes import DeferredCodes
from sglang_pariskv.attention.dense_layers import FullContextDecode
from sglang_pariskv.attention.memory_check import AllocationMeter, BackendMemory, planned_bytes
from sglang_pariskv.attention.memory_plan import tensor_bytes
from sglang_pariskv.attention.model_info import (
    attention_layers,
    attention_scale,
    query_heads_per_rank,
    tp_rank,
)
from sglang_pariskv.attention.observability import DecodeObserver
from sglang_pariskv.attention.offload_wiring import OffloadDecode, OffloadPrefill
from sglang_pariskv.attention.plan_fence import PlanFence
from sglang_pariskv.attention.sparse_decode import (
    HeadAsBatchDecode,
    dense_rows_only,
    float_workspace,
)
from sglang_pariskv.attention.step_graphs import (
    StepGraphs,
    StepGraphVariants,
    check_step,
    host_seq_lens,
)
from sglang_pariskv.codec.budget import step_dense_mask
from sglang_pariskv.config import ParisKVConfig, ParisKVConfigError
from sglang_pariskv.index.kv_pool import ParisKVTokenToKVPool
from sglang_pariskv.kernels.workspace import DecodeWorkspace
from sglang_pariskv.offload.kv_pool import HostOffloadKVPool

logger = logging.getLogger("sglang_pariskv")


class ParisKVAttnBackend(FlashInferAttnBackend):
    #: Host offload's hot cache + fetch; None without offload (or with a zero-line cache).
    offload: OffloadDecode | None = None
    #: Host offload's prefill staging; None without offload.
    prefill: OffloadPrefill | None = None
    #: --pariskv-dense-layers' full-length decode; None without dense layers.
    full: FullContextDecode | None = None
    #: GPU bytes allocated (measured) against planned (``memory_check``).
    memory: BackendMemory = BackendMemory.off()
    #: Orders each batch's FlashInfer plans after the previous batch's plan copies.
    plan_fence: PlanFence = PlanFence("cpu")

    def __init__(self, model_runner, config: ParisKVConfig):
        super().__init__(model_runner, init_new_workspace=model_runner.init_new_workspace)
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, ParisKVTokenToKVPool):
            raise ParisKVConfigError(
                f"the KV pool is {type(pool).__name__}, not ParisKV's: this model or mode "
                "builds a KV pool ParisKV does not support; serve without --enable-pariskv"
            )
        meter = AllocationMeter(torch.device(model_runner.device))
        with meter.track("backend"):
            self._setup(model_runner, config, pool)
        planned = planned_bytes(model_runner, config, pool) if meter.enabled else {}
        self.memory = BackendMemory(meter, planned)
        self.memory.add_tensors("calibration", pool.pariskv.centres, pool.pariskv.scales)

    def _setup(self, model_runner, config: ParisKVConfig, pool: ParisKVTokenToKVPool) -> None:
        """Everything the backend allocates at construction (measured as one owner)."""
        self.config = config
        self.codes = pool.pariskv
        self.hkv, self.d = pool.head_num, pool.head_dim
        # Under tensor parallelism this rank holds its share of the query and KV heads
        # (the pool is built with the rank's KV heads); retrieval is per KV head, so each
        # rank indexes and retrieves over its own heads with no collective.
        layers = attention_layers(model_runner)
        model_name = str(getattr(model_runner.server_args, "model_path", "this model"))
        self.tp_rank, self.hq = tp_rank(model_runner), query_heads_per_rank(model_runner, layers)
        #: (softmax scale, soft cap): FlashInfer plans them, a captured graph bakes them in.
        self.scale = attention_scale(layers, model_name)
        rtt = self.req_to_token_pool.req_to_token
        device = torch.device(model_runner.device)
        # The workspace scales with batch x context: size it by the running-request
        # limit (the decode batch bound), not by the request pool's slot count.
        max_batch = min(
            getattr(model_runner, "max_running_requests", None) or rtt.shape[0], rtt.shape[0]
        )
        #: FlashInfer scratch shared by every sparse call of this backend (one per GPU).
        self._float_ws = float_workspace(device)
        self._build_workspace(max_batch)
        self.graph_sparse: dict[int, HeadAsBatchDecode] = {}
        self._rpi32: torch.Tensor | None = None
        self._sparse: HeadAsBatchDecode | None = None  # active sparse call, None: all dense
        self._dense_dev = torch.zeros(rtt.shape[0], dtype=torch.bool, device=device)
        self.graphs = StepGraphs()
        dense_layers = config.dense_layer_set(pool.start_layer + pool.layer_num)
        if dense_layers:
            self.full = FullContextDecode(self, dense_layers)
        # The stream a decode layer's retrieval and sparse call run on (GPU pool only:
        # host offload's fetch reads host memory on the forward stream).
        offloaded = isinstance(pool, HostOffloadKVPool)
        self.deferred = DeferredCodes(pool, config, offloaded, [m.layer_id for m in layers])
        overlap = device.type == "cuda" and not offloaded
        context = int(model_runner.model_config.context_len)
        self.prefill = OffloadPrefill.build(pool, context, device)
        self._retrieval_stream = torch.cuda.Stream(device) if overlap else None
        self.plan_fence = PlanFence(device)
        self.observer = DecodeObserver.for_server(
            num_layers=pool.layer_num,
            tp_rank=self.tp_rank,
            server_args=model_runner.server_args,
            config=config,
            on_cuda=device.type == "cuda",
            extra_snapshot=self._offload_snapshot,
        )
        self.observer.dump()
        logger.info(
            "ParisKV backend: codes %.1f MiB, decode workspace %.1f MiB (%d requests x %d "
            "tokens), config %s",
            self.codes.nbytes() / 2**20,
            tensor_bytes(self.ws) / 2**20,
            self.ws.max_batch,
            self.ws.max_context,
            config.to_dict(),
        )

    def _build_workspace(self, max_batch: int) -> None:
        rtt = self.req_to_token_pool.req_to_token
        self.ws = DecodeWorkspace(
            self.config,
            self.hq,
            self.hkv,
            self.d,
            max_batch=max_batch,
            max_context=rtt.shape[1],
            device=rtt.device,
        )
        self.eager_sparse = self._sparse_call()
        self.offload = OffloadDecode.build(self.token_to_kv_pool, self.config, self.ws)

    def _sparse_call(self, graph_batch: int | None = None) -> HeadAsBatchDecode:
        """A head-as-batch FlashInfer call (eager, or fixed buffers for one captured batch
        size) over this backend's workspace and shared float scratch."""
        return HeadAsBatchDecode(
            self.ws, self.token_to_kv_pool.dtype, graph_batch, shared_float_workspace=self._float_ws
        )

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, *args, **kwargs):
        super().init_cuda_graph_state(max_bs, max_num_tokens, *args, **kwargs)
        with self.memory.track("backend"):
            if max_bs > self.ws.max_batch:  # graphs are captured up to max_bs rows
                self._build_workspace(max_bs)
            if self.full is not None:
                self.full.init_graph_state(max_bs, self.req_to_token_pool.req_to_token.shape[1])

    def _offload_snapshot(self) -> dict[str, Any]:
        pool = getattr(self, "token_to_kv_pool", None)
        staged = self.prefill.snapshot() if self.prefill is not None else {}
        if self.offload is not None:
            return self.offload.snapshot() | staged
        if isinstance(pool, HostOffloadKVPool):  # zero-copy: no hot cache to count
            return {"offload_host_pool_gib": pool.host_bytes() / 2**30} | staged
        return {}

    def snapshot(self) -> dict:
        """Counters for operators (``observability.DecodeObserver.snapshot``)."""
        return self.observer.snapshot()

    # -- metadata (host side) ---------------------------------------------------------
    def step_is_sparse(self, seq_lens_cpu: torch.Tensor) -> bool:
        """Whether a decode step runs the retrieval path: some request is above the dense
        threshold (and, with ``min_sparse_tokens``, those hold enough tokens in all). The
        graph runner picks the step's graph with it (plugin.py) and ``_plan_decode`` plans
        with it; CUDA-graph padding rows (seq_len 1) are dense and add no tokens, so the
        padded batch and the real one give the same answer."""
        return bool((~step_dense_mask(seq_lens_cpu, self.config)).any())

    def step_graph(self, seq_lens_cpu: torch.Tensor) -> str:
        """The decode graph a step replays: "sparse" iff :meth:`step_is_sparse`."""
        return "sparse" if self.step_is_sparse(seq_lens_cpu) else "dense"

    def decode_graph_variants(self) -> StepGraphVariants:
        """SGLang built with ``patches/`` asks the backend for its decode graph variants
        (the plugin hooks the graph runner instead): both graphs, picked per step."""
        self.graphs.follow_runner(sglang_compat.capture_attention_variant)
        return StepGraphVariants(self.step_graph)

    def capturing(self, step: str):
        """Capture the ``step`` graph ("sparse" / "dense") of a batch size; the sparse one
        holds the retrieval path whatever the capture batch's lengths are."""
        return self.graphs.capturing(step)

    def _plan_decode(
        self,
        forward_batch,
        plan_dense: Callable[[], None],
        sparse: HeadAsBatchDecode,
        graph: str | None = None,
        key: Any = "eager",
        in_capture: bool = False,
    ) -> None:
        """Plan both calls of a decode step. ``graph``: the CUDA graph the step captures or
        replays, "sparse" (it holds the retrieval path, run even if no request needs it)
        or "dense" (it does not); None (eager): as the lengths say."""
        bs = forward_batch.batch_size
        self._rpi32 = None  # set by _prepare_step_tensors once the plan is made
        seq_cpu = forward_batch.seq_lens_cpu[:bs]
        dense_cpu = step_dense_mask(seq_cpu, self.config)
        if graph is not None:
            check_step(graph)
        run_sparse = graph == "sparse" or (graph is None and bool((~dense_cpu).any()))
        self.observer.poll(self.offload)
        self.observer.decode_step(
            seq_cpu,
            dense_cpu,
            self.config.budget,
            sparse=run_sparse,
            timer_key=key,
            served=not in_capture,
        )
        if self.full is not None:
            self.full.clear()
        # a replay's graph holds its writes already: defer only for a forward that runs here
        self.deferred.plan(decode_step=graph is None or in_capture, retrieves=run_sparse)
        if not run_sparse:
            self._sparse = None
            plan_dense()
            return
        self._dense_dev[:bs].copy_(dense_cpu, non_blocking=True)
        with dense_rows_only(forward_batch, dense_cpu, self._dense_dev[:bs]):
            plan_dense()
        scale, cap = self.scale
        sparse.plan(seq_cpu, sm_scale=scale, logits_soft_cap=cap)
        self._sparse = sparse
        if self.full is not None:
            self.full.plan(forward_batch, key if isinstance(key, int) else None, in_capture)

    def init_forward_metadata(self, forward_batch):
        with self.plan_fence.planning():
            return self._init_forward_metadata(forward_batch)

    def _init_forward_metadata(self, forward_batch):
        self.memory.report()
        if not forward_batch.forward_mode.is_decode() or forward_batch.batch_size == 0:
            self._sparse = None
            self.deferred.plan(decode_step=False)
            if forward_batch.forward_mode.is_extend():
                self.observer.extend(forward_batch)
            super().init_forward_metadata(forward_batch)
            if self.prefill is not None:
                staged = self.prefill.plan(forward_batch, self.forward_metadata, self.page_size)
                self.observer.prefill_staging(staged)
            return
        host_seq_lens(forward_batch)
        self._plan_decode(
            forward_batch,
            lambda: super(ParisKVAttnBackend, self).init_forward_metadata(forward_batch),
            self.eager_sparse,
        )
        self._prepare_step_tensors(forward_batch)

    def init_forward_metadata_in_graph(self, forward_batch):
        super().init_forward_metadata_in_graph(forward_batch)
        self._prepare_step_tensors(forward_batch)

    def _prepare_step_tensors(self, forward_batch) -> None:
        """Device tensors every layer of a sparse decode step reads, made once per step.

        Under CUDA graphs this runs in ``init_forward_metadata_in_graph``, i.e. inside
        every warm-up and capture run, so the cast is a node of the captured graph and is
        replayed with it. Made lazily by the first layer instead, it would be skipped on
        the capture run (the warm-up run had already set it), and every replay would read
        the warm-up's request indices."""
        if self._sparse is None or not forward_batch.forward_mode.is_decode():
            return
        bs = forward_batch.batch_size
        self._rpi32 = forward_batch.req_pool_indices[:bs].to(torch.int32)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        with self.plan_fence.planning():
            return self._init_forward_metadata_out_graph(forward_batch, in_capture)

    def _init_forward_metadata_out_graph(self, forward_batch, in_capture: bool):
        mode = forward_batch.forward_mode
        if not mode.is_decode():
            self.deferred.plan(decode_step=False)
            if mode.is_extend() and not in_capture:
                self.observer.extend(forward_batch)
            if self.prefill is not None:  # a prefill graph's plan: host reads, unstaged
                self.observer.prefill_staging(
                    self.prefill.plan(forward_batch, None, self.page_size)
                )
            return super().init_forward_metadata_out_graph(forward_batch, in_capture)
        if not in_capture:
            self.memory.report()
            return self._plan_graph_step(forward_batch, in_capture)
        with self.memory.track("graphs"):
            return self._plan_graph_step(forward_batch, in_capture)

    def _plan_graph_step(self, forward_batch, in_capture: bool) -> None:
        bs = forward_batch.batch_size
        host_seq_lens(forward_batch)  # the replay's plan reads the lengths on the host
        first_plan = bs not in self.graph_sparse
        if first_plan:
            self.graph_sparse[bs] = self._sparse_call(graph_batch=bs)
        # SGLang's first plan of a captured size allocates what plain SGLang would; its
        # second (the other step graph's wrappers) is ParisKV's cost
        sglang_own = self.memory.exclude("graphs") if first_plan else contextlib.nullcontext()
        # the replayed graph matters only when both graphs were captured
        replay = (
            self.step_graph(forward_batch.seq_lens_cpu[:bs])
            if self.graphs.captured and not in_capture
            else None
        )
        graph = self.graphs.graph_of(in_capture, replay)
        if not in_capture and self.graphs.captured:
            # SGLang plans decode_cuda_graph_metadata[bs]: make it the replayed graph's own
            self.decode_cuda_graph_metadata[bs] = self.graphs.wrappers(bs, graph)

        def sglang_plan():
            with sglang_own:
                super(ParisKVAttnBackend, self).init_forward_metadata_out_graph(
                    forward_batch, in_capture
                )

        self._plan_decode(
            forward_batch,
            sglang_plan,
            self.graph_sparse[bs],
            graph=graph,
            key=bs,
            in_capture=in_capture,
        )
        if in_capture and self.graphs.capture_step is not None:
            self.graphs.keep_wrappers(bs, self.decode_cuda_graph_metadata[bs])

    # -- layer work (device side) -----------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if self.prefill is None:
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        with self.prefill.reads(layer.layer_id):
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        local = layer.layer_id - self.token_to_kv_pool.start_layer
        out = self._decode_layer(q, k, v, layer, local, forward_batch, save_kv_cache)
        self.deferred.after_layer(local, forward_batch.out_cache_loc)
        return out

    def _decode_layer(self, q, k, v, layer, local: int, forward_batch, save_kv_cache: bool):
        if self.full is not None and self.full.runs(local) and not layer.is_cross_attention:
            # A dense layer on a sparse step: SGLang's decode call (it stores the K/V and
            # codes) with the full-length plan; it never retrieves.
            with self.full.planned():
                return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        fork = self._fork_stream(layer, k, save_kv_cache)
        if fork is not None:
            # Store the layer's K/V as SGLang's decode call would (codes: after the last
            # layer, ``deferred_codes``), then fork: the sparse call on the retrieval
            # stream attends the new key while the dense call (told the KV is stored)
            # runs on the forward stream.
            self.token_to_kv_pool.set_kv_buffer(
                layer, forward_batch.out_cache_loc, k, v, layer.k_scale, layer.v_scale
            )
            fork.wait_stream(torch.cuda.current_stream())
        out = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache and fork is None)
        if layer.is_cross_attention:
            return out
        with torch.cuda.stream(fork) if fork is not None else contextlib.nullcontext():
            sparse = self._sparse_decode(q, layer, local, forward_batch)
        if fork is not None:
            torch.cuda.current_stream().wait_stream(fork)
        if sparse is None:
            return out
        out = out.view(-1, self.hq * self.d)
        bs = forward_batch.batch_size
        head = out[:bs]  # one in-place select kernel, not a where plus a copy back
        keep_dense = self._dense_dev[:bs, None]
        torch.where(keep_dense, head, sparse.reshape(bs, -1).to(out.dtype), out=head)
        return out

    def _fork_stream(self, layer, k, save_kv_cache: bool) -> torch.cuda.Stream | None:
        """The retrieval stream when this decode layer can overlap its retrieval with the
        dense call: a sparse step on the GPU pool that writes this layer's KV."""
        if self._retrieval_stream is None or self._sparse is None:
            return None
        if layer.is_cross_attention or k is None or not save_kv_cache:
            return None
        return self._retrieval_stream

    def _sparse_decode(self, q, layer, local: int, forward_batch):
        """On a sparse step, retrieval and the head-as-batch FlashInfer call: the sparse
        rows' output [bs, Hq, D]; None on a dense step."""
        bs = forward_batch.batch_size
        if self._sparse is None:
            return None
        if self._rpi32 is None:
            raise RuntimeError(
                "ParisKV decode ran without its step tensors: init_forward_metadata (eager) "
                "or init_forward_metadata_in_graph (CUDA graphs) must precede the layers"
            )
        if q.numel() < bs * self.hq * self.d:
            raise RuntimeError(
                f"ParisKV decode: query of {q.numel()} values for {bs} requests x "
                f"{self.hq} heads x {self.d}: the backend's per-rank head count is wrong"
            )
        q3 = q.reshape(-1, self.hq, self.d)[:bs]
        self.observer.start(local)
        by_keys = self.config.rerank == "keys"
        self.ws.run(
            q3,
            self.codes.layers[local],
            self.req_to_token_pool.req_to_token,
            self._rpi32,
            scale=self.codes.calibration(local)[1],
            keys=self.token_to_kv_pool.get_key_buffer(layer.layer_id) if by_keys else None,
        )
        self.observer.stop(local)
        if self.offload is not None:
            return self.offload.run(local, self._sparse, self.ws, q3)
        # the GPU pool, or (offload without a hot cache) the host pool's CUDA views
        return self._sparse.run(
            q3,
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
        )
