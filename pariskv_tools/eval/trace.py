"""One layer of a captured decode trace, in the shapes the methods and metrics expect."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerTrace:
    """Keys/values of every position and the decode queries of one layer.

    ``seq_lens[i]`` is how many keys query ``i`` attends (its position + 1). Keys of generated
    tokens are in ``keys`` too: a method may only look at ``keys[:seq_len]`` for a step, which
    is what "append-only, no refit" means here. ``prompt_len`` marks what existed at prefill
    (where PQ fits its centroids and SimHash its centering mean).
    """

    keys: torch.Tensor  #: float32 [N, Hkv, D]
    values: torch.Tensor  #: float32 [N, Hkv, D]
    queries: torch.Tensor  #: float32 [S, Hq, D]
    seq_lens: torch.Tensor  #: int64 [S]
    prompt_len: int
    #: The model layer these come from (per-layer calibration such as key centres); -1:
    #: unknown (synthetic traces).
    layer: int = -1

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def num_keys(self) -> int:
        return self.keys.shape[0]

    def to(self, device: torch.device | str) -> LayerTrace:
        return LayerTrace(
            self.keys.to(device),
            self.values.to(device),
            self.queries.to(device),
            self.seq_lens.to(device),
            self.prompt_len,
            self.layer,
        )


@dataclass
class StepBatch:
    """A batch of decode steps of one layer, each with its own budget's sink and window.

    Rows may repeat a step under different budgets (the budget sweep stacks them), so the
    zone [sink, seq_len - local) is per row."""

    queries: torch.Tensor  #: [S, Hq, D]
    seq_lens: torch.Tensor  #: int64 [S]
    sink: torch.Tensor  #: int64 [S]
    local: torch.Tensor  #: int64 [S]
    retrieved: torch.Tensor  #: int64 [S]: zone tokens the budget retrieves

    def select(self, rows: torch.Tensor) -> StepBatch:
        return StepBatch(*(t[rows] for t in self.fields()))

    def fields(self) -> tuple[torch.Tensor, ...]:
        return (self.queries, self.seq_lens, self.sink, self.local, self.retrieved)

    @staticmethod
    def concat(batches: list[StepBatch]) -> StepBatch:
        return StepBatch(*(torch.cat(ts) for ts in zip(*(b.fields() for b in batches))))


def group_mean_query(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[S, Hq, D] -> [S, Hkv, D]: the GQA group mean, the one retrieval query per KV head
    (the codec's choice, applied to every method so they see the same query)."""
    s, hq, d = queries.shape
    return queries.float().reshape(s, num_kv_heads, hq // num_kv_heads, d).mean(2)
