"""``HistogramUpkeep``: when the backend counts each request's centroid histograms.

Retrieval's collision tiers read, per request, layer and KV head, a histogram of the
request's key codes (``index.histograms.RequestHistograms``). Counting them costs work in
every layer, and only requests that retrieve read them, so only those keep them:

* A short request (at or below the dense limit, ``ParisKVConfig.dense_limit``) attends
  densely and keeps no histograms: its extends and decode steps count nothing.
* An extend (prefill, chunked prefill, radix prefix hit) zeroes its requests' histograms
  (a slot may hold a previous request's counts) and recounts, from all their tokens, those
  that end above the dense limit.
* A request that crosses the limit while decoding is counted in full at its crossing
  step, then one new key per sparse step (``RequestHistograms.count_decode``); with
  ``min_sparse_tokens`` a long request may decode in a dense step, so every step counts:
  a dense step whose codes are written after its last layer (``DeferredCodes``) counts
  every layer then, in one launch (:meth:`count_deferred`).

``ParisKVAttnBackend`` owns one and calls :meth:`extended` when it plans an extend,
:meth:`recount` in each extend layer that retrieves later, and :meth:`count_decode` in
each decode layer that stores its key.
"""

from __future__ import annotations

import torch

from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.index.code_pool import CodePool
from sglang_pariskv.index.histograms import RequestHistograms


class HistogramUpkeep:
    #: The extend's requests whose histograms :meth:`recount` rebuilds: (req_pool_indices,
    #: seq_lens, max seq_len or None), or None when all end at or below the dense limit.
    _recount: tuple[torch.Tensor, torch.Tensor, int | None] | None = None

    def __init__(
        self,
        hists: RequestHistograms,
        codes: CodePool,
        req_to_token_pool,
        config: ParisKVConfig,
    ):
        self.hists, self.codes, self.config = hists, codes, config
        #: SGLang's ``ReqToTokenPool``: its ``req_to_token`` maps a request's positions to
        #: KV slots.
        self.req_to_token_pool = req_to_token_pool

    def extended(self, forward_batch) -> None:
        """Zero the extending requests' histograms; pick those to recount (ending above the
        dense limit) for :meth:`recount`."""
        rows, seq = forward_batch.req_pool_indices, forward_batch.seq_lens
        self.hists.reset(rows)
        seq_cpu = forward_batch.seq_lens_cpu
        if seq_cpu is None:  # lengths only on the device: rows at or below the limit count 0
            self._recount = (rows, torch.where(seq > self.config.dense_limit, seq, 0), None)
            return
        long = seq_cpu > self.config.dense_limit
        if not bool(long.any()):
            self._recount = None
        elif bool(long.all()):
            self._recount = (rows, seq, int(seq_cpu.max()))
        else:
            pick = long.nonzero().flatten().to(rows.device, non_blocking=True)
            self._recount = (rows[pick], seq[pick], int(seq_cpu[long].max()))

    def recount(self, local: int) -> None:
        """Rebuild layer ``local``'s histograms of the requests :meth:`extended` picked,
        once the extend has stored (and encoded) that layer's keys."""
        if self._recount is None:
            return
        rows, seq, max_len = self._recount
        self.hists.rebuild(
            local,
            self.codes.layers[local].signs,
            self.req_to_token_pool.req_to_token,
            rows,
            seq,
            max_len=max_len,
            zeroed=True,  # extended() reset every extending row, in all layers
        )

    def count_deferred(self, forward_batch) -> None:
        """After a dense decode step whose codes were written after its last layer: with
        ``min_sparse_tokens``, the counts its layers could not make yet (their codes were
        not written), for every layer in one launch. Otherwise nothing: a dense step needs
        no counts."""
        if not self.config.min_sparse_tokens:
            return
        bs = forward_batch.batch_size
        self.hists.count_decode_layers(
            self.codes,
            self.req_to_token_pool.req_to_token,
            forward_batch.req_pool_indices[:bs],
            forward_batch.seq_lens[:bs],
            self.config.dense_limit,
        )

    def count_decode(self, local: int, forward_batch, sparse_step: bool) -> None:
        """Bring layer ``local``'s histograms up to date for the step's rows above the dense
        limit. Only steps that retrieve (``sparse_step``) need them, except with
        ``min_sparse_tokens``, where a request above the limit can decode in a dense step
        and must still be counted."""
        if not sparse_step and not self.config.min_sparse_tokens:
            return
        bs = forward_batch.batch_size
        self.hists.count_decode(
            local,
            self.codes.layers[local].signs,
            self.req_to_token_pool.req_to_token,
            forward_batch.req_pool_indices[:bs],
            forward_batch.seq_lens[:bs],
            self.config.dense_limit,
        )
