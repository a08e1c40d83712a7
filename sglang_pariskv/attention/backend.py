"""``ParisKVAttnBackend``: SGLang's FlashInfer backend with ParisKV sparse decoding.

* Extend (prefill, chunked prefill, radix prefix hits): FlashInfer's dense attention,
  unchanged. The KV pool encodes every key it stores (``index.kv_pool``); afterwards the
  extending requests' centroid histograms are rebuilt from all their tokens.
* Decode: every step adds the new key to its request's histograms. Requests at or below
  the dense threshold attend through SGLang's own dense decode call, so their outputs are
  exactly dense ones. Longer requests attend through one "head as batch" FlashInfer call
  over the indices the retrieval workspace assembled (sink + local window + top-k per KV
  head). In a mixed batch the dense call is planned with one token for the sparse rows
  and the sparse call's dense rows are discarded, so each request pays for one attention.
* Overlap: on the GPU pool a decode layer's histogram add, retrieval and sparse call run
  on a second stream, forked right after the layer's KV write, while SGLang's dense call
  runs on the forward stream (0.23-0.27 ms per 128K step on the H100); the streams join
  before the select. ``SGLANG_PARISKV_OVERLAP=0`` keeps one stream.
* CUDA graphs: all host work (both plans) runs in ``init_forward_metadata_out_graph``;
  the captured layer work (encode, histogram add, retrieval kernels, two FlashInfer runs,
  a select) has fixed shapes and no host sync. With ``SGLANG_PARISKV_DENSE_GRAPHS=1``
  (opt-in until it has run on a GPU) each batch size gets two graphs (``plugin.py``
  hooks SGLang's decode graph runner): a sparse-step graph with the retrieval path and a
  dense-step graph without it, replayed when no request of the step needs retrieval, so
  short-request traffic does not pay for the retrieval kernels' launches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

from sglang_pariskv.attention.retrieval_timer import RetrievalTimer, timing_requested
from sglang_pariskv.attention.sparse_decode import HeadAsBatchDecode
from sglang_pariskv.codec.budget import step_dense_mask
from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.index.histograms import RequestHistograms
from sglang_pariskv.index.kv_pool import ParisKVTokenToKVPool
from sglang_pariskv.kernels.workspace import TOPK_VARIANTS, DecodeWorkspace
from sglang_pariskv.metrics import BatchCounts
from sglang_pariskv.offload.counters import FIELDS as HOT_CACHE_FIELDS
from sglang_pariskv.offload.counters import HotCacheCounterReader
from sglang_pariskv.offload.fetch import OffloadFetcher
from sglang_pariskv.offload.hot_cache import HotCache
from sglang_pariskv.offload.kv_pool import HostOffloadKVPool
from sglang_pariskv.server_flags import ParisKVConfigError
from sglang_pariskv.stats_file import stats_path, write_stats

logger = logging.getLogger("sglang_pariskv")


@dataclass
class DecodeStats:
    """Counters an operator reads: steps, plus the summed per-batch counts."""

    decode_steps: int = 0
    sparse_steps: int = 0  #: decode steps that ran the retrieval path
    retrieval_steps_timed: int = 0  #: steps whose retrieval GPU time was read back
    retrieval_seconds: float = 0.0  #: their summed retrieval GPU time
    totals: BatchCounts = dataclasses.field(default_factory=BatchCounts)


@contextlib.contextmanager
def _dense_rows_only(forward_batch, dense_cpu: torch.Tensor, dense_dev: torch.Tensor):
    """Show the dense planner 1-token sparse requests (their dense output is discarded)."""
    fb = forward_batch
    saved = (fb.seq_lens, fb.seq_lens_cpu, fb.seq_lens_sum)
    bs = dense_cpu.numel()
    seq = fb.seq_lens.clone()
    seq[:bs] = torch.where(dense_dev, fb.seq_lens[:bs], 1)
    seq_cpu = fb.seq_lens_cpu.clone()
    seq_cpu[:bs] = torch.where(dense_cpu, fb.seq_lens_cpu[:bs], 1)
    fb.seq_lens, fb.seq_lens_cpu, fb.seq_lens_sum = seq, seq_cpu, int(seq_cpu[:bs].sum())
    try:
        yield
    finally:
        fb.seq_lens, fb.seq_lens_cpu, fb.seq_lens_sum = saved


def query_heads_per_rank(model_runner) -> int:
    """Query heads this rank attends with, as the model's attention layers were built.

    ``ModelRunner`` in SGLang 0.5.17 has no ``tp_size`` attribute (the parallel state is
    in ``model_runner.ps`` / ``get_parallel()``): reading one with a default of 1 gave
    every TP rank the full head count, which the first TP=2 run on two H200s exposed.
    The layers' ``tp_q_head_num`` is what the query tensor is shaped by, so use it."""
    model = getattr(model_runner, "model", None)
    heads = {
        int(m.tp_q_head_num)
        for m in (model.modules() if model is not None else ())
        if type(m).__name__ == "RadixAttention"
    }
    if len(heads) > 1:
        raise ParisKVConfigError(
            f"attention layers with different query head counts {sorted(heads)}: ParisKV "
            "needs one shape for all layers; serve this model without --enable-pariskv"
        )
    if heads:
        return heads.pop()
    from sglang.srt.runtime_context import get_parallel

    return model_runner.model_config.get_num_attention_heads(get_parallel().attn_tp_size)


