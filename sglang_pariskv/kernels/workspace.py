"""The decode-step retrieval pipeline as one CUDA-graph-capturable ``plan``/``run`` object.

Modelled on FlashInfer's wrappers: buffers are preallocated once from (max batch, max
context). :meth:`DecodeWorkspace.plan` is the host-side part: from the CPU sequence lengths
(SGLang has them as ``seq_lens_cpu``) it computes, with the :mod:`codec.budget` functions
themselves, every per-request number of the step (dense flag, zone end, candidate count C,
tier thresholds, and the ``kv_indptr`` FlashInfer's own plan needs on the host) and copies
them to a device buffer with one non-blocking copy. :meth:`run` launches only fixed-shape
device work (no ``.item()``, no host sync, grids sized from the maxima), so a graph
captured once replays correctly after any later ``plan`` with lengths <= ``max_context``.

The tier thresholds take N = seq_len: the histograms count every written token of the
request (the decoded token included), so their total is seq_len by construction.

Stages of :meth:`run` (each a module of this package):
  query prep + tier table (one launch: ``csrc/query_tiers.cu``, or ``query_tiers.py``
  fusing ``query.py`` and ``tiers.py``) -> collision scan + score histogram
  (``collision.py`` / CUDA ``cuda_ops.py``) -> candidate selection (``select.py``) -> rerank + top-k
  (``rerank.py``) -> index assembly (``assemble.py``). With the CUDA kernels the
  selection's candidate write is fused into the rerank (``csrc/select_rerank.cu``): the
  "select" stage is then the count pass alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import torch

from sglang_pariskv.codec.budget import (
    dense_mask,
    num_candidates,
    retrieval_ratios,
    tier_thresholds,
    zone_lengths,
)
from sglang_pariskv.codec.encode import KeyCodes
from sglang_pariskv.codec.query import PreparedQuery
from sglang_pariskv.codec.rotation import rotation_matrix
from sglang_pariskv.config import ParisKVConfig, check_head_dim
from sglang_pariskv.kernels.assemble import assemble_indices, kv_indptr_for, max_row_length
from sglang_pariskv.kernels.collision import collision_scan, score_bins
from sglang_pariskv.kernels.cuda_ops import (
    TOPK_CLUSTER_SIZES,
    collision_scan_cuda,
    cuda_available,
    query_tier_table_cuda,
    rerank_cuda,
    select_rerank_cuda,
    topk_cuda,
)
from sglang_pariskv.kernels.query_tiers import query_tier_table
from sglang_pariskv.kernels.radix_topk import RadixTopK
from sglang_pariskv.kernels.rerank import levels, rerank_estimates, topk_slots
from sglang_pariskv.kernels.select import (
    CandidateBuffers,
    count_candidates,
    select_candidates_gpu,
)

#: Positions per block of csrc/select_rerank.cu (its count pass must use the same chunks).
SELECT_RERANK_CHUNK = 1024

#: Implementations of the final top-k (see ``DecodeWorkspace``).
TOPK_VARIANTS = ("radix", "cuda", "torch")

logger = logging.getLogger("sglang_pariskv")

#: Per-request int64 fields of the plan buffer, in order (then the tier thresholds).
_FIELDS = ("seq", "dense", "counts", "zone_end")


#: Scan block sizes (positions per CUDA block) the auto choice picks from, largest first.
SCAN_TOKENS_PER_BLOCK = (1024, 512, 256)


def scan_tokens_per_block(max_context: int, batch: int, num_sms: int) -> int:
    """Positions per block of the CUDA scan for a batch of ``batch`` requests.

    The grid is fixed by ``max_context`` (CUDA graphs bake it in), one block per run of
    positions per request. Every block first copies the request's whole tier table (32 KiB
    at 8 KV heads x head dim 128) into shared memory, so short runs spend as many bytes on
    tables as on signs: with 16-warp blocks, 1024-position runs were the fastest or within
    1% at 128K x 1/2/8 and 1M x 1 on the H100
    (benchmarks/results/retrieval_variants_session7.json; at 128K x 2 the session-6 rule's
    256 took 39.7 us, 1024 32.4 us), and for session 10's staged scan 1024 still beat 512
    at 128K x 2 (21.0 vs 22.2 us, results/scan_kernels.json). Shorter runs only when 1024
    would leave more than every other SM idle."""
    for tpb in SCAN_TOKENS_PER_BLOCK:
        if -(-max_context // tpb) * batch * 2 >= num_sms:
            return tpb
    return SCAN_TOKENS_PER_BLOCK[-1]


#: Blocks per row of the CUDA top-k for rows longer than one block's registers hold
#: (:data:`TOPK_ONE_BLOCK_KEYS`), on GPUs with thread-block clusters (compute 9.0+).
CUDA_TOPK_CLUSTER = 8
#: Candidates one top-k block keeps in registers (csrc/topk.cu: 1024 threads x 16).
TOPK_ONE_BLOCK_KEYS = 16 * 1024


def _has_clusters(device: torch.device) -> bool:
    """Thread-block clusters: a CUDA device of compute capability 9.0 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def topk_cluster_for(cmax: int, device: torch.device) -> int:
    """Blocks per top-k row. Rows that fit one block's registers stay on one block: an
    8-block cluster made 128K x 2 slower (42 vs 29 us: a cluster needs 8 free SMs of one
    GPC, so 16 rows of 8 did not all fit at once) and 128K x 1 no faster. Longer rows
    (1M tokens: C = 104826) are split: 35 us on the H100 at 1M x 1 against 87.5 for
    session 7's single-block run (benchmarks/results/retrieval_variants*.json)."""
    if not _has_clusters(device):
        return 1
    return 1 if cmax <= TOPK_ONE_BLOCK_KEYS else CUDA_TOPK_CLUSTER


