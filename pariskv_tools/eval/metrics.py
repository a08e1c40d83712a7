"""Per-step quality metrics of an attended set against dense attention.

An attended set is sink ∪ local window ∪ the first k ranked zone positions. The sink and
window are the same for every method at a given budget, so their share of the softmax mass
and of the output is computed once per chunk (:class:`StepReference`); each method then only
touches its k retrieved positions, never the whole context. KV-head metrics average over
the GQA group's query heads, so every number is per (step, KV head).
"""

from __future__ import annotations

import torch

from pariskv_tools.eval.ranking import per_row


def dense_probs(
    queries: torch.Tensor, keys: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention weights per query head: [S, Hq, D] x [N, Hkv, D] -> [S, Hq, N].

    Position p of step s is masked when p >= seq_lens[s] (causal)."""
    s, hq, d = queries.shape
    n, hkv, _ = keys.shape
    scale = d**-0.5 if scale is None else scale
    qg = queries.float().reshape(s, hkv, hq // hkv, d)
    logits = torch.einsum("shgd,nhd->shgn", qg, keys.float()) * scale
    future = torch.arange(n, device=keys.device)[None, :] >= seq_lens[:, None]
    logits = logits.masked_fill(future[:, None, None, :], float("-inf"))
    return torch.softmax(logits, -1).reshape(s, hq, n)


def fixed_mask(
    seq_lens: torch.Tensor, sink: int | torch.Tensor, local: int | torch.Tensor, n: int
) -> torch.Tensor:
    """bool [S, n]: the sink [0, sink) and the local window [seq_len - local, seq_len)
    (sink and local: ints or per-row [S] tensors)."""
    pos = torch.arange(n, device=seq_lens.device)[None, :]
    end = seq_lens.to(torch.int64)[:, None]
    start = end - per_row(local, seq_lens)
    return ((pos < per_row(sink, seq_lens)) | (pos >= start)) & (pos < end)


def take_first(valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """bool [S, H, L]: slot j of step s is attended iff valid and j < k[s]."""
    slots = torch.arange(valid.shape[-1], device=valid.device)[None, None]
    return valid & (slots < k[:, None, None])


class StepReference:
    """Dense attention of a chunk of steps and the part of it a budget's sink+window keeps.

    probs [S, Hq, N] (from :func:`dense_probs`), values [N, Hkv, D]. ``with_output=False``
    skips the output terms (the budget sweep only reports mass)."""

    def __init__(
        self,
        probs: torch.Tensor,
        values: torch.Tensor,
        seq_lens: torch.Tensor,
        sink: int | torch.Tensor,
        local: int | torch.Tensor,
        with_output: bool = True,
    ) -> None:
        s, hq, n = probs.shape
        h = values.shape[1]
        self.probs = probs.reshape(s, h, hq // h, n)  # [S, H, G, N]
        self.mean_probs = self.probs.mean(2)  # [S, H, N]: group-mean weights
        fixed = fixed_mask(seq_lens, sink, local, n)[:, None]  # [S, 1, N]
        self.fixed_mass = (self.mean_probs * fixed).sum(-1)
        self.values = values.float().transpose(0, 1)  # [H, N, D]
        if with_output:
            pf = self.probs * fixed[:, :, None]
            self.fixed_num = torch.einsum("shgn,hnd->shgd", pf, self.values)
            self.fixed_den = pf.sum(-1)
            self.dense_out = torch.einsum("shgn,hnd->shgd", self.probs, self.values)

    def mass_recall(self, ranked: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
        """Dense softmax mass of sink ∪ window ∪ ranked[take], group mean: [S, H]."""
        got = torch.gather(self.mean_probs, -1, ranked) * take
        return self.fixed_mass + got.sum(-1)

    def output_rel_err(self, ranked: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
        """||o_sparse - o_dense|| / ||o_dense||, group mean: [S, H].

        o_sparse is softmax over the attended logits, i.e. the dense weights renormalised
        over the attended set."""
        s, h, g, _ = self.probs.shape
        idx = ranked[:, :, None].expand(s, h, g, -1)
        p = torch.gather(self.probs, -1, idx) * take[:, :, None]  # [S, H, G, L]
        heads = torch.arange(h, device=ranked.device)[None, :, None]
        v = self.values[heads, ranked]  # [S, H, L, D]
        num = self.fixed_num + torch.einsum("shgl,shld->shgd", p, v)
        den = self.fixed_den + p.sum(-1)
        out = num / den.clamp_min(torch.finfo(num.dtype).tiny)[..., None]
        err = torch.linalg.vector_norm(out - self.dense_out, dim=-1)
        ref = torch.linalg.vector_norm(self.dense_out, dim=-1).clamp_min(1e-30)
        return (err / ref).mean(-1)


def topk_mask(target: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
    """bool [S, H, n]: the first k[s] positions of ``target`` [S, H, K] (best first)."""
    keep = take_first(torch.ones_like(target, dtype=torch.bool), k)
    out = torch.zeros(*target.shape[:2], n, dtype=torch.bool, device=target.device)
    return out.scatter_(-1, target, keep)


def recall_at_k(
    ranked: torch.Tensor, take: torch.Tensor, truth: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """|ranked[take] ∩ truth| / k per (step, head): [S, H]. ``truth`` from :func:`topk_mask`
    with the same k; steps with k = 0 give 0."""
    hits = (torch.gather(truth, -1, ranked) & take).sum(-1)
    return hits.to(torch.float32) / k.clamp_min(1)[:, None].to(torch.float32)