def tp_rank(model_runner) -> int:
    """This process's tensor-parallel rank (0 without TP)."""
    ps = getattr(model_runner, "ps", None)
    if ps is not None and getattr(ps, "tp_rank", None) is not None:
        return int(ps.tp_rank)
    from sglang.srt.runtime_context import get_parallel

    return int(get_parallel().tp_rank)


def _env_switch(name: str, default: str) -> bool:
    """A 0/1 switch from the environment; any other value is refused, naming it."""
    value = os.environ.get(name, default)
    if value not in ("0", "1"):
        raise ParisKVConfigError(f"{name}={value!r}: expected 0 or 1")
    return value == "1"


def overlap_from_env() -> bool:
    """``SGLANG_PARISKV_OVERLAP`` (1 default, 0 off): run each decode layer's retrieval and
    sparse call on a second stream, concurrently with SGLang's dense decode call."""
    return _env_switch("SGLANG_PARISKV_OVERLAP", "1")


def dense_graphs_from_env() -> bool:
    """``SGLANG_PARISKV_DENSE_GRAPHS`` (0 default, 1 on): capture a second, dense-step
    CUDA graph per batch size, replayed by steps that need no retrieval. Off by default
    until its GPU test (tests/test_serving_graphs.py) has run on a device."""
    return _env_switch("SGLANG_PARISKV_DENSE_GRAPHS", "0")


#: The two decode graphs per batch size: with the retrieval path, and without it.
STEP_GRAPHS: tuple[str, ...] = ("sparse", "dense")


def topk_variant_from_env() -> str:
    """``SGLANG_PARISKV_TOPK`` (radix / cuda / torch; default auto): the final top-k's
    implementation, for A/B runs of the multi-program radix top-k."""
    value = os.environ.get("SGLANG_PARISKV_TOPK", "auto")
    if value != "auto" and value not in TOPK_VARIANTS:
        raise ParisKVConfigError(
            f"SGLANG_PARISKV_TOPK={value!r}: expected auto or one of {list(TOPK_VARIANTS)}"
        )
    return value


