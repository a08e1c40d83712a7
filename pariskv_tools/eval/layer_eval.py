"""Evaluate every method on one layer of one trace: per-step, per-KV-head metrics.

Steps are processed in chunks (all methods, all heads at once) so memory stays bounded and
the work is a few large tensor ops per chunk. The budget sweep stacks every sweep budget's
copy of the chunk's subsampled steps into one batch with per-row sink/window/k, so each
method scores and ranks once per chunk for the whole sweep; zone-independent scores are
reused from the main pass, and only ParisKV (whose adaptive ratios follow the zone) is
re-scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pariskv_tools.eval.budget import Budget
from pariskv_tools.eval.methods.base import Method
from pariskv_tools.eval.metrics import (
    StepReference,
    dense_probs,
    recall_at_k,
    take_first,
    topk_mask,
)
from pariskv_tools.eval.ranking import rank, zone_mask
from pariskv_tools.eval.trace import LayerTrace, StepBatch, group_mean_query

METRICS = ("recall_at_100", "recall_at_budget", "mass_recall", "output_rel_err")


@dataclass
class LayerResult:
    """metrics[name][metric]: float32 [S, H]; sweep_mass[name]: float32 [F, S_sweep, H]."""

    metrics: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    sweep_mass: dict[str, torch.Tensor] = field(default_factory=dict)
    sweep_steps: torch.Tensor | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)


def exact_scores(batch: StepBatch, keys: torch.Tensor) -> torch.Tensor:
    """Group-mean q·k [S, H, N]: the ground truth of every recall."""
    q = group_mean_query(batch.queries, keys.shape[1])
    return torch.einsum("shd,nhd->shn", q, keys.float())


def score_all(
    methods: Sequence[Method], states: list, batch: StepBatch, shared: dict | None
) -> dict[str, torch.Tensor]:
    """Scores of every method; zone-independent ones come from ``shared`` when given."""
    out = {}
    for method, state in zip(methods, states):
        if shared is not None and not method.zone_dependent:
            out.update({name: shared[name] for name in method.names})
        else:
            out.update(method.scores(state, batch))
    return out


def main_metrics(
    scores: dict[str, torch.Tensor],
    batch: StepBatch,
    trace: LayerTrace,
    probs: torch.Tensor,
    recall_k: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """Every metric of every method on one chunk at its (per-row) budget."""
    seq, n = batch.seq_lens, trace.num_keys
    ref = StepReference(probs, trace.values, seq, batch.sink, batch.local)
    in_zone = zone_mask(seq, batch.sink, batch.local, n)
    k = batch.retrieved
    k100 = torch.full_like(k, recall_k)
    length = max(recall_k, int(k.max()))
    target, _ = rank(exact_scores(batch, trace.keys), in_zone, length)
    truth_k, truth_100 = topk_mask(target, k, n), topk_mask(target, k100, n)
    out = {}
    for name, sc in scores.items():
        ranked, valid = rank(sc, in_zone, length)
        take, take100 = take_first(valid, k), take_first(valid, k100)
        out[name] = {
            "recall_at_100": recall_at_k(ranked, take100, truth_100, k100),
            "recall_at_budget": recall_at_k(ranked, take, truth_k, k),
            "mass_recall": ref.mass_recall(ranked, take),
            "output_rel_err": ref.output_rel_err(ranked, take),
        }
    return out


def sweep_mass(
    scores: dict[str, torch.Tensor], batch: StepBatch, trace: LayerTrace, probs: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Attention-mass recall [rows, H] of every method on a stacked (per-row budget) batch."""
    n = trace.num_keys
    ref = StepReference(probs, trace.values, batch.seq_lens, batch.sink, batch.local, False)
    in_zone = zone_mask(batch.seq_lens, batch.sink, batch.local, n)
    length = max(1, int(batch.retrieved.max()))
    out = {}
    for name, sc in scores.items():
        ranked, valid = rank(sc, in_zone, length)
        out[name] = ref.mass_recall(ranked, take_first(valid, batch.retrieved))
    return out


def evaluate_layer(
    trace: LayerTrace,
    methods: Sequence[Method],
    main: Budget,
    sweep: Sequence[Budget] = (),
    sweep_stride: int = 8,
    recall_k: int = 100,
    chunk: int = 32,
    progress=None,
) -> LayerResult:
    """Metrics of every method on every step of ``trace`` at budget ``main``, plus the
    attention-mass recall at each ``sweep`` budget on every ``sweep_stride``-th step."""
    states = [m.prepare(trace) for m in methods]
    steps = trace.queries.shape[0]
    res = LayerResult(sweep_steps=torch.arange(0, steps, sweep_stride))
    for method, state in zip(methods, states):
        if hasattr(method, "diagnostics"):
            res.diagnostics.update(method.diagnostics(state, trace))
    parts: dict[str, dict[str, list]] = {}
    sweep_parts: dict[str, list] = {}
    for lo in range(0, steps, chunk):
        batch = main.batch(trace.queries[lo : lo + chunk], trace.seq_lens[lo : lo + chunk])
        probs = dense_probs(batch.queries, trace.keys, batch.seq_lens)
        shared = {}
        for method, state in zip(methods, states):
            if not method.zone_dependent:
                shared.update(method.scores(state, batch))
        scores = score_all(methods, states, batch, shared)
        for name, mets in main_metrics(scores, batch, trace, probs, recall_k).items():
            for metric, v in mets.items():
                parts.setdefault(name, {}).setdefault(metric, []).append(v)

        rows = torch.arange(lo, lo + len(batch.seq_lens))
        rows = (rows[rows % sweep_stride == 0] - lo).to(batch.seq_lens.device)
        if len(rows) and sweep:
            sub = batch.select(rows)
            stacked = StepBatch.concat([b.batch(sub.queries, sub.seq_lens) for b in sweep])
            reps = len(sweep)
            sub_shared = {name: v[rows].repeat(reps, 1, 1) for name, v in shared.items()}
            sc = score_all(methods, states, stacked, sub_shared)
            got = sweep_mass(sc, stacked, trace, probs[rows].repeat(reps, 1, 1))
            for name, v in got.items():
                sweep_parts.setdefault(name, []).append(v.reshape(reps, len(rows), -1))
        if progress is not None:
            progress.update(len(batch.seq_lens))
    for name, mets in parts.items():
        res.metrics[name] = {m: torch.cat(v).cpu() for m, v in mets.items()}
    for name, v in sweep_parts.items():
        res.sweep_mass[name] = torch.cat(v, dim=1).cpu()
    return res
