"""StreamingLLM: sink + sliding window only, no retrieval.

At an equal attended budget the tokens that retrieval would pick go to a longer window:
ranking the zone by recency makes the "retrieved" tokens the ones just before the local
window, i.e. the window grows to budget - sink.
"""

from __future__ import annotations

import torch

from pariskv_tools.eval.trace import LayerTrace, StepBatch


class StreamingLLM:
    names = ("streaming",)
    zone_dependent = False

    def prepare(self, trace: LayerTrace) -> tuple[int, int]:
        return trace.num_keys, trace.num_kv_heads

    def scores(self, state: tuple[int, int], batch: StepBatch) -> dict:
        n, h = state
        pos = torch.arange(n, device=batch.queries.device)
        return {self.names[0]: pos.expand(batch.queries.shape[0], h, n)}