class ParisKVAttnBackend(FlashInferAttnBackend):
    #: Host offload's hot cache + fetcher; None without offload (or with a zero-line cache).
    fetcher: OffloadFetcher | None = None
    #: Dense-step graphs wanted (``SGLANG_PARISKV_DENSE_GRAPHS``), captured by plugin.py's
    #: hook, and the graph being captured ("sparse" / "dense"; None outside a capture).
    dense_graphs_enabled: bool = False
    dense_graphs_captured: bool = False
    _capture_step: str | None = None
    #: Each (batch size, step graph)'s FlashInfer decode wrappers. SGLang's FlashInfer
    #: backend makes new wrappers at every capture and keeps only the last per batch size
    #: in ``decode_cuda_graph_metadata``, which is what a replay plans; a wrapper owns its
    #: int workspace (the plan the captured kernels read), so a replay of the other graph
    #: must plan that graph's own wrappers, which it then finds here.
    _graph_wrappers: dict

    def __init__(self, model_runner, config: ParisKVConfig):
        super().__init__(model_runner, init_new_workspace=model_runner.init_new_workspace)
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, ParisKVTokenToKVPool):
            raise ParisKVConfigError(
                f"the KV pool is {type(pool).__name__}, not ParisKV's: this model or mode "
                "builds a KV pool ParisKV does not support; serve without --enable-pariskv"
            )
        self.config = config
        self.codes = pool.pariskv
        self.hkv, self.d = pool.head_num, pool.head_dim
        # Under tensor parallelism this rank holds its share of the query and KV heads
        # (the pool is built with the rank's KV heads); retrieval is per KV head, so each
        # rank indexes and retrieves over its own heads with no collective.
        self.tp_rank, self.hq = tp_rank(model_runner), query_heads_per_rank(model_runner)
        rtt = self.req_to_token_pool.req_to_token
        device = torch.device(model_runner.device)
        self.hists = RequestHistograms(rtt.shape[0], self.hkv, self.d, pool.layer_num, device)
        # The workspace scales with batch x context: size it by the running-request
        # limit (the decode batch bound), not by the request pool's slot count.
        max_batch = min(
            getattr(model_runner, "max_running_requests", None) or rtt.shape[0], rtt.shape[0]
        )
        self._build_workspace(max_batch)
        self.graph_sparse: dict[int, HeadAsBatchDecode] = {}
        self._rpi32: torch.Tensor | None = None
        self._sparse: HeadAsBatchDecode | None = None  # active sparse call, None: all dense
        # Softmax scale and soft cap of the model's attention: FlashInfer plans them per
        # batch (and a captured graph bakes them in), so all layers must share them.
        self._scale: tuple[float, float] | None = None
        model = getattr(model_runner, "model", None)
        for module in model.modules() if model is not None else ():
            if type(module).__name__ == "RadixAttention":
                self._check_scale(module)
        # Found at init: every layer is already checked; else learn it at the first prefill.
        self._scale_checked_at_init = self._scale is not None
        self._dense_dev = torch.zeros(rtt.shape[0], dtype=torch.bool, device=device)
        self.dense_graphs_enabled = dense_graphs_from_env()
        self._graph_wrappers = {}
        # The stream a decode layer's retrieval and sparse call run on, forked from the
        # forward stream right after the KV write (GPU pool only: host offload's fetch
        # and write-behind streams keep the serial order).
        overlap = device.type == "cuda" and overlap_from_env()
        overlap = overlap and not isinstance(pool, HostOffloadKVPool)
        self._retrieval_stream = torch.cuda.Stream(device) if overlap else None
        args = model_runner.server_args
        # Retrieval GPU time per step: on with --enable-metrics (see retrieval_timer).
        metrics_on = bool(getattr(args, "enable_metrics", False))
        timed = timing_requested(metrics_on)
        self.timer = RetrievalTimer(pool.layer_num) if timed and device.type == "cuda" else None
        self.stats = DecodeStats()
        self.metrics = None
        self._stats_path = stats_path(self.tp_rank)
        # Every TP rank counts the same requests: rank 0 exports them (as SGLang's own
        # scheduler metrics do), so operators' sums are not multiplied by the TP size.
        if metrics_on and self.tp_rank == 0:
            from sglang_pariskv.metrics import process_metrics

            self.metrics = process_metrics(
                {
                    "model_name": str(getattr(args, "served_model_name", None) or args.model_path),
                    "tp_rank": str(self.tp_rank),
                }
            )
        self._warn_inline_prefill_copy()
        self._dump_stats()
        logger.info(
            "ParisKV backend: codes %.1f MiB, histograms %.1f MiB (%d request slots), "
            "dense-step graphs %s, config %s",
            self.codes.nbytes() / 2**20,
            self.hists.nbytes() / 2**20,
            rtt.shape[0],
            "on" if self.dense_graphs_enabled else "off (SGLANG_PARISKV_DENSE_GRAPHS=1 for on)",
            config.to_dict(),
        )

    def _warn_inline_prefill_copy(self) -> None:
        """--pariskv-prefill-copy side_stream defers only ragged extends' stores; say so at
        startup when SGLang's FlashInfer backend will run every extend paged."""
        if self.config.prefill_copy != "side_stream":
            return
        why = [
            name
            for name, on in (
                ("SGLANG_FLASHINFER_USE_PAGED", getattr(self, "use_paged", False)),
                ("--enable-deterministic-inference", getattr(self, "enable_deterministic", False)),
                ("a multimodal model", getattr(self, "is_multimodal", False)),
            )
            if on
        ]
        if why:
            logger.warning(
                "--pariskv-prefill-copy side_stream has no effect with %s: FlashInfer reads "
                "each extend's K/V back from the pool, so their stores stay on the forward "
                "stream",
                " and ".join(why),
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
            elide_dense_rows=True,  # dense requests go through SGLang's own decode call
            topk_variant=topk_variant_from_env(),
        )
        self.eager_sparse = HeadAsBatchDecode(self.ws, self.token_to_kv_pool.dtype)
        self._build_fetcher()

    def _build_fetcher(self) -> None:
        """Host offload: the hot cache and fetcher the sparse call reads through. Sized
        by the workspace (its overflow rows hold one step's misses), so rebuilt with it."""
        pool = self.token_to_kv_pool
        self.fetcher = None
        if not isinstance(pool, HostOffloadKVPool) or self.config.hot_cache_lines == 0:
            return  # no offload, or zero-copy: FlashInfer reads the host rows directly
        # Drop every reference to the old cache (rebuilt for a larger workspace) before
        # allocating the new one, so the two never coexist in GPU memory.
        pool.hot_cache = self.hot_cache_reader = None
        cache = HotCache(
            pool.layer_num,
            self.config.hot_cache_lines,
            self.hkv,
            2 * self.d,
            max_entries=self.ws.kv_indices.numel(),
            dtype=pool.dtype,
            device=self.ws.device,
        )
        pool.hot_cache = cache
        # SGLANG_PARISKV_FUSED_FETCH=0 selects HotCache's tensor-op fetch (A/B checks).
        fused = os.environ.get("SGLANG_PARISKV_FUSED_FETCH", "1") != "0"
        self.fetcher = OffloadFetcher(pool.host, cache, fused=fused and cache.data.is_cuda)
        self.hot_cache_reader = HotCacheCounterReader(cache)
        logger.info(
            "ParisKV offload: host pool %.1f GiB, hot cache %d lines/layer (%.1f MiB)",
            pool.host_bytes() / 2**30,
            self.config.hot_cache_lines,
            cache.nbytes() / 2**20,
        )

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, *args, **kwargs):
        super().init_cuda_graph_state(max_bs, max_num_tokens, *args, **kwargs)
        if max_bs > self.ws.max_batch:  # graphs are captured up to max_bs rows
            self._build_workspace(max_bs)

    def snapshot(self) -> dict:
        """Counters for operators: decode steps, attended fraction, encode work."""
        st = dataclasses.asdict(self.stats.totals)
        st.update(
            decode_steps=self.stats.decode_steps,
            sparse_steps=self.stats.sparse_steps,
            retrieval_steps_timed=self.stats.retrieval_steps_timed,
            retrieval_seconds=self.stats.retrieval_seconds,
        )
        st["attended_fraction"] = st["attended_tokens"] / max(st["context_tokens"], 1)
        st["config"] = self.config.to_dict()
        pool = getattr(self, "token_to_kv_pool", None)
        if isinstance(pool, HostOffloadKVPool):
            st["offload_host_pool_gib"] = pool.host_bytes() / 2**30
            wb = pool.write_behind
            st["offload_copy_stream_stores"] = wb.stores if wb is not None else 0
            totals = self.hot_cache_reader.totals if self.fetcher is not None else {}
            for key in HOT_CACHE_FIELDS:  # flat: stats files sum numbers
                st[f"hot_cache_{key}"] = totals.get(key, 0)
        return st

    def _dump_stats(self) -> None:
        if self._stats_path is not None:
            write_stats(self._stats_path, self.snapshot())

    # -- metadata (host side) ---------------------------------------------------------
    def step_is_sparse(self, seq_lens_cpu: torch.Tensor) -> bool:
        """Whether a decode step runs the retrieval path: some request is above the dense
        threshold (and, with ``min_sparse_tokens``, those hold enough tokens in all). The
        graph runner picks the step's graph with it (plugin.py) and ``_plan_decode`` plans
        with it; CUDA-graph padding rows (seq_len 1) are dense and add no tokens, so the
        padded batch and the real one give the same answer."""
        return bool((~step_dense_mask(seq_lens_cpu, self.config)).any())

    def step_graph(self, seq_lens_cpu: torch.Tensor) -> str:
        """The decode graph a step with dense-step graphs replays: "sparse" iff
        :meth:`step_is_sparse`, else "dense" (the runner's label and the plan both ask)."""
        return "sparse" if self.step_is_sparse(seq_lens_cpu) else "dense"

    @contextlib.contextmanager
    def capturing(self, step: str):
        """Capture the ``step`` graph ("sparse" or "dense") of a batch size: the sparse one
        holds the retrieval path whatever the capture batch's lengths are."""
        if step not in STEP_GRAPHS:
            raise ValueError(f"unknown decode graph {step!r}: expected one of {STEP_GRAPHS}")
        self._capture_step = step
        try:
            yield
        finally:
            self._capture_step = None
        if step == "dense":
            self.dense_graphs_captured = True

    def _plan_decode(
        self,
        forward_batch,
        plan_dense,
        sparse: HeadAsBatchDecode,
        graph: str | None = None,
        key="eager",
    ):
        """Plan both calls of a decode step. ``graph``: the CUDA graph the step captures or
        replays, "sparse" (it holds the retrieval path, run even if no request needs it)
        or "dense" (it does not); None (eager): as the lengths say."""
        bs = forward_batch.batch_size
        self._rpi32 = None  # set by _prepare_step_tensors once the plan is made
        seq_cpu = forward_batch.seq_lens_cpu[:bs]
        dense_cpu = step_dense_mask(seq_cpu, self.config)
        real = seq_cpu > 1  # CUDA-graph padding rows have seq_len 1; a real decode has >= 2
        sparse_rows = ~dense_cpu
        if graph is not None and graph not in STEP_GRAPHS:
            raise ValueError(f"unknown decode graph {graph!r}: expected one of {STEP_GRAPHS}")
        run_sparse = graph == "sparse" or (graph is None and bool(sparse_rows.any()))
        self.stats.decode_steps += 1
        self.stats.sparse_steps += int(run_sparse)
        if self.fetcher is not None and (self.metrics is not None or self._stats_path):
            delta = self.hot_cache_reader.poll()  # no sync: copies behind the queued work
            if self.metrics is not None:
                self.metrics.add_hot_cache(delta)
        self._emit(
            BatchCounts(
                tokens_encoded=int(real.sum()),
                dense_request_steps=int((dense_cpu & real).sum()),
                sparse_request_steps=int(sparse_rows.sum()),
                attended_tokens=int(sparse_rows.sum()) * self.config.budget,
                context_tokens=int(seq_cpu[sparse_rows].sum()),
            )
        )
        if self.timer is not None:
            timer = self.timer
            self._observe_retrieval(timer.begin_step(key) if run_sparse else timer.disarm())
        if not run_sparse:
            self._sparse = None
            plan_dense()
            return
        self._dense_dev[:bs].copy_(dense_cpu, non_blocking=True)
        with _dense_rows_only(forward_batch, dense_cpu, self._dense_dev[:bs]):
            plan_dense()
        scale, cap = self._scale or (self.d**-0.5, 0.0)
        sparse.plan(seq_cpu, sm_scale=scale, logits_soft_cap=cap)
        self._sparse = sparse

    def _observe_retrieval(self, seconds: float | None) -> None:
        if seconds is None:
            return
        self.stats.retrieval_steps_timed += 1
        self.stats.retrieval_seconds += seconds
        if self.metrics is not None:
            self.metrics.observe_retrieval(seconds)

    def _emit(self, counts: BatchCounts) -> None:
        self.stats.totals.accumulate(counts)
        if self.metrics is not None:
            self.metrics.add(counts)
        self._dump_stats()

    def _count_extend(self, forward_batch) -> None:
        """Extend encodes its new tokens; its prefix tokens' codes are reused, not redone."""
        new = forward_batch.extend_seq_lens_cpu
        prefix = forward_batch.extend_prefix_lens_cpu
        counts = BatchCounts(
            tokens_encoded=int(sum(new)) if new is not None else 0,
            prefix_tokens_reused=int(sum(prefix)) if prefix is not None else 0,
        )
        self._emit(counts)

    def _drain_host_writes(self) -> None:
        """Decode reads host K/V in every layer, and a replayed graph cannot wait for the
        copy stream by itself: the step's stream waits for pending stores up front."""
        pool = self.token_to_kv_pool
        if isinstance(pool, HostOffloadKVPool):
            pool.drain_writes()

    def init_forward_metadata(self, forward_batch):
        if forward_batch.forward_mode.is_decode():
            self._drain_host_writes()
        if not forward_batch.forward_mode.is_decode() or forward_batch.batch_size == 0:
            self._sparse = None
            if forward_batch.forward_mode.is_extend():
                self._count_extend(forward_batch)
            return super().init_forward_metadata(forward_batch)
        if forward_batch.seq_lens_cpu is None:
            forward_batch.seq_lens_cpu = forward_batch.seq_lens.cpu()
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
        replayed with it. Made lazily by the first layer instead, it was skipped on the
        capture run (the warm-up run had already set it), and every replay read the
        warm-up's request indices: retrieval over the wrong requests' histograms."""
        if self._sparse is None or not forward_batch.forward_mode.is_decode():
            return
        bs = forward_batch.batch_size
        self._rpi32 = forward_batch.req_pool_indices[:bs].to(torch.int32)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        mode = forward_batch.forward_mode
        if not mode.is_decode():
            if mode.is_extend() and not in_capture:
                self._count_extend(forward_batch)
            return super().init_forward_metadata_out_graph(forward_batch, in_capture)
        if not in_capture:
            self._drain_host_writes()
        bs = forward_batch.batch_size
        if bs not in self.graph_sparse:
            self.graph_sparse[bs] = HeadAsBatchDecode(
                self.ws, self.token_to_kv_pool.dtype, graph_batch=bs
            )
        graph = self._graph_step(forward_batch, in_capture)
        if not in_capture and self.dense_graphs_captured:
            # SGLang plans decode_cuda_graph_metadata[bs]: make it the replayed graph's own
            self.decode_cuda_graph_metadata[bs] = self._graph_wrappers[(bs, graph)]
        self._plan_decode(
            forward_batch,
            lambda: super(ParisKVAttnBackend, self).init_forward_metadata_out_graph(
                forward_batch, in_capture
            ),
            self.graph_sparse[bs],
            graph=graph,
            key=bs,
        )
        if in_capture and self._capture_step is not None:
            self._graph_wrappers[(bs, self._capture_step)] = self.decode_cuda_graph_metadata[bs]

    def _graph_step(self, forward_batch, in_capture: bool) -> str:
        """The graph of this capture or replay, for :meth:`_plan_decode`. A capture is of
        the graph the plugin's hook named (the sparse one when no hook ran). With
        dense-step graphs captured, a replay's graph is the one the runner picked by
        :meth:`step_graph`; without them (the default, ``SGLANG_PARISKV_DENSE_GRAPHS``
        not 1, or a runner the hook did not reach) every graph is a sparse one, whose
        dense rows are selected out."""
        if in_capture:
            return self._capture_step or "sparse"
        if self.dense_graphs_captured:
            return self.step_graph(forward_batch.seq_lens_cpu[: forward_batch.batch_size])
        return "sparse"

    # -- layer work (device side) -----------------------------------------------------
    def _check_scale(self, layer) -> None:
        scale = (float(layer.scaling), float(layer.logit_cap or 0.0))
        if self._scale is None:
            self._scale = scale
        elif scale != self._scale:
            raise ParisKVConfigError(
                f"layer {layer.layer_id} uses softmax scale/soft cap {scale}, others "
                f"{self._scale}: ParisKV needs one scale for all layers; serve this model "
                "without --enable-pariskv"
            )

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if not self._scale_checked_at_init:
            self._check_scale(layer)
        pool = self.token_to_kv_pool
        # A ragged extend attends to its new K/V from k, v (to the pool only for its
        # prefix), so with a copy stream their store may trail this forward
        # (offload.write_behind); a paged extend reads them back from the pool at once.
        deferring = isinstance(pool, HostOffloadKVPool) and pool.write_behind is not None
        if deferring:
            pool.defer_writes = bool(getattr(self.forward_metadata, "use_ragged", False))
        try:
            out = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        finally:
            if deferring:
                pool.defer_writes = False
        if k is not None and save_kv_cache and not layer.is_cross_attention:
            local = layer.layer_id - self.token_to_kv_pool.start_layer
            self.hists.rebuild(
                local,
                self.codes.layers[local].signs,
                self.req_to_token_pool.req_to_token,
                forward_batch.req_pool_indices,
                forward_batch.seq_lens,
                max_len=int(forward_batch.seq_lens_cpu.max())
                if forward_batch.seq_lens_cpu is not None
                else None,
            )
        return out

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        fork = self._fork_stream(layer, k, save_kv_cache)
        if fork is not None:
            self.token_to_kv_pool.fork_after_write = fork
        out = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        if fork is not None and self.token_to_kv_pool.fork_after_write is not None:
            # SGLang stored no KV through the pool: fork here instead (no overlap).
            self.token_to_kv_pool.fork_after_write = None
            fork.wait_stream(torch.cuda.current_stream())
        if layer.is_cross_attention:
            return out
        with torch.cuda.stream(fork) if fork is not None else contextlib.nullcontext():
            sparse = self._sparse_decode(q, k, layer, forward_batch, save_kv_cache)
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
        if self._retrieval_stream is None or self._sparse is None or self.fetcher is not None:
            return None
        if layer.is_cross_attention or k is None or not save_kv_cache:
            return None
        return self._retrieval_stream

    def _sparse_decode(self, q, k, layer, forward_batch, save_kv_cache: bool):
        """The new key into its request's histograms, then (on a sparse step) retrieval and
        the head-as-batch FlashInfer call: the sparse rows' output [bs, Hq, D], or None."""
        local = layer.layer_id - self.token_to_kv_pool.start_layer
        bs = forward_batch.batch_size
        codes = self.codes.layers[local]
        if save_kv_cache and k is not None:
            # Rows padded in by CUDA-graph replay have seq_len 1 (a real decode has >= 2)
            # and are skipped.
            self.hists.add_decode(
                local,
                codes.signs,
                forward_batch.out_cache_loc[:bs],
                forward_batch.req_pool_indices[:bs],
                forward_batch.seq_lens[:bs],
            )
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
        if self.timer is not None:
            self.timer.start(local)
        self.ws.run(
            q3,
            codes,
            self.hists.layers[local],
            self.req_to_token_pool.req_to_token,
            self._rpi32,
        )
        if self.timer is not None:
            self.timer.stop(local)
        if self.fetcher is not None:
            # Host offload: stage the retrieved rows in the hot cache (misses come over
            # UVA) and rewrite the indices, in place, to their staging rows.
            rows = self._sparse.rows
            self.fetcher.fetch(
                local,
                self.ws.kv_indptr[: rows + 1],
                self.ws.kv_indices[: self._sparse.entries()],
                out=self.ws.kv_indices[: self._sparse.entries()],
            )
            sparse = self._sparse.run_staged(q3, self.fetcher.staging_kv())
        else:  # the GPU pool, or (offload without a hot cache) the host pool's CUDA views
            sparse = self._sparse.run(
                q3,
                self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            )
        return sparse
