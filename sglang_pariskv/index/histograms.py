"""Per-request centroid histograms, keyed by SGLang's ``req_pool_idx``.

The collision tiers of a decode step need, per (request, layer, KV head, block), how many
of the request's keys carry each sign id. Only requests that retrieve need them, so a
request's histograms are kept only while it is longer than the dense limit
(``ParisKVConfig.dense_limit``): extend zeroes the extending requests' rows and recounts
those that end above the limit (fresh prompts, chunked prefill and radix-cache prefix hits
alike: a hit hands the request slots whose codes are already in the pool, but no
histogram). A short request's decode steps count nothing, so serving short traffic costs
no histogram work; the decode step at which a request first exceeds the limit counts all
its tokens once, and every later step its new key (:meth:`RequestHistograms.count_decode`).
"""

from __future__ import annotations

import torch

from sglang_pariskv.codec.collision import NUM_CENTROIDS, centroid_histogram
from sglang_pariskv.index.code_pool import CodePool


class RequestHistograms:
    def __init__(self, max_reqs: int, num_kv_heads: int, head_dim: int, num_layers: int, device):
        b = head_dim // 8
        # One tensor, so that extend zeroes a request's rows of every layer in one kernel.
        self.all = torch.zeros(
            num_layers, max_reqs, num_kv_heads, b, NUM_CENTROIDS, dtype=torch.int32, device=device
        )
        #: per layer: int32 [max_reqs, Hkv, B, 256] (views of ``all``)
        self.layers = list(self.all.unbind(0))

    def nbytes(self) -> int:
        return self.all.numel() * self.all.element_size()

    def reset(self, req_pool_indices: torch.Tensor) -> None:
        """Zero the histograms of requests ``req_pool_indices`` in every layer (extend)."""
        if req_pool_indices.numel():
            self.all.index_fill_(1, req_pool_indices.to(torch.int64), 0)

    def rebuild(
        self,
        layer: int,
        signs: torch.Tensor,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        max_len: int | None = None,
        zeroed: bool = False,
    ) -> None:
        """Recount requests ``req_pool_indices`` over their first ``seq_lens`` tokens.

        signs: this layer's pool signs uint8 [slots, Hkv, B]; req_to_token [max_reqs, ctx];
        ``max_len`` (>= max(seq_lens), from the host) avoids a device sync; ``zeroed``:
        the rows are already zero (:meth:`reset` at the extend), so the count adds to them.
        """
        if req_pool_indices.numel() == 0:
            return
        hist = self.layers[layer]
        rows = req_pool_indices.to(torch.int64)
        n = int(seq_lens.max()) if max_len is None else max_len
        if hist.is_cuda:
            from sglang_pariskv.kernels.histograms import add_to_histograms

            if not zeroed:
                hist[rows] = 0
            start = torch.zeros_like(seq_lens)
            add_to_histograms(signs, req_to_token, rows, start, seq_lens, hist, n)
            return
        slots = req_to_token[rows, :n].to(torch.int64)
        hist[rows] = centroid_histogram(signs[slots], seq_lens.to(slots.device))

    def count_decode(
        self,
        layer: int,
        signs: torch.Tensor,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        limit: int,
    ) -> None:
        """Bring the decode rows' histograms up to date after their new key is stored.

        A row of length ``limit + 1`` has just crossed the dense limit: its histogram is
        still the zero extend left, so it counts all its tokens. A longer row counts its
        new key (position seq_len - 1). Rows at or below ``limit``, CUDA-graph padding
        (seq_len 1) included, count nothing. ``signs``: this layer's pool signs uint8
        [slots, Hkv, B]. On CUDA this is one Triton launch with no host sync.
        """
        from sglang_pariskv.kernels.histograms import check_count_limit, count_new_keys

        hist = self.layers[layer]
        if hist.is_cuda:
            count_new_keys(signs, req_to_token, req_pool_indices, seq_lens, hist, limit)
            return
        check_count_limit(limit)
        for r, n in zip(req_pool_indices.tolist(), seq_lens.tolist()):
            if n <= limit:
                continue
            first = 0 if n == limit + 1 else n - 1
            slots = req_to_token[r, first:n].to(torch.int64)
            rows = torch.full((len(slots),), r, dtype=torch.int64)
            self.add(layer, signs[slots], rows)

    def count_decode_layers(
        self,
        codes: CodePool,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        limit: int,
    ) -> None:
        """:meth:`count_decode` for every layer at once from ``codes``' signs, after a step
        whose codes were written after its last layer. On CUDA one launch through the
        code pool's signs address table (``CodePool.signs_table``, made before any graph
        capture, which reads it)."""
        if self.all.is_cuda:
            from sglang_pariskv.kernels.histograms import count_new_keys_layers

            table = codes.signs_table()
            if table is None:
                raise ValueError("counting every layer on CUDA needs the signs' address table")
            signs = codes.layers[0].signs
            count_new_keys_layers(
                table, signs, req_to_token, req_pool_indices, seq_lens, self.all, limit
            )
            return
        for layer, layer_codes in enumerate(codes.layers):
            self.count_decode(
                layer, layer_codes.signs, req_to_token, req_pool_indices, seq_lens, limit
            )

    def add(
        self,
        layer: int,
        new_signs: torch.Tensor,
        req_pool_indices: torch.Tensor,
    ) -> None:
        """Count key i (new_signs uint8 [R, Hkv, B]) for request ``req_pool_indices[i]``
        (a request may appear several times). No host sync."""
        hist = self.layers[layer]
        r, h, b = new_signs.shape
        req = req_pool_indices.to(torch.int64)[:, None, None].expand(r, h, b)
        head = torch.arange(h, device=hist.device)[None, :, None].expand(r, h, b)
        blk = torch.arange(b, device=hist.device)[None, None, :].expand(r, h, b)
        ones = torch.ones(r, h, b, dtype=hist.dtype, device=hist.device)
        hist.index_put_((req, head, blk, new_signs.to(torch.int64)), ones, accumulate=True)
