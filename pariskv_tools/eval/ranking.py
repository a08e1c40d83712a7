"""From per-token scores to a ranked list of zone positions (shared by every method)."""

from __future__ import annotations

import torch


def per_row(x: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An int or an [S] tensor as an int64 column [S, 1] (per-row budgets broadcast)."""
    t = torch.as_tensor(x, dtype=torch.int64, device=like.device)
    return t.expand(like.shape[0]).reshape(-1, 1) if t.dim() == 0 else t.reshape(-1, 1)


def zone_mask(
    seq_lens: torch.Tensor, sink: int | torch.Tensor, local: int | torch.Tensor, n: int
) -> torch.Tensor:
    """bool [S, n]: position p of step s is in the retrieval zone [sink, seq_len - local)
    (sink and local: ints or per-row [S] tensors)."""
    pos = torch.arange(n, device=seq_lens.device)[None, :]
    end = seq_lens.to(torch.int64)[:, None] - per_row(local, seq_lens)
    return (pos >= per_row(sink, seq_lens)) & (pos < end)


def rank(
    scores: torch.Tensor, in_zone: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``length`` best zone positions per (step, head), best first.

    scores [S, H, N]: integer scores (collision counts, positions) rank equal scores by
    earlier position, the codec's rule, exactly (score·(N+1) + N - pos as one int64 key);
    float scores rank as they are (exact ties are measure-zero). in_zone bool [S, N].
    Returns (positions int64 [S, H, L], valid bool [S, H, L]) with L = min(length, N); a slot
    is invalid when the zone has fewer tokens.
    """
    n = scores.shape[-1]
    out = ~in_zone[:, None, :]
    if scores.is_floating_point():
        key = scores.masked_fill(out, float("-inf"))
        top = torch.topk(key, min(length, n), dim=-1, sorted=True)
        return top.indices, top.values > float("-inf")
    pos = torch.arange(n, device=scores.device)
    key = scores.to(torch.int64) * (n + 1) + (n - pos)
    low = torch.iinfo(torch.int64).min
    top = torch.topk(key.masked_fill(out, low), min(length, n), dim=-1, sorted=True)
    return top.indices, top.values > low
