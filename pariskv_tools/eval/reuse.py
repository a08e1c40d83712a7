"""``python -m pariskv_tools.eval reuse``: what retrieving only every N-th decode step costs
in retrieval quality.

A server can skip a step's retrieval kernels entirely only if it decides on the host,
before the step, that no request needs a new selection: then the step replays a decode
graph without the retrieval path. The one rule the host can apply without the step's
queries is an interval: retrieve at every N-th step, and in between attend over the sink,
the last retrieved top-k and every position from the last retrieval's local window on
(the window start does not move, so tokens that leave the window stay attended, and the
tokens generated since join). This scores that rule on captured traces, every decode step
of every layer at the 10% budget of the evaluation, against retrieving at every step
(N = 1, the served behaviour):

* **recall@100**: of the exact top-100 zone keys of step t (group-mean q·k over
  [sink, seq_len - local)), the share inside ParisKV's top-100 of the last retrieval step
  or inside the positions attended since its window start;
* **mass recall**: step t's dense softmax mass (group mean) on the attended set.

Between retrievals a step attends up to N - 1 tokens more than the budget (the positions
generated since), so the rule is scored slightly in its favour.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pariskv_tools.cli import HelpFormatter, add_model_args
from pariskv_tools.eval.budget import Budget, budget_for
from pariskv_tools.eval.captures import (
    default_cache_dir,
    default_contexts,
    layer_trace,
    load_or_capture,
)
from pariskv_tools.eval.layer_eval import exact_scores
from pariskv_tools.eval.methods import ParisKV
from pariskv_tools.eval.metrics import dense_probs, take_first, topk_mask
from pariskv_tools.eval.ranking import rank, zone_mask
from pariskv_tools.eval.retrieval import git_commit
from pariskv_tools.eval.trace import LayerTrace

RECALL_K = 100
DEFAULT_INTERVALS = (1, 2, 4, 8, 16)


def last_retrieval(steps: torch.Tensor, interval: int) -> torch.Tensor:
    """The step whose selection step ``t`` attends: the last multiple of ``interval``."""
    return torch.div(steps, interval, rounding_mode="floor") * interval


def selections(
    trace: LayerTrace, budget: Budget, method: ParisKV, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [S, H, N] per decode step: the method's retrieved set at the budget, and its
    top-100."""
    s, h, n = trace.queries.shape[0], trace.num_kv_heads, trace.num_keys
    state = method.prepare(trace)
    picked = torch.zeros(s, h, n, dtype=torch.bool)
    top100 = torch.zeros_like(picked)
    for lo in range(0, s, chunk):
        batch = budget.batch(trace.queries[lo : lo + chunk], trace.seq_lens[lo : lo + chunk])
        scores = method.scores(state, batch)[method.names[0]]
        in_zone = zone_mask(batch.seq_lens, batch.sink, batch.local, n)
        ranked, valid = rank(scores, in_zone, max(RECALL_K, int(batch.retrieved.max())))
        rows = ranked.shape[0]
        take = take_first(valid, batch.retrieved)
        take100 = take_first(valid, torch.full_like(batch.retrieved, RECALL_K))
        picked[lo : lo + rows].scatter_(-1, ranked, take)
        top100[lo : lo + rows].scatter_(-1, ranked, take100)
    return picked, top100


def interval_quality(
    trace: LayerTrace,
    budget: Budget,
    intervals: Sequence[int],
    method: ParisKV | None = None,
    chunk: int = 64,
) -> dict[int, dict[str, torch.Tensor]]:
    """{N: {"recall_at_100", "mass_recall": float32 [S, H]}} of one layer when retrieval
    runs at every N-th decode step (step 0 retrieves)."""
    method = method or ParisKV(outputs=("full",))
    picked, top100 = selections(trace, budget, method, chunk)
    s, h, n = picked.shape
    pos = torch.arange(n)[None]
    out: dict[int, dict[str, list]] = {
        iv: {"recall_at_100": [], "mass_recall": []} for iv in intervals
    }
    for lo in range(0, s, chunk):
        steps = torch.arange(lo, min(s, lo + chunk))
        batch = budget.batch(trace.queries[steps], trace.seq_lens[steps])
        seq = batch.seq_lens
        mean_probs = dense_probs(batch.queries, trace.keys, seq).reshape(len(steps), h, -1, n)
        mean_probs = mean_probs.mean(2)
        in_zone = zone_mask(seq, batch.sink, batch.local, n)
        target, _ = rank(exact_scores(batch, trace.keys), in_zone, RECALL_K)
        truth = topk_mask(target, torch.full_like(seq, RECALL_K), n)
        sink = pos < batch.sink[:, None]
        for iv in intervals:
            r = last_retrieval(steps, iv)
            window_start = budget.zone_end(trace.seq_lens[r])
            since = (pos >= window_start[:, None]) & (pos < seq[:, None])  # [s, N]
            attended = picked[r] | (sink | since)[:, None]
            hits = (truth & (top100[r] | since[:, None])).sum(-1)
            out[iv]["mass_recall"].append((mean_probs * attended).sum(-1))
            out[iv]["recall_at_100"].append(hits.float() / RECALL_K)
    return {iv: {m: torch.cat(v) for m, v in mets.items()} for iv, mets in out.items()}


