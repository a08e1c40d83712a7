"""The decode-step retrieval pipeline as one CUDA-graph-capturable ``plan``/``run`` object.

Modelled on FlashInfer's wrappers: buffers are preallocated once from (max batch, max
context). :meth:`DecodeWorkspace.plan` is the host-side part: from the CPU sequence lengths
(SGLang has them as ``seq_lens_cpu``) it computes, with the :mod:`codec.budget` functions
themselves, every per-request number of the step (dense flag, zone end, candidate count
C, and the ``kv_indptr`` FlashInfer's own plan needs on the host) and copies
them to a device buffer with one non-blocking copy. :meth:`run` launches only fixed-shape
device work (no ``.item()``, no host sync, grids sized from the maxima), so a graph
captured once replays correctly after any later ``plan`` with lengths <= ``max_context``.

Each stage has one implementation per machine, chosen at construction: the CUDA kernels
of ``csrc/`` where they build and fit the shape (:func:`cuda_kernels_usable`; launch shapes
from :mod:`kernels.launch_geometry`), else Triton and torch. Stages of :meth:`run`, CUDA /
Triton: query_table (``csrc/query_table.cu`` / ``query_table.py``), scan
(``csrc/collision_scan.cu`` / ``collision.py``), select (``select.py``: the count pass; the
Triton path also writes the candidates), rerank (``csrc/select_rerank.cu``, which writes
the candidates too / ``rerank.py``; with ``config.rerank == "keys"`` both score each
candidate by its stored key instead of its 3-bit code), topk (``csrc/topk.cu`` /
``torch.topk``), assemble (``assemble.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import torch

from sglang_pariskv.codec.budget import (
    candidate_ratios,
    dense_mask,
    num_candidates,
    zone_lengths,
)
from sglang_pariskv.codec.collision import SCORE_BINS
from sglang_pariskv.codec.encode import KeyCodes
from sglang_pariskv.codec.query import PreparedQuery
from sglang_pariskv.codec.rotation import rotation_matrix
from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.kernels.assemble import assemble_indices, kv_indptr_for
from sglang_pariskv.kernels.collision import collision_scan
from sglang_pariskv.kernels.cuda_ops import (
    collision_scan_cuda,
    cuda_available,
    query_table_cuda,
    select_rerank_cuda,
    topk_cuda,
)
from sglang_pariskv.kernels.launch_geometry import (
    SELECT_RERANK_CHUNK,
    check_cuda_kernels_fit,
    scan_tokens_per_block,
    topk_cluster_for,
)
from sglang_pariskv.kernels.query_table import query_table
from sglang_pariskv.kernels.rerank import levels, rerank_by_keys, rerank_estimates, topk_slots
from sglang_pariskv.kernels.select import (
    CandidateBuffers,
    count_candidates,
    select_candidates_gpu,
)
from sglang_pariskv.support import check_kernel_head_dim

logger = logging.getLogger("sglang_pariskv")

#: Per-request int64 fields of the plan buffer, in order.
_FIELDS = ("seq", "dense", "counts", "zone_end")


def cuda_kernels_usable(device: torch.device, hkv: int, b: int, nbp: int) -> bool:
    """The csrc/ kernels run this workspace's stages: a CUDA device, nvcc built every
    kernel for it (:func:`cuda_available`), and the shape fits them (else a warning, and
    the Triton kernels)."""
    if device.type != "cuda" or not cuda_available():
        return False
    try:
        check_cuda_kernels_fit(hkv, b, nbp, device)
    except ValueError as e:
        logger.warning("ParisKV: %s; falling back to the Triton kernels", e)
        return False
    return True


def max_candidates(config: ParisKVConfig, max_context: int) -> int:
    """The largest C any request of at most ``max_context`` tokens can get (C is not
    monotone in the zone length: the adaptive ratio drops at 5K/10K/30K)."""
    zone = zone_lengths(torch.arange(max_context + 1), config)
    return max(int(num_candidates(zone, candidate_ratios(zone, config), config).max()), 1)


def _tensor_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's data (pointer, shape, strides): static under CUDA graphs."""
    return (t.data_ptr(), tuple(t.shape), t.stride())


