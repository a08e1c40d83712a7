"""Retrieval reuse in the serving backend: the kept selections, their reset and counters.

The backend holds one :class:`RetrievalReuse` when ``--pariskv-reuse-threshold`` > 0
(None otherwise, and decoding is exactly the retrieve-every-step path). It owns the
per-slot kept state (:class:`kernels.reuse.ReuseState`, planned in
``attention.memory_plan``), hands each decode layer its view, forgets a slot's selections
whenever a request extends on it (a new request, a chunk of a chunked prefill, a radix
prefix hit, a retracted request coming back: none may reuse a selection made for
another request or another prefix), and reads back the device counters of retrieving /
reusing (request, layer) pairs without a sync.
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.device_counters import DeviceCounterReader
from sglang_pariskv.kernels.reuse import LayerReuse, ReuseState

#: Counter fields, in the order of ``ReuseState.counters``.
FIELDS = ("retrieved", "reused")


class RetrievalReuse:
    def __init__(self, max_reqs: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 width: int, device: torch.device) -> None:  # fmt: skip
        """``width``: the workspace's ``kept_width`` (slots kept per request, layer and
        KV head)."""
        self.state = ReuseState(max_reqs, num_layers, num_kv_heads, head_dim, width, device)
        self.counters = DeviceCounterReader(
            lambda: self.state.counters, FIELDS, on_cuda=self.state.counters.is_cuda
        )

    @classmethod
    def build(
        cls, config: ParisKVConfig, max_reqs: int, num_layers: int, num_kv_heads: int,
        head_dim: int, width: int, device: torch.device,
    ) -> RetrievalReuse | None:  # fmt: skip
        """The reuse state of a backend, or None with ``reuse_threshold`` 0."""
        if not config.reuses:
            return None
        return cls(max_reqs, num_layers, num_kv_heads, head_dim, width, device)

    def layer(self, layer: int) -> LayerReuse:
        return self.state.layer(layer)

    def extended(self, req_pool_indices: torch.Tensor) -> None:
        """Requests extended on these slots: their next decode step retrieves in every
        layer (graph-safe, no sync)."""
        self.state.reset(req_pool_indices)

    def poll(self) -> dict[str, int]:
        """Increments of (request, layer) pairs that retrieved / reused, readable since the
        last poll (they trail the served batches by a step or two)."""
        return self.counters.poll()

    def snapshot(self) -> dict[str, Any]:
        t = self.counters.totals
        done = t["retrieved"] + t["reused"]
        return {
            "reuse_retrieved_request_layers": t["retrieved"],
            "reuse_reused_request_layers": t["reused"],
            "reuse_retrieved_fraction": t["retrieved"] / done if done else None,
        }