def check_topk_cluster(cluster: int, device: torch.device) -> None:
    """A cluster size the CUDA top-k can launch here, or a ValueError now (not at the
    first decode step)."""
    if cluster not in TOPK_CLUSTER_SIZES:
        raise ValueError(f"cuda_topk_cluster={cluster}: expected one of {TOPK_CLUSTER_SIZES}")
    if cluster > 1 and not _has_clusters(device):
        raise ValueError(
            f"cuda_topk_cluster={cluster} needs thread-block clusters (compute capability 9.0+,"
            " e.g. H100); use 1"
        )


#: CUDA scan warps per block (see ``scan_tokens_per_block``).
CUDA_SCAN_WARPS = 16
#: The CUDA scan's shortest chunk of staged tokens (csrc/collision_scan.cu's kChunks).
CUDA_SCAN_MIN_CHUNK = 32


def cuda_scan_shared_bytes(hkv: int, b: int, nbp: int, tpb: int, chunk: int) -> int:
    """Shared memory of one CUDA scan block (csrc/collision_scan.cu's scan_smem_bytes):
    tier table, score histogram, the run's slots, two chunks of staged sign rows."""
    stride = hkv * b + (0 if hkv % 2 else b)
    return hkv * b * 256 + hkv * nbp * 4 + -(-tpb // 4) * 4 * 4 + 2 * chunk * stride


def check_cuda_scan_fits(hkv: int, b: int, nbp: int, device: torch.device) -> None:
    """A ValueError now, not at the first decode step, when even the CUDA scan's shortest
    chunks need more shared memory than this GPU gives a block (very many KV heads per
    rank): the fix is the Triton scan or more tensor parallelism."""
    optin = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    need = cuda_scan_shared_bytes(hkv, b, nbp, max(SCAN_TOKENS_PER_BLOCK), CUDA_SCAN_MIN_CHUNK)
    if need > optin:
        raise ValueError(
            f"the CUDA collision scan needs {need} bytes of shared memory per block for "
            f"{hkv} KV heads x head_dim {8 * b}, more than this GPU's {optin}: use "
            "scan_variant='load' (Triton) or split the KV heads over more GPUs (--tp-size)"
        )


def max_candidates(config: ParisKVConfig, max_context: int) -> int:
    """The largest C any request of at most ``max_context`` tokens can get (C is not
    monotone in the zone length: the adaptive ratio drops at 5K/10K/30K)."""
    zone = zone_lengths(torch.arange(max_context + 1), config)
    cand, _ = retrieval_ratios(zone, config)
    return max(int(num_candidates(zone, cand, config).max()), 1)


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
        chunk: int = 1024,
        scan_block: int = 256,
        scan_tiles: int = 8,
        scan_variant: str = "auto",
        cuda_tokens_per_block: int | None = None,
        elide_dense_rows: bool = False,
        topk_variant: str = "auto",
        fused_select: bool | None = None,
        cuda_scan_warps: int = CUDA_SCAN_WARPS,
        cuda_query_tiers: bool | None = None,
        cuda_topk_cluster: int | None = None,
    ) -> None:
        """``scan_variant``: "cuda" (csrc/ kernels for the scan and the rerank), "load" or
        "gather" (Triton scan variants, Triton rerank), or "auto" (cuda where it builds).
        ``cuda_tokens_per_block``: the CUDA scan's run length; None picks it per batch
        (:func:`scan_tokens_per_block`). ``topk_variant``: "radix" (Triton, many programs
        per row: :mod:`kernels.radix_topk`), "cuda" (csrc/, one block per row), "torch",
        or "auto" (cuda with the cuda scan, else torch). ``fused_select``: write the
        candidates and rerank them in one CUDA launch (``csrc/select_rerank.cu``) after
        the count pass; None: with the cuda scan. False: Triton write, then the rerank.
        ``cuda_scan_warps``: warps per block of the CUDA scan (1-16; 0: 16).
        ``cuda_query_tiers``: the query prep + tier table in CUDA (csrc/query_tiers.cu)
        rather than Triton; None: with the cuda scan. ``cuda_topk_cluster``: blocks per
        row of the CUDA top-k; None: :func:`topk_cluster_for` the longest row."""
        check_head_dim(head_dim)
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads over {num_kv_heads} KV heads")
        self.config = config
        self.hq, self.hkv, self.d = num_q_heads, num_kv_heads, head_dim
        self.b = head_dim // 8
        self.max_batch, self.max_context = max_batch, max_context
        self.device = torch.device(device)
        self.nt = len(config.tier_ratios)
        self.nbp = score_bins(self.nt, self.b)
        if scan_variant == "auto":
            cuda = self.device.type == "cuda" and cuda_available()
            if cuda:
                try:
                    check_cuda_scan_fits(num_kv_heads, self.b, self.nbp, self.device)
                except ValueError as e:
                    logger.warning("ParisKV: %s; falling back to the Triton kernels", e)
                    cuda = False
            scan_variant = "cuda" if cuda else "load"
        elif scan_variant == "cuda" and self.device.type == "cuda":
            check_cuda_scan_fits(num_kv_heads, self.b, self.nbp, self.device)
        self.scan_variant = scan_variant
        if topk_variant == "auto":
            topk_variant = "cuda" if scan_variant == "cuda" else "torch"
        if topk_variant not in TOPK_VARIANTS:
            raise ValueError(f"topk_variant {topk_variant!r}: expected one of {TOPK_VARIANTS}")
        self.topk_variant = topk_variant
        if fused_select is None:
            fused_select = scan_variant == "cuda"
        if fused_select and scan_variant != "cuda":
            raise ValueError("fused_select needs the CUDA kernels (scan_variant='cuda')")
        if fused_select and chunk != SELECT_RERANK_CHUNK:
            raise ValueError(f"fused_select needs chunk={SELECT_RERANK_CHUNK}, got {chunk}")
        self.fused_select = fused_select
        if not 0 <= cuda_scan_warps <= 16:
            raise ValueError(f"cuda_scan_warps={cuda_scan_warps}: expected 0 (auto) to 16")
        self.cuda_scan_warps = cuda_scan_warps
        if cuda_query_tiers is None:
            cuda_query_tiers = scan_variant == "cuda"
        if cuda_query_tiers and scan_variant != "cuda":
            raise ValueError("cuda_query_tiers needs the CUDA kernels (scan_variant='cuda')")
        self.cuda_query_tiers = cuda_query_tiers
        self.cuda_tpb = cuda_tokens_per_block  # None: scan_tokens_per_block per batch
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
        self.cuda_topk_cluster = (
            topk_cluster_for(self.cmax, dev) if cuda_topk_cluster is None else cuda_topk_cluster
        )
        check_topk_cluster(self.cuda_topk_cluster, dev)
        # With elide_dense_rows, dense requests get one-token rows: the caller attends them
        # through its own dense call and discards these rows (SGLang backend), so neither
        # the index buffer nor the sparse attention pays for their full length.
        self.elide_dense_rows = elide_dense_rows
        self.max_row = config.budget if elide_dense_rows else max_row_length(config, max_context)
        self.rot = rotation_matrix(head_dim, config.rotation_seed, torch.float32, dev)
        self.meta = torch.zeros((len(_FIELDS) + self.nt) * rmax, dtype=torch.int64, device=dev)
        self.query = PreparedQuery(
            blocks=torch.empty(rmax, h, b, 8, dtype=torch.float32, device=dev),
            norm=torch.empty(rmax, h, dtype=torch.float32, device=dev),
        )
        self.tiers = torch.empty(rmax, h, b, 256, dtype=torch.uint8, device=dev)
        self.scores = torch.empty(rmax, h, max_context, dtype=torch.uint8, device=dev)
        self.score_hist = torch.zeros(rmax, h, self.nbp, dtype=torch.int32, device=dev)
        self.cand = torch.empty(rmax, h, self.cmax, dtype=torch.int32, device=dev)
        self.est = torch.empty(rmax, h, self.cmax, dtype=torch.float32, device=dev)
        self.top = torch.zeros(rmax, h, self.k, dtype=torch.int32, device=dev)
        self.levels = levels(dev)
        self.sel = CandidateBuffers(rmax * h, max_context, chunk, dev)
        self.radix = RadixTopK(rmax * h, dev) if topk_variant == "radix" else None
        self.kv_indptr = torch.zeros(rmax * h + 1, dtype=torch.int32, device=dev)
        self.kv_indices = torch.zeros(rmax * h * self.max_row, dtype=torch.int32, device=dev)
        # Contiguous copy of the last run's query, written by the CUDA query + tier kernel
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
        cand_ratio, coll_ratio = retrieval_ratios(zone, cfg)
        counts = num_candidates(zone, cand_ratio, cfg)
        thresholds = tier_thresholds(seq, coll_ratio, cfg)
        host = torch.zeros(self.meta.numel(), dtype=torch.int64, pin_memory=self._pin())
        for i, field in enumerate((seq, dense.to(torch.int64), counts, zone + cfg.sink)):
            host[i * rmax : i * rmax + r] = field
        host[len(_FIELDS) * rmax : len(_FIELDS) * rmax + r * self.nt] = thresholds.flatten()
        self.meta.copy_(host, non_blocking=True)
        indptr = kv_indptr_for(seq, cfg, self.hkv, elide_dense=self.elide_dense_rows)
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
        hist: torch.Tensor,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        stages: dict | None = None,
    ) -> DecodeOutput:
        """Retrieve and assemble the attended indices of decode queries ``q [R, Hq, D]``.

        codes: this layer's pool (:class:`KeyCodes` of ``[slots, Hkv, ...]`` tensors);
        hist: this layer's histograms int32 ``[max_reqs, Hkv, B, 256]``. The batch must be
        the one of the last :meth:`plan`. ``stages``, when a dict, receives each stage's
        intermediate tensors (tests, benchmarks).
        """
        self.bind(q, codes, hist, req_to_token, req_pool_indices)
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
        hist: torch.Tensor,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
    ) -> None:
        """Set the inputs of the stage methods (``run`` = ``bind`` + every stage)."""
        r = q.shape[0]
        if r != self._r:
            raise ValueError(f"run() with batch {r} but the last plan() was for {self._r}")
        nt, rmax = self.nt, self.max_batch
        t0 = len(_FIELDS) * rmax
        self._st = SimpleNamespace(
            q=q,
            codes=codes,
            hist=hist,
            rtt=req_to_token,
            rpi=req_pool_indices,
            r=r,
            seq=self._meta("seq", r),
            dense=self._meta("dense", r),
            counts=self._meta("counts", r),
            zone_end=self._meta("zone_end", r),
            thresholds=self.meta[t0 : t0 + r * nt].view(r, nt),
            indptr=self.kv_indptr[: r * self.hkv + 1],
        )

    def stages(self) -> list[tuple[str, Callable[[], None]]]:
        """(name, fn) of each stage in order; the benchmark times them one by one."""
        return [
            ("query_tiers", self._stage_query_tiers),
            ("scan", self._stage_scan),
            ("select", self._stage_select),
            ("rerank", self._stage_rerank),
            ("topk", self._stage_topk),
            ("assemble", self._stage_assemble),
        ]

    def _stage_query_tiers(self) -> None:
        """Query prep, tier table and score-histogram reset in one launch."""
        st = self._st
        st.query = PreparedQuery(self.query.blocks[: st.r], self.query.norm[: st.r])
        st.tiers = self.tiers[: st.r]
        st.score_hist = self.score_hist[: st.r]
        args = (st.q, self.rot, st.hist, st.rpi, st.thresholds, st.query, st.tiers, st.score_hist)
        self._query_copied_from = None
        if not self.cuda_query_tiers:
            query_tier_table(*args)
            return
        q = st.q
        if self._query_copy is None or self._query_copy.dtype != q.dtype:
            self._query_copy = torch.empty(
                self.max_batch, *q.shape[1:], dtype=q.dtype, device=q.device
            )
        query_tier_table_cuda(*args, query_copy=self._query_copy[: st.r])
        self._query_copied_from = _tensor_key(q)

    def contiguous_query(self, q: torch.Tensor) -> torch.Tensor | None:
        """``q`` as a contiguous tensor if the last run was on this very tensor and the CUDA
        query + tier kernel copied it as a by-product; else None (use ``q``). The sparse
        FlashInfer call reads its query as ``[R * Hkv, G, D]`` rows, which a strided query
        (SGLang's view of the QKV projection) can only become through a copy kernel."""
        if self._query_copied_from is None or self._query_copied_from != _tensor_key(q):
            return None
        return self._query_copy[: q.shape[0]]

    def _stage_scan(self) -> None:
        st = self._st
        st.scores = self.scores[: st.r]  # st.score_hist: zeroed by _stage_query_tiers
        args = (st.codes.signs, st.rtt, st.rpi, st.seq, st.zone_end, st.tiers, st.scores)
        if self.scan_variant == "cuda":
            tpb = self.cuda_tpb or scan_tokens_per_block(self.max_context, st.r, self.num_sms)
            collision_scan_cuda(
                *args,
                st.score_hist,
                self.config.sink,
                tpb,
                self.cuda_scan_warps,
            )
        else:
            collision_scan(
                *args,
                st.score_hist,
                self.config.sink,
                self.scan_block,
                self.scan_tiles,
                self.scan_variant,
            )

    def _stage_select(self) -> None:
        """The count pass, then (unless fused into the rerank) the candidate write."""
        st = self._st
        st.cand = self.cand[: st.r]
        if self.fused_select:
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
        st.est = self.est[: st.r]
        codes = st.codes
        if self.fused_select:
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
            )
            return
        args = (st.cand, st.counts, codes.signs, codes.mags, codes.weights)
        if self.scan_variant == "cuda":
            rerank_cuda(*args, st.query.blocks, st.query.norm, self.levels, st.est)
        else:
            rerank_estimates(*args, st.query.blocks, st.query.norm, st.est)

    def _stage_topk(self) -> None:
        st = self._st
        if self.topk_variant == "torch":
            st.top = topk_slots(st.est, st.cand, self.k)
            return
        st.top = self.top[: st.r]
        if self.topk_variant == "radix":
            self.radix(st.est, st.cand, st.counts, st.top)
        else:
            topk_cuda(st.est, st.cand, st.counts, st.top, self.cuda_topk_cluster)

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