class DecodeOutput(NamedTuple):
    kv_indptr: torch.Tensor  #: int32 [R * Hkv + 1]
    kv_indices: torch.Tensor  #: int32 [capacity]; entries [0, kv_indptr[-1]) are valid
    dense: torch.Tensor  #: int64 [R], 1 where the request attends densely
    num_candidates: torch.Tensor  #: int64 [R]: C of each request (0 if dense)


class DecodeWorkspace:
    """Preallocated state of ParisKV decode retrieval for one layer shape.

    One instance serves every layer (buffers are reused layer after layer; ``plan`` once
    per decode step, ``run`` once per layer). Inputs of :meth:`run` are SGLang's:
    ``req_to_token`` int32 ``[max_reqs, max_context]``, ``req_pool_indices`` int32 [R].
    """

    def __init__(
        self,
        config: ParisKVConfig,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_batch: int,
        max_context: int,
        device: torch.device | str = "cuda",
        chunk: int = SELECT_RERANK_CHUNK,
        scan_block: int = 256,
        scan_tiles: int = 8,
    ) -> None:
        """``chunk``, ``scan_block``, ``scan_tiles``: tile sizes of the Triton candidate
        selection and scan (positions per selection chunk; positions per scan tile, tiles
        per program). The CUDA kernels' are fixed by csrc/ (the count pass then uses
        :data:`SELECT_RERANK_CHUNK`); tests shrink the Triton ones so that small contexts
        span several programs."""
        check_kernel_head_dim(head_dim)
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads over {num_kv_heads} KV heads")
        self.config = config
        self.hq, self.hkv, self.d = num_q_heads, num_kv_heads, head_dim
        self.b = head_dim // 8
        self.max_batch, self.max_context = max_batch, max_context
        self.device = torch.device(device)
        self.nbp = SCORE_BINS
        #: Every stage runs its csrc/ kernel (else its Triton / torch version).
        self.use_cuda = cuda_kernels_usable(self.device, num_kv_heads, self.b, self.nbp)
        self.num_sms = (
            torch.cuda.get_device_properties(self.device).multi_processor_count
            if self.device.type == "cuda"
            else 132
        )
        self.scan_block, self.scan_tiles = scan_block, scan_tiles
        dev = self.device
        h, b, rmax = num_kv_heads, self.b, max_batch
        self.cmax = max_candidates(config, max_context)
        self.k = min(config.topk, self.cmax)
        self.topk_cluster = topk_cluster_for(self.cmax, dev)
        # Dense requests get one-token rows (kernels.assemble), so a row holds at most
        # the sparse budget.
        self.max_row = config.budget
        self.rot = rotation_matrix(head_dim, config.rotation_seed, torch.float32, dev)
        self.meta = torch.zeros(len(_FIELDS) * rmax, dtype=torch.int64, device=dev)
        self.query = PreparedQuery(
            blocks=torch.empty(rmax, h, b, 8, dtype=torch.float32, device=dev),
            norm=torch.empty(rmax, h, dtype=torch.float32, device=dev),
        )
        self.table = torch.empty(rmax, h, b, 256, dtype=torch.int8, device=dev)
        self.scores = torch.empty(rmax, h, max_context, dtype=torch.uint8, device=dev)
        self.score_hist = torch.zeros(rmax, h, self.nbp, dtype=torch.int32, device=dev)
        self.cand = torch.empty(rmax, h, self.cmax, dtype=torch.int32, device=dev)
        self.est = torch.empty(rmax, h, self.cmax, dtype=torch.float32, device=dev)
        self.top = torch.zeros(rmax, h, self.k, dtype=torch.int32, device=dev)
        self.levels = levels(dev)
        sel_chunk = SELECT_RERANK_CHUNK if self.use_cuda else chunk
        self.sel = CandidateBuffers(rmax * h, max_context, sel_chunk, dev)
        self.kv_indptr = torch.zeros(rmax * h + 1, dtype=torch.int32, device=dev)
        self.kv_indices = torch.zeros(rmax * h * self.max_row, dtype=torch.int32, device=dev)
        # Contiguous copy of the last run's query, written by the CUDA query + table kernel
        # (allocated at the first run, in the query's dtype): see contiguous_query.
        self._query_copy: torch.Tensor | None = None
        self._query_copied_from: tuple | None = None  # (data_ptr, shape, strides) of that query
        self._r: int | None = None

    # -- host side -------------------------------------------------------------------
    def plan(self, seq_lens_cpu: torch.Tensor) -> torch.Tensor:
        """Plan the next :meth:`run` (s) from CPU sequence lengths [R] (the decoded token
        included). Returns the host ``kv_indptr`` (int32 [R * Hkv + 1]) that FlashInfer's
        plan takes; the same array is copied to :attr:`kv_indptr` for the device."""
        seq = seq_lens_cpu.detach().to("cpu", torch.int64)
        r = seq.numel()
        if r > self.max_batch:
            raise ValueError(f"batch {r} > max_batch {self.max_batch}")
        if r and int(seq.max()) > self.max_context:
            raise ValueError(f"a sequence is longer than max_context {self.max_context}")
        cfg, rmax = self.config, self.max_batch
        dense = dense_mask(seq, cfg)
        zone = torch.where(dense, 0, zone_lengths(seq, cfg))
        counts = num_candidates(zone, candidate_ratios(zone, cfg), cfg)
        host = torch.zeros(self.meta.numel(), dtype=torch.int64, pin_memory=self._pin())
        for i, field in enumerate((seq, dense.to(torch.int64), counts, zone + cfg.sink)):
            host[i * rmax : i * rmax + r] = field
        self.meta.copy_(host, non_blocking=True)
        indptr = kv_indptr_for(seq, cfg, self.hkv)
        n = indptr.numel()
        self.kv_indptr[:n].copy_(indptr.pin_memory() if self._pin() else indptr, non_blocking=True)
        self._r = r
        return indptr

    def _pin(self) -> bool:
        return self.device.type == "cuda"

    def _meta(self, field: str, r: int) -> torch.Tensor:
        i = _FIELDS.index(field) * self.max_batch
        return self.meta[i : i + r]

    # -- device side -----------------------------------------------------------------
    def run(
        self,
        q: torch.Tensor,
        codes: KeyCodes,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        stages: dict | None = None,
        scale: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
    ) -> DecodeOutput:
        """Retrieve and assemble the attended indices of decode queries ``q [R, Hq, D]``.

        codes: this layer's pool (:class:`KeyCodes` of ``[slots, Hkv, ...]`` tensors).
        The batch must be the one of the last :meth:`plan`. ``stages``, when a dict,
        receives each stage's intermediate tensors (tests, benchmarks). ``scale``: this
        layer's calibration channel scales, fp32 ``[Hkv, D]`` (the codes' own,
        :class:`index.code_pool.CodePool`); None: 1. ``keys``: this layer's K buffer
        (contiguous ``[slots, Hkv, D]``), which the rerank by the keys reads.
        """
        self.bind(q, codes, req_to_token, req_pool_indices, scale, keys)
        for _, stage in self.stages():
            stage()
        st = self._st
        if stages is not None:
            stages.update(vars(st))
        return DecodeOutput(st.indptr, self.kv_indices, st.dense, st.counts)

    def bind(
        self,
        q: torch.Tensor,
        codes: KeyCodes,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        scale: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
    ) -> None:
        """Set the inputs of the stage methods (``run`` = ``bind`` + every stage)."""
        r = q.shape[0]
        if r != self._r:
            raise ValueError(f"run() with batch {r} but the last plan() was for {self._r}")
        if self.config.rerank == "keys" and keys is None:
            raise ValueError("the rerank by the keys needs the layer's K buffer: pass keys")
        self._st = SimpleNamespace(
            q=q,
            scale=scale,
            codes=codes,
            keys=keys,
            rtt=req_to_token,
            rpi=req_pool_indices,
            r=r,
            seq=self._meta("seq", r),
            dense=self._meta("dense", r),
            counts=self._meta("counts", r),
            zone_end=self._meta("zone_end", r),
            indptr=self.kv_indptr[: r * self.hkv + 1],
            cand=self.cand[:r],
            est=self.est[:r],
        )

    def stages(self) -> list[tuple[str, Callable[[], None]]]:
        """(name, fn) of each stage in order; the benchmark times them one by one."""
        return [
            ("query_table", self._stage_query_table),
            ("scan", self._stage_scan),
            ("select", self._stage_select),
            ("rerank", self._stage_rerank),
            ("topk", self._stage_topk),
            ("assemble", self._stage_assemble),
        ]

    def _stage_query_table(self) -> None:
        """Query prep, centroid table and score-histogram reset in one launch."""
        st = self._st
        st.query = PreparedQuery(self.query.blocks[: st.r], self.query.norm[: st.r])
        st.table = self.table[: st.r]
        st.score_hist = self.score_hist[: st.r]
        args = (st.q, self.rot, st.query, st.table, st.score_hist)
        self._query_copied_from = None
        if not self.use_cuda:
            query_table(*args, scale=st.scale)
            return
        q = st.q
        if self._query_copy is None or self._query_copy.dtype != q.dtype:
            self._query_copy = torch.empty(
                self.max_batch, *q.shape[1:], dtype=q.dtype, device=q.device
            )
        query_table_cuda(*args, query_copy=self._query_copy[: st.r], scale=st.scale)
        self._query_copied_from = _tensor_key(q)

    def contiguous_query(self, q: torch.Tensor) -> torch.Tensor | None:
        """``q`` as a contiguous tensor if the last run was on this very tensor and the CUDA
        query + table kernel copied it as a by-product; else None (use ``q``). The sparse
        FlashInfer call reads its query as ``[R * Hkv, G, D]`` rows, which a strided query
        (SGLang's view of the QKV projection) can only become through a copy kernel."""
        if self._query_copied_from is None or self._query_copied_from != _tensor_key(q):
            return None
        return self._query_copy[: q.shape[0]]

    def _stage_scan(self) -> None:
        st = self._st
        st.scores = self.scores[: st.r]  # st.score_hist: zeroed by _stage_query_table
        args = (st.codes.signs, st.rtt, st.rpi, st.seq, st.zone_end, st.table, st.scores)
        if self.use_cuda:
            tpb = scan_tokens_per_block(self.max_context, st.r, self.num_sms)
            collision_scan_cuda(*args, st.score_hist, self.config.sink, tpb)
        else:
            collision_scan(*args, st.score_hist, self.config.sink, self.scan_block, self.scan_tiles)

    def _stage_select(self) -> None:
        """The count pass, then (Triton only: CUDA fuses it into the rerank) the candidate
        write."""
        st = self._st
        if self.use_cuda:
            args = (st.scores, st.score_hist, st.counts, self.config.sink, st.zone_end)
            count_candidates(*args, self.sel)
            return
        select_candidates_gpu(
            st.scores,
            st.score_hist,
            st.counts,
            self.config.sink,
            st.zone_end,
            st.cand,
            self.sel,
            st.rtt,
            st.rpi,
        )

    def _stage_rerank(self) -> None:
        st = self._st
        codes = st.codes
        by_keys = self.config.rerank == "keys"
        if self.use_cuda:
            select_rerank_cuda(
                st.scores,
                self.sel,
                st.counts,
                self.config.sink,
                st.zone_end,
                st.rtt,
                st.rpi,
                codes.signs,
                codes.mags,
                codes.weights,
                st.query.blocks,
                st.query.norm,
                self.levels,
                st.cand,
                st.est,
                keys=st.keys if by_keys else None,
                query=self._query_copy[: st.r] if by_keys else None,
            )
            return
        if by_keys:
            rerank_by_keys(st.cand, st.counts, st.keys, st.q, st.est)
            return
        args = (st.cand, st.counts, codes.signs, codes.mags, codes.weights)
        rerank_estimates(*args, st.query.blocks, st.query.norm, st.est)

    def _stage_topk(self) -> None:
        st = self._st
        if not self.use_cuda:
            st.top = topk_slots(st.est, st.cand, self.k)
            return
        st.top = self.top[: st.r]
        topk_cuda(st.est, st.cand, st.counts, st.top, self.topk_cluster)

    def _stage_assemble(self) -> None:
        st = self._st
        assemble_indices(
            st.rtt,
            st.rpi,
            st.seq,
            st.dense,
            st.top,
            st.indptr,
            self.kv_indices,
            self.config,
            self.max_row,
        )
