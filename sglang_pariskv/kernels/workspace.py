"""The decode-step retrieval pipeline as one CUDA-graph-capturable ``plan``/``run`` object.

Modelled on FlashInfer's wrappers: buffers are preallocated once from (max batch, max
context); :meth:`DecodeWorkspace.plan` does the host-side part (row offsets from the CPU
sequence lengths, which FlashInfer's own ``plan`` needs on the host); :meth:`run` launches
only fixed-shape device work (no ``.item()``, no host sync, grids sized from the maxima),
so a graph captured once replays correctly for any lengths up to ``max_context``.

Stages of :meth:`run` (each a module of this package):
  query prep (torch) -> tiers (``tiers.py``) -> collision scan + score histogram
  (``collision.py``) -> candidate selection (``select.py``) -> rerank + top-k
  (``rerank.py``) -> index assembly (``assemble.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import torch

from sglang_pariskv.codec.budget import (
    dense_mask,
    num_candidates,
    retrieval_ratios,
    tier_ratio_tensor,
    tier_thresholds_rho,
    zone_lengths,
)
from sglang_pariskv.codec.encode import KeyCodes
from sglang_pariskv.codec.query import PreparedQuery, group_queries
from sglang_pariskv.codec.rotation import rotation_matrix
from sglang_pariskv.config import ParisKVConfig, check_head_dim
from sglang_pariskv.kernels.assemble import assemble_indices, kv_indptr_for, max_row_length
from sglang_pariskv.kernels.collision import collision_scan, score_bins
from sglang_pariskv.kernels.rerank import rerank_keys, topk_positions
from sglang_pariskv.kernels.select import CandidateBuffers, select_candidates_gpu
from sglang_pariskv.kernels.tiers import centroid_tier_table


def max_candidates(config: ParisKVConfig, max_context: int) -> int:
    """The largest C any request of at most ``max_context`` tokens can get (C is not
    monotone in the zone length: the adaptive ratio drops at 5K/10K/30K)."""
    zone = zone_lengths(torch.arange(max_context + 1), config)
    cand, _ = retrieval_ratios(zone, config)
    return max(int(num_candidates(zone, cand, config).max()), 1)


class DecodeOutput(NamedTuple):
    kv_indptr: torch.Tensor  #: int32 [R * Hkv + 1]
    kv_indices: torch.Tensor  #: int32 [capacity]; entries [0, kv_indptr[-1]) are valid
    dense: torch.Tensor  #: bool [R]
    num_candidates: torch.Tensor  #: int64 [R]


class DecodeWorkspace:
    """Preallocated state of ParisKV decode retrieval for one layer shape.

    One instance serves every layer (buffers are reused layer after layer). Inputs of
    :meth:`run` are SGLang's: ``req_to_token`` int32 ``[max_reqs, max_context]``,
    ``req_pool_indices`` [R], ``seq_lens`` [R] (including the token being decoded, whose
    code and histogram count must already be written).
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
        scan_block: int = 64,
        scan_tiles: int = 16,
        scan_variant: str = "load",
    ) -> None:
        check_head_dim(head_dim)
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads over {num_kv_heads} KV heads")
        self.config = config
        self.hq, self.hkv, self.d = num_q_heads, num_kv_heads, head_dim
        self.b = head_dim // 8
        self.max_batch, self.max_context = max_batch, max_context
        self.device = torch.device(device)
        self.scan_block, self.scan_tiles = scan_block, scan_tiles
        self.scan_variant = scan_variant
        dev = self.device
        h, b, rmax = num_kv_heads, self.b, max_batch
        self.cmax = max_candidates(config, max_context)
        self.k = min(config.topk, self.cmax)
        self.max_row = max_row_length(config, max_context)
        self.nbp = score_bins(len(config.tier_ratios), b)
        self.rot_t = rotation_matrix(head_dim, config.rotation_seed, torch.float32, dev).t()
        self.rot_t = self.rot_t.contiguous()
        self.rho = tier_ratio_tensor(config, dev)
        self.tiers = torch.empty(rmax, h, b, 256, dtype=torch.uint8, device=dev)
        self.scores = torch.empty(rmax, h, max_context, dtype=torch.uint8, device=dev)
        self.score_hist = torch.zeros(rmax, h, self.nbp, dtype=torch.int32, device=dev)
        self.cand = torch.empty(rmax, h, self.cmax, dtype=torch.int32, device=dev)
        self.keys = torch.empty(rmax, h, self.cmax, dtype=torch.int64, device=dev)
        self.sel = CandidateBuffers(rmax * h, max_context, chunk, dev)
        self.kv_indptr = torch.zeros(rmax * h + 1, dtype=torch.int32, device=dev)
        self.kv_indices = torch.zeros(rmax * h * self.max_row, dtype=torch.int32, device=dev)

    # -- host side -------------------------------------------------------------------
    def plan(self, seq_lens_cpu: torch.Tensor) -> torch.Tensor:
        """Host ``kv_indptr`` (int32, CPU) of the next :meth:`run`: what FlashInfer's plan
        takes. Needs no device work; equal to the indptr that :meth:`run` writes."""
        if seq_lens_cpu.numel() > self.max_batch:
            raise ValueError(f"batch {seq_lens_cpu.numel()} > max_batch {self.max_batch}")
        if seq_lens_cpu.numel() and int(seq_lens_cpu.max()) > self.max_context:
            raise ValueError(f"a sequence is longer than max_context {self.max_context}")
        return kv_indptr_for(seq_lens_cpu.cpu(), self.config, self.hkv)

    # -- device side -----------------------------------------------------------------
    def prepare_query(self, q: torch.Tensor) -> PreparedQuery:
        """codec.query.prepare_query with the rotation cached on the device."""
        mean = group_queries(q.to(torch.float32), self.hkv).mean(dim=2)
        norm = torch.linalg.vector_norm(mean, dim=-1)
        unit = mean / norm.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
        blocks = (unit @ self.rot_t).reshape(*unit.shape[:-1], self.b, 8)
        return PreparedQuery(blocks=blocks.contiguous(), norm=norm.contiguous())

    def run(
        self,
        q: torch.Tensor,
        codes: KeyCodes,
        hist: torch.Tensor,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        stages: dict | None = None,
    ) -> DecodeOutput:
        """Retrieve and assemble the attended indices of decode queries ``q [R, Hq, D]``.

        codes: this layer's pool (:class:`KeyCodes` of ``[slots, Hkv, ...]`` tensors);
        hist: this layer's histograms int32 ``[max_reqs, Hkv, B, 256]``. ``stages``, when
        a dict, receives each stage's intermediate tensors (tests, benchmarks).
        """
        self.bind(q, codes, hist, req_to_token, req_pool_indices, seq_lens)
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
        seq_lens: torch.Tensor,
    ) -> None:
        """Set the inputs of the stage methods (``run`` = ``bind`` + every stage)."""
        self._st = SimpleNamespace(
            q=q,
            codes=codes,
            hist=hist,
            rtt=req_to_token,
            rpi=req_pool_indices,
            seq_lens=seq_lens,
            r=q.shape[0],
        )

    def stages(self) -> list[tuple[str, Callable[[], None]]]:
        """(name, fn) of each stage in order; the benchmark times them one by one."""
        return [
            ("prep", self._stage_prep),
            ("tiers", self._stage_tiers),
            ("scan", self._stage_scan),
            ("select", self._stage_select),
            ("rerank", self._stage_rerank),
            ("topk", self._stage_topk),
            ("assemble", self._stage_assemble),
        ]

    def _stage_prep(self) -> None:
        """Budgets (codec.budget, on tensors), the prepared query and the tier thresholds."""
        st, cfg = self._st, self.config
        seq = st.seq_lens.to(torch.int64)
        st.dense = dense_mask(seq, cfg)
        zone = torch.where(st.dense, 0, zone_lengths(seq, cfg))
        cand_ratio, coll_ratio = retrieval_ratios(zone, cfg)
        st.counts = num_candidates(zone, cand_ratio, cfg)
        st.zone_end = (zone + cfg.sink).to(torch.int32)
        st.seq32 = seq.to(torch.int32)
        st.query = self.prepare_query(st.q)
        total = st.hist.index_select(0, st.rpi.to(torch.int64))[:, 0, 0].sum(-1)
        st.thresholds = tier_thresholds_rho(total, coll_ratio, self.rho)

    def _stage_tiers(self) -> None:
        st = self._st
        st.tiers = centroid_tier_table(
            st.query.blocks, st.hist, st.rpi, st.thresholds, self.tiers[: st.r]
        )

    def _stage_scan(self) -> None:
        st = self._st
        st.scores, st.score_hist = self.scores[: st.r], self.score_hist[: st.r]
        st.score_hist.zero_()
        collision_scan(
            st.codes.signs,
            st.rtt,
            st.rpi,
            st.seq32,
            st.zone_end,
            st.tiers,
            st.scores,
            st.score_hist,
            self.config.sink,
            self.scan_block,
            self.scan_tiles,
            self.scan_variant,
        )

    def _stage_select(self) -> None:
        st = self._st
        st.cand = self.cand[: st.r]
        select_candidates_gpu(
            st.scores, st.score_hist, st.counts, self.config.sink, st.zone_end, st.cand, self.sel
        )

    def _stage_rerank(self) -> None:
        st = self._st
        st.keys = self.keys[: st.r]
        rerank_keys(
            st.cand,
            st.counts,
            st.rtt,
            st.rpi,
            st.codes.signs,
            st.codes.mags,
            st.codes.weights,
            st.query.blocks,
            st.query.norm,
            st.keys,
        )

    def _stage_topk(self) -> None:
        st = self._st
        st.top = topk_positions(st.keys, self.k)

    def _stage_assemble(self) -> None:
        st = self._st
        st.indptr = kv_indptr_for(
            st.seq32, self.config, self.hkv, out=self.kv_indptr[: st.r * self.hkv + 1]
        )
        assemble_indices(
            st.rtt,
            st.rpi,
            st.seq32,
            st.dense.view(torch.int8),
            st.top,
            st.indptr,
            self.kv_indices,
            self.config,
            self.max_row,
        )
