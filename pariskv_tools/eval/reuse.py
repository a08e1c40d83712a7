"""Retrieval reuse on the captured traces: quality against retrieving at every step.

``python -m pariskv_tools.eval reuse`` replays every decode step of every layer (generated
tokens join the index as they arrive) once with ParisKV retrieving at every step, and once
per reuse setting (threshold, max age, granularity) with the rule of
:mod:`sglang_pariskv.codec.reuse`: a (layer, KV head) row keeps the ranking it retrieved
and reuses it until the cosine of its group-mean query to the kept one drops below the
threshold (in some head of the layer, or in this head) or ``max_age`` steps passed.

A reusing step attends sink ∪ its current window ∪ the kept ranking's first k, with k the
count retrieved at the kept step. With ``--keeps m`` (serving's ``--pariskv-reuse-keep``)
a retrieval keeps its m·k best instead (at most its candidates) and a reusing step attends
the k of those that its own query's rerank estimates rank first (:func:`rerank_kept`);
m = 1 reuses the kept top-k as it was. Retrieval at every step
takes the current k, which grows with the context, so reuse is never favoured by a larger
set. The default threshold is the setting whose recall@100 and attention-mass recall both
stay within :data:`TOLERANCE` of retrieving at every step with the fewest retrievals.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pariskv_tools.eval.budget import Budget, budget_for
from pariskv_tools.eval.captures import DEFAULT_CONTEXTS, ContextSpec, layer_trace
from pariskv_tools.eval.layer_eval import exact_scores
from pariskv_tools.eval.methods.pariskv import ParisKV
from pariskv_tools.eval.metrics import (
    StepReference,
    dense_probs,
    recall_at_k,
    take_first,
    topk_mask,
)
from pariskv_tools.eval.ranking import rank, zone_mask
from pariskv_tools.eval.retrieval import git_commit
from pariskv_tools.eval.trace import LayerTrace, group_mean_query
from sglang_pariskv.config import DEFAULT_REUSE_KEEP

#: How far below every-step retrieval the chosen default may fall, in recall@100 and mass.
TOLERANCE = 0.01
EVERY_STEP = "every_step"
METRICS = ("recall_at_100", "mass_recall", "retrieved")


@dataclass(frozen=True)
class ReuseSetting:
    threshold: float
    max_age: int
    granularity: str = "layer"  #: "layer" (what serving does) or "head"
    #: A retrieval keeps the ``keep * k`` best of its ranking (at most its candidates); a
    #: reusing step attends the k of those that its own estimates rank first
    #: (``--pariskv-reuse-keep``). 1: the kept top-k as retrieved.
    keep: int = 1

    @property
    def name(self) -> str:
        base = f"t{self.threshold:g}_age{self.max_age}_{self.granularity}"
        return base if self.keep == 1 else f"{base}_keep{self.keep}"


@dataclass
class ReuseRunSettings:
    thresholds: tuple[float, ...] = (0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
    max_ages: tuple[int, ...] = (8, 16, 32, 64)
    granularities: tuple[str, ...] = ("layer", "head")
    keeps: tuple[int, ...] = (DEFAULT_REUSE_KEEP,)
    fraction: float = 0.10
    layers: list[int] | None = None
    n_decode: int = 1024
    recall_k: int = 100
    chunk: int = 32
    seed: int = 0
    contexts: tuple[ContextSpec, ...] = field(default=DEFAULT_CONTEXTS)

    def grid(self) -> list[ReuseSetting]:
        return [
            ReuseSetting(t, a, g, m)
            for m in self.keeps
            for g in self.granularities
            for a in self.max_ages
            for t in self.thresholds
        ]


def reuse_schedule(unit: torch.Tensor, setting: ReuseSetting) -> torch.Tensor:
    """int64 [S, H]: the step whose retrieval each (step, KV head) attends with.

    ``unit``: unit group-mean queries [S, H, D] of consecutive decode steps (one token
    each, so the age in tokens is the step difference). Step 0 retrieves (nothing kept)."""
    u = unit.double().cpu().numpy()
    s, h, _ = u.shape
    kept = np.zeros((s, h), dtype=np.int64)
    cur = np.zeros(h, dtype=np.int64)
    heads = np.arange(h)
    for i in range(1, s):
        cos = (u[i] * u[cur, heads]).sum(-1)
        need = (cos < setting.threshold) | (i - cur >= setting.max_age)
        if setting.granularity == "layer" and need.any():
            need[:] = True
        cur = np.where(need, i, cur)
        kept[i] = cur
    return torch.from_numpy(kept)


def _unit_queries(trace: LayerTrace) -> torch.Tensor:
    q = group_mean_query(trace.queries, trace.num_kv_heads)
    return torch.nn.functional.normalize(q.double(), dim=-1)


def evaluate_layer_reuse(
    trace: LayerTrace,
    budget: Budget,
    settings: Sequence[ReuseSetting],
    recall_k: int = 100,
    chunk: int = 32,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per (step, KV head) recall@100, mass recall and retrieved flag, for retrieval at
    every step (:data:`EVERY_STEP`) and each reuse setting."""
    method = ParisKV(outputs=("full", "estimate"))
    state = method.prepare(trace)
    steps, n = trace.queries.shape[0], trace.num_keys
    k_all = budget.retrieved(trace.seq_lens)
    keep_of = {EVERY_STEP: 1} | {s.name: s.keep for s in settings}
    length = max(recall_k, max(keep_of.values()) * int(k_all.max()))
    ranked, valid, cands = [], [], []
    for lo in range(0, steps, chunk):
        batch = budget.batch(trace.queries[lo : lo + chunk], trace.seq_lens[lo : lo + chunk])
        in_zone = zone_mask(batch.seq_lens, batch.sink, batch.local, n)
        r, v = rank(method.scores(state, batch)["pariskv"], in_zone, length)
        ranked.append(r)
        valid.append(v)
        cands.append(method.candidate_counts(batch))
    ranked_all, valid_all = torch.cat(ranked), torch.cat(valid)
    cands_all = torch.cat(cands)  # [steps]
    h = trace.num_kv_heads
    unit = _unit_queries(trace)
    every = torch.arange(steps)[:, None].expand(steps, h)
    schedules = {EVERY_STEP: every} | {s.name: reuse_schedule(unit, s) for s in settings}
    heads = torch.arange(h)[None, :]
    out: dict[str, dict[str, list]] = {name: {m: [] for m in METRICS} for name in schedules}
    for lo in range(0, steps, chunk):
        hi = min(lo + chunk, steps)
        batch = budget.batch(trace.queries[lo:hi], trace.seq_lens[lo:hi])
        probs = dense_probs(batch.queries, trace.keys, batch.seq_lens)
        ref = StepReference(probs, trace.values, batch.seq_lens, budget.sink, budget.local, False)
        in_zone = zone_mask(batch.seq_lens, batch.sink, batch.local, n)
        k100 = torch.full_like(batch.retrieved, recall_k)
        target, _ = rank(exact_scores(batch, trace.keys), in_zone, recall_k)
        truth = topk_mask(target, k100, n)
        est = None
        for name, sched in schedules.items():
            kept = sched[lo:hi]  # [s, H]
            r, v = ranked_all[kept, heads], valid_all[kept, heads]  # [s, H, L]
            k = k_all[kept]  # the count retrieved at the kept step: [s, H]
            m = keep_of[name]
            if m > 1:
                if est is None:
                    est = method.scores(state, batch)["pariskv_estimate"]
                kept_len = torch.minimum(m * k, cands_all[kept])
                r2, v2 = rerank_kept(r, v, kept_len, est)
                reusing = (kept != torch.arange(lo, hi)[:, None])[..., None]
                r, v = torch.where(reusing, r2, r), torch.where(reusing, v2, v)
            take = v & (torch.arange(r.shape[-1])[None, None] < k[..., None])
            got = out[name]
            got["recall_at_100"].append(recall_at_k(r, take_first(v, k100), truth, k100))
            got["mass_recall"].append(ref.mass_recall(r, take))
            got["retrieved"].append((kept == torch.arange(lo, hi)[:, None]).float())
    return {name: {m: torch.cat(v) for m, v in mets.items()} for name, mets in out.items()}


