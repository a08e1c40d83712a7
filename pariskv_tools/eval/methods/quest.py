"""Quest: query-aware page selection with a per-channel min/max upper bound.

Keys are grouped in 16-token pages (aligned to position 0, like a paged KV cache). A page's
metadata is the channel-wise min and max of its keys; for a query q the bound
Σ_d max(q_d·min_d, q_d·max_d) ≥ q·k for every key of the page, and pages are read best bound
first. Every token of a page gets the page's bound (earlier tokens first within a page), so
a budget of k tokens reads the best ceil(k/16) pages, the last one possibly partly.
The page being filled by generation only covers the keys written so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pariskv_tools.eval.trace import LayerTrace, StepBatch, group_mean_query


@dataclass
class QuestState:
    run_min: torch.Tensor  #: [P, 16, H, D]: min over the page's keys up to each slot
    run_max: torch.Tensor  #: [P, 16, H, D]
    num_keys: int


class Quest:
    names = ("quest",)
    zone_dependent = False

    def __init__(self, page_size: int = 16) -> None:
        self.page_size = page_size

    def prepare(self, trace: LayerTrace) -> QuestState:
        n, h, d = trace.keys.shape
        p = -(-n // self.page_size)
        pad = p * self.page_size - n
        k = trace.keys.float()
        # Padding repeats the last key, which changes no min/max of real keys.
        k = torch.cat([k, k[-1:].expand(pad, h, d)]) if pad else k
        pages = k.reshape(p, self.page_size, h, d)
        return QuestState(
            run_min=torch.cummin(pages, dim=1).values,
            run_max=torch.cummax(pages, dim=1).values,
            num_keys=n,
        )

    def scores(self, state: QuestState, batch: StepBatch) -> dict:
        ps = self.page_size
        q = group_mean_query(batch.queries, state.run_min.shape[2])  # [S, H, D]
        qp, qn = q.clamp_min(0), q.clamp_max(0)

        def bound(mn: torch.Tensor, mx: torch.Tensor, eq: str) -> torch.Tensor:
            return torch.einsum(eq, qp, mx) + torch.einsum(eq, qn, mn)

        # Complete pages: bound from the whole page.
        full = bound(state.run_min[:, -1], state.run_max[:, -1], "shd,phd->shp")  # [S, H, P]
        # The page holding the last key of each step only covers keys written so far.
        last = batch.seq_lens - 1
        lp, slot = last // ps, last % ps
        part = bound(state.run_min[lp, slot], state.run_max[lp, slot], "shd,shd->sh")
        full = full.scatter(-1, lp[:, None, None].expand(-1, full.shape[1], 1), part[..., None])
        page_of = torch.arange(state.num_keys, device=q.device) // ps
        return {self.names[0]: full[..., page_of]}