def add_reuse_parser(sub) -> None:
    p = sub.add_parser(
        "reuse",
        help="retrieval quality when retrieving only every N-th decode step",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--intervals",
        default=",".join(str(i) for i in DEFAULT_INTERVALS),
        help="comma list of retrieval intervals N (1: every step)",
    )
    p.add_argument("--fraction", type=float, default=0.10, help="attended budget fraction")
    p.add_argument("--n-decode", type=int, default=1024, help="decode steps captured")
    p.add_argument("--seed", type=int, default=0, help="seed of the tasks")
    p.add_argument("--cache-dir", type=Path, help="captured traces (default: under --cache-root)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/retrieval_reuse.json"),
        help="results JSON",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's)")
    add_model_args(p)


def _intervals(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise SystemExit(f"--intervals: {text!r} is not a comma list of integers") from None
    if not out or min(out) < 1:
        raise SystemExit(f"--intervals: {text!r}: each interval must be >= 1")
    return sorted(set(out))


def run_reuse_cli(args, argv: list[str]) -> dict:
    from pariskv_tools.workloads.models import resolve_model

    t0 = time.monotonic()
    intervals = _intervals(args.intervals)
    model = resolve_model(args.model, args.cache_root, args.smollm2_gguf)
    cache_dir = args.cache_dir or default_cache_dir(args.cache_root)
    contexts = {}
    for spec in default_contexts(model.max_positions):
        cap = load_or_capture(spec, args.n_decode, args.seed, cache_dir, model)
        budget = budget_for(args.fraction, cap.prompt_len)
        per_layer = []
        for layer in range(cap.n_layers):
            res = interval_quality(layer_trace(cap, layer), budget, intervals)
            per_layer.append(
                {iv: {m: v.mean().item() for m, v in d.items()} for iv, d in res.items()}
            )
            print(f"[reuse] {spec.label} layer {layer}", file=sys.stderr, flush=True)
        contexts[spec.label] = {
            "task": cap.meta.get("task", spec.task),
            "prompt_len": cap.prompt_len,
            "n_decode": cap.n_decode,
            "intervals": {
                str(iv): {
                    m: sum(d[iv][m] for d in per_layer) / len(per_layer)
                    for m in ("recall_at_100", "mass_recall")
                }
                for iv in intervals
            },
        }
    summary = {
        str(iv): {
            m: sum(c["intervals"][str(iv)][m] for c in contexts.values()) / len(contexts)
            for m in ("recall_at_100", "mass_recall")
        }
        | {"fraction_of_steps_retrieving": 1.0 / iv}
        for iv in intervals
    }
    every = summary[str(intervals[0])] if intervals[0] == 1 else None
    if every is not None:
        for s in summary.values():
            s["recall_at_100_drop"] = every["recall_at_100"] - s["recall_at_100"]
            s["mass_recall_drop"] = every["mass_recall"] - s["mass_recall"]
    doc = {
        "command": "python -m pariskv_tools.eval " + shlex.join(argv),
        "git_commit": git_commit(),
        "model": model.describe(),
        "device": "cpu",
        "host": platform.node(),
        "rule": "retrieve at every N-th decode step; in between attend sink + the last "
        "retrieved top-k + every position from that retrieval's local-window start on",
        "fraction": args.fraction,
        "recall_k": RECALL_K,
        "contexts": contexts,
        "summary": summary,
        "runtime_s": time.monotonic() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"{'N':>3} {'retrieving':>10} {'recall@100':>10} {'mass':>7}")
    for iv, s in summary.items():
        print(
            f"{iv:>3} {s['fraction_of_steps_retrieving']:>10.3f} "
            f"{s['recall_at_100']:>10.3f} {s['mass_recall']:>7.3f}"
        )
    print(f"wrote {args.out}", file=sys.stderr)
    return doc
