"""Exact top-k: rank by the true group-mean q·k. The ceiling every approximate method chases."""

from __future__ import annotations

import torch

from pariskv_tools.eval.trace import LayerTrace, StepBatch, group_mean_query


class ExactTopK:
    """Oracle: scores are the exact inner products of the GQA group-mean query."""

    names = ("exact_topk",)
    zone_dependent = False

    def prepare(self, trace: LayerTrace) -> torch.Tensor:
        return trace.keys.float()

    def scores(self, state: torch.Tensor, batch: StepBatch) -> dict:
        q = group_mean_query(batch.queries, state.shape[1])  # [S, H, D]
        return {self.names[0]: torch.einsum("shd,nhd->shn", q, state)}
