"""SimHash LSH as in MagicPIG: K-bit signed random projections in L tables.

Keys are centred with the prefill mean key (MagicPIG's pre-processing: it removes the
shared direction that would otherwise put most keys in one bucket) and hashed into L tables
of K sign bits; a key's score is the number of tables where its bucket equals the query's.
Generated keys are hashed with the same projections and the same (stale) mean on arrival.

Counting collisions naively costs L compares per key per step. We count through an inverted
index instead: keys sorted by (head, table, bucket), so the keys sharing the query's bucket
in a table are one contiguous run, and the work is the number of collisions, not L·N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pariskv_tools.eval.trace import LayerTrace, StepBatch, group_mean_query


@dataclass
class SimHashState:
    proj: torch.Tensor  #: [D, L*K] Gaussian projections
    key_codes: torch.Tensor  #: int64 [N, H, L]: bucket of each key in each table
    sorted_keys: torch.Tensor  #: int64 [H*L*2^K]-bucket-sorted key positions
    bucket_start: torch.Tensor  #: int64 [H*L*2^K]
    bucket_count: torch.Tensor  #: int64 [H*L*2^K]
    num_keys: int


def hash_codes(x: torch.Tensor, proj: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D] -> int64 [..., L]: the K-bit bucket id of x in each table."""
    signs = (x.float() @ proj >= 0).to(torch.float32)
    signs = signs.reshape(*signs.shape[:-1], -1, bits)
    weights = 2.0 ** torch.arange(bits, device=x.device, dtype=torch.float32)
    return (signs @ weights).to(torch.int64)  # exact: integers < 2^24


def count_collisions_naive(key_codes: torch.Tensor, query_codes: torch.Tensor) -> torch.Tensor:
    """Reference: key_codes [N, H, L], query_codes [S, H, L] -> int64 [S, H, N]."""
    eq = key_codes.permute(1, 0, 2)[None] == query_codes[:, :, None, :]
    return eq.sum(-1)


class SimHash:
    names = ("magicpig_simhash",)
    zone_dependent = False

    def __init__(self, bits: int = 10, tables: int = 150, seed: int = 0) -> None:
        self.bits, self.tables, self.seed = bits, tables, seed

    def prepare(self, trace: LayerTrace) -> SimHashState:
        n, h, d = trace.keys.shape
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        proj = torch.randn(d, self.tables * self.bits, generator=gen).to(trace.keys.device)
        mean = trace.keys[: trace.prompt_len].float().mean(0)  # [H, D], fixed at prefill
        codes = hash_codes(trace.keys.float() - mean, proj, self.bits)  # [N, H, L]
        nb = 1 << self.bits
        table = torch.arange(h * self.tables, device=codes.device).reshape(h, self.tables)
        flat = (table[None] * nb + codes).reshape(-1)  # bucket id per (n, h, l)
        order = torch.argsort(flat, stable=True)
        count = torch.bincount(flat, minlength=h * self.tables * nb)
        return SimHashState(
            proj=proj,
            key_codes=codes,
            sorted_keys=order // (h * self.tables),
            bucket_start=torch.cumsum(count, 0) - count,
            bucket_count=count,
            num_keys=n,
        )

    def scores(self, state: SimHashState, batch: StepBatch) -> dict:
        h = state.key_codes.shape[1]
        q = group_mean_query(batch.queries, h)  # queries are not centred (MagicPIG)
        qc = hash_codes(q, state.proj, self.bits)  # [S, H, L]
        return {self.names[0]: self.count(state, qc)}

    def count(self, state: SimHashState, qc: torch.Tensor) -> torch.Tensor:
        """Collision counts int64 [S, H, N] through the inverted index."""
        s, h, tables = qc.shape
        n = state.num_keys
        table = torch.arange(h * tables, device=qc.device).reshape(h, tables)
        bucket = (table[None] * (1 << self.bits) + qc).reshape(-1)  # [S*H*L]
        cnt = state.bucket_count[bucket]
        start = state.bucket_start[bucket]
        row = torch.repeat_interleave(torch.arange(bucket.numel(), device=qc.device), cnt)
        first = torch.cumsum(cnt, 0) - cnt
        within = torch.arange(row.numel(), device=qc.device) - first[row]
        keys = state.sorted_keys[start[row] + within]
        step_head = row // tables
        out = torch.bincount(step_head * n + keys, minlength=s * h * n)
        return out.reshape(s, h, n)