def rerank_kept(
    ranked: torch.Tensor, valid: torch.Tensor, kept_len: torch.Tensor, est: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A kept superset ranked again for the current step: the first ``kept_len [S, H]``
    valid entries of each kept ranking (positions ``ranked``, flags ``valid``: [S, H, L]),
    best first by the current step's rerank estimates ``est [S, H, N]``; the other entries
    invalid, after them."""
    pos = torch.arange(ranked.shape[-1], device=ranked.device)[None, None]
    sup = valid & (pos < kept_len[..., None])
    now = est.double().gather(-1, ranked).masked_fill(~sup, float("-inf"))
    order = torch.sort(now, dim=-1, descending=True, stable=True).indices
    return ranked.gather(-1, order), sup.gather(-1, order)


def choose_default(summary: dict[str, dict[str, float]], tolerance: float = TOLERANCE) -> str:
    """The "layer" setting (what serving does) within ``tolerance`` of every-step retrieval
    on recall@100 and mass recall with the fewest retrievals (ties: higher recall)."""
    base = summary[EVERY_STEP]
    ok = [
        name
        for name, s in summary.items()
        if "_layer" in name
        and s["recall_at_100"] >= base["recall_at_100"] - tolerance
        and s["mass_recall"] >= base["mass_recall"] - tolerance
    ]
    if not ok:
        return EVERY_STEP
    return min(ok, key=lambda n: (summary[n]["retrieved"], -summary[n]["recall_at_100"]))


def run_reuse(settings: ReuseRunSettings, caps: dict, out_json: Path, command: str) -> dict:
    """Evaluate every setting on every context and layer; write the JSON; print a table."""
    t0 = time.monotonic()
    grid = settings.grid()
    sums: dict[str, dict[str, float]] = {}
    per_context: dict[str, dict[str, dict[str, float]]] = {}
    count = 0
    for spec in settings.contexts:
        cap = caps[spec.label]
        budget = budget_for(settings.fraction, cap.prompt_len)
        layers = settings.layers if settings.layers is not None else range(cap.n_layers)
        ctx: dict[str, dict[str, float]] = {}
        for layer in layers:
            print(f"[reuse] {spec.label} layer {layer}", file=sys.stderr, flush=True)
            res = evaluate_layer_reuse(
                layer_trace(cap, layer), budget, grid, settings.recall_k, settings.chunk
            )
            for name, mets in res.items():
                for m, v in mets.items():
                    ctx.setdefault(name, {}).setdefault(m, 0.0)
                    ctx[name][m] += float(v.mean()) / len(layers)
        per_context[spec.label] = ctx
        count += 1
        for name, mets in ctx.items():
            for m, v in mets.items():
                sums.setdefault(name, {}).setdefault(m, 0.0)
                sums[name][m] += v
    summary = {name: {m: v / count for m, v in mets.items()} for name, mets in sums.items()}
    chosen = choose_default(summary)
    doc = {
        "command": command,
        "git_commit": git_commit(),
        "model": next(iter(caps.values())).meta.get("model"),
        "device": "cpu",
        "host": platform.node(),
        "runtime_s": time.monotonic() - t0,
        "settings": {
            "fraction": settings.fraction,
            "recall_k": settings.recall_k,
            "n_decode": settings.n_decode,
            "layers": settings.layers or "all",
            "tolerance": TOLERANCE,
            "kept_count": "a reusing step attends the k retrieved at its kept step",
        },
        "grid": {s.name: vars(s) for s in grid},
        "summary": summary,
        "per_context": per_context,
        "chosen": chosen,
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1))
    print(table(summary, chosen))
    return doc


def table(summary: dict[str, dict[str, float]], chosen: str) -> str:
    """Markdown: every setting's recall@100, mass and fraction of row-steps retrieving."""
    lines = [
        "| setting | recall@100 | mass@10% | retrieved |",
        "|---|---|---|---|",
    ]
    for name, s in summary.items():
        mark = " **(default)**" if name == chosen else ""
        lines.append(
            f"| {name}{mark} | {s['recall_at_100']:.3f} | {s['mass_recall']:.4f} "
            f"| {s['retrieved']:.3f} |"
        )
    return "\n".join(lines)
