"""Product quantisation as in PQCache: k-means codebooks fit at prefill, never refit.

Each key of a head is split into M sub-vectors; each sub-space has C centroids fit by
k-means on the prefill keys of that (layer, head). A key is stored as its M centroid ids,
and q·k is estimated as Σ_m <q_m, centroid_m[id_m]> through a per-step lookup table.
Generated keys are assigned to the nearest *stale* centroid: this is where PQ can drift
when generated keys do not look like the prompt's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pariskv_tools.eval.trace import LayerTrace, StepBatch, group_mean_query


def kmeans(
    x: torch.Tensor, k: int, iters: int = 25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Lloyd k-means: x [G, N, d] -> (centroids [G, k, d], assignment int64 [G, N]).

    Initialised from k distinct random points per group (seeded); an emptied cluster keeps
    its previous centroid, so the result is deterministic.
    """
    g, n, _ = x.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    init = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(g)]).to(x.device)
    cent = torch.gather(x, 1, init[..., None].expand(-1, -1, x.shape[-1])).clone()
    assign = assign_nearest(x, cent)
    for _ in range(iters):
        sums = torch.zeros_like(cent).scatter_add_(1, assign[..., None].expand_as(x), x)
        cnt = torch.zeros(g, k, device=x.device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=x.dtype)
        )
        cent = torch.where(cnt[..., None] > 0, sums / cnt.clamp_min(1)[..., None], cent)
        new = assign_nearest(x, cent)
        if torch.equal(new, assign):
            break
        assign = new
    return cent, assign


def assign_nearest(x: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (L2): x [G, N, d], cent [G, k, d] -> [G, N]."""
    d2 = (cent * cent).sum(-1)[:, None, :] - 2 * x @ cent.transpose(1, 2)
    return d2.argmin(-1)


@dataclass
class PQState:
    centroids: torch.Tensor  #: [H, M, C, d]
    codes: torch.Tensor  #: int64 [H, M, N]


class ProductQuantization:
    names = ("pqcache",)
    zone_dependent = False

    def __init__(self, subvectors: int = 2, centroids: int = 64, iters: int = 15, seed: int = 0):
        self.m, self.c, self.iters, self.seed = subvectors, centroids, iters, seed

    def prepare(self, trace: LayerTrace) -> PQState:
        n, h, dim = trace.keys.shape
        sub = dim // self.m
        x = trace.keys.float().permute(1, 0, 2).reshape(h, n, self.m, sub).transpose(1, 2)
        x = x.reshape(h * self.m, n, sub)  # one k-means per (head, sub-space)
        cent, _ = kmeans(x[:, : trace.prompt_len], self.c, self.iters, self.seed)
        codes = assign_nearest(x, cent)  # every key, generated ones to stale centroids
        return PQState(
            centroids=cent.reshape(h, self.m, self.c, sub), codes=codes.reshape(h, self.m, n)
        )

    def diagnostics(self, state: PQState, trace: LayerTrace) -> dict[str, float]:
        """Relative reconstruction error ||k - k_hat|| / ||k|| of prompt vs generated keys:
        if generated keys are further from the stale centroids, PQ drifts."""
        h, m, c, sub = state.centroids.shape
        rec = torch.gather(
            state.centroids, 2, state.codes[..., None].expand(-1, -1, -1, sub)
        )  # [H,M,N,d]
        rec = rec.permute(2, 0, 1, 3).reshape(trace.num_keys, h, m * sub)
        err = torch.linalg.vector_norm(rec - trace.keys.float(), dim=-1)
        rel = err / torch.linalg.vector_norm(trace.keys.float(), dim=-1).clamp_min(1e-12)
        p = trace.prompt_len
        return {
            "pq_rel_err_prompt_keys": float(rel[:p].mean()),
            "pq_rel_err_generated_keys": float(rel[p:].mean()) if rel.shape[0] > p else 0.0,
        }

    def scores(self, state: PQState, batch: StepBatch) -> dict:
        h, m, c, sub = state.centroids.shape
        q = group_mean_query(batch.queries, h).reshape(-1, h, m, sub)
        lut = torch.einsum("shmd,hmcd->shmc", q, state.centroids)  # [S, H, M, C]
        s, n = q.shape[0], state.codes.shape[-1]
        idx = state.codes[None].expand(s, h, m, n)
        return {self.names[0]: torch.gather(lut, -1, idx).sum(2)}
