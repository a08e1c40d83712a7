"""Per-request centroid histograms, keyed by SGLang's ``req_pool_idx``.

The collision tiers of a decode step need, per (request, layer, KV head, block), how many
of the request's keys carry each sign id. Decode adds one key per request per step (a
graph-safe scatter-add). Extend rebuilds the histograms of the extending requests from all
their tokens: that covers fresh prompts, chunked prefill and radix-cache prefix hits alike
(a hit hands the request slots whose codes are already in the pool, but no histogram), at
the cost of one pass over the request's sign bytes, small next to prefill attention.
"""

from __future__ import annotations

import torch

from sglang_pariskv.codec.collision import NUM_CENTROIDS, centroid_histogram


class RequestHistograms:
    def __init__(self, max_reqs: int, num_kv_heads: int, head_dim: int, num_layers: int, device):
        b = head_dim // 8
        self.layers = [
            torch.zeros(max_reqs, num_kv_heads, b, NUM_CENTROIDS, dtype=torch.int32, device=device)
            for _ in range(num_layers)
        ]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)

    def rebuild(
        self,
        layer: int,
        signs: torch.Tensor,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        max_len: int | None = None,
    ) -> None:
        """Recount requests ``req_pool_indices`` over their first ``seq_lens`` tokens.

        signs: this layer's pool signs uint8 [slots, Hkv, B]; req_to_token [max_reqs, ctx];
        ``max_len`` (>= max(seq_lens), from the host) avoids a device sync.
        """
        if req_pool_indices.numel() == 0:
            return
        hist = self.layers[layer]
        rows = req_pool_indices.to(torch.int64)
        n = int(seq_lens.max()) if max_len is None else max_len
        if hist.is_cuda:
            from sglang_pariskv.kernels.encode import add_to_histograms

            hist[rows] = 0
            start = torch.zeros_like(seq_lens)
            add_to_histograms(signs, req_to_token, rows, start, seq_lens, hist, n)
            return
        slots = req_to_token[rows, :n].to(torch.int64)
        hist[rows] = centroid_histogram(signs[slots], seq_lens.to(slots.device))

    def add_decode(
        self,
        layer: int,
        signs: torch.Tensor,
        out_cache_loc: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> None:
        """Count each decode row's new key, read from the pool at ``out_cache_loc``.

        signs: this layer's pool signs uint8 [slots, Hkv, B]. Rows with ``seq_lens <= 1``
        are CUDA-graph padding (a real decode row has at least 2 tokens) and count nothing.
        On CUDA this is one Triton launch; elsewhere it is :meth:`add`."""
        hist = self.layers[layer]
        if hist.is_cuda:
            from sglang_pariskv.kernels.encode import add_decode_keys

            add_decode_keys(signs, out_cache_loc, req_pool_indices, seq_lens, hist)
            return
        self.add(layer, signs[out_cache_loc], req_pool_indices, weight=seq_lens > 1)

    def add(
        self,
        layer: int,
        new_signs: torch.Tensor,
        req_pool_indices: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> None:
        """Count one new key per request: new_signs uint8 [R, Hkv, B]. No host sync.

        ``weight`` (bool [R]) masks out rows that are not real requests (graph padding)."""
        hist = self.layers[layer]
        r, h, b = new_signs.shape
        req = req_pool_indices.to(torch.int64)[:, None, None].expand(r, h, b)
        head = torch.arange(h, device=hist.device)[None, :, None].expand(r, h, b)
        blk = torch.arange(b, device=hist.device)[None, None, :].expand(r, h, b)
        ones = torch.ones(r, h, b, dtype=hist.dtype, device=hist.device)
        if weight is not None:
            ones = ones * weight.to(hist.dtype)[:, None, None]
        hist.index_put_((req, head, blk, new_signs.to(torch.int64)), ones, accumulate=True)
