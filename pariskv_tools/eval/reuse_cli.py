"""The ``reuse`` command of ``python -m pariskv_tools.eval``: the rules of
:mod:`pariskv_tools.eval.reuse` scored on captured traces, per context and layer, into one
results JSON."""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path

from pariskv_tools.cli import HelpFormatter, add_model_args, parse_layers
from pariskv_tools.eval.budget import budget_for
from pariskv_tools.eval.captures import (
    default_cache_dir,
    default_contexts,
    layer_trace,
    load_or_capture,
    parse_contexts,
)
from pariskv_tools.eval.methods import ParisKV
from pariskv_tools.eval.retrieval import git_commit
from pariskv_tools.eval.reuse import (
    DEFAULT_INTERVALS,
    DEFAULT_LAGS,
    DEFAULT_SLICES,
    METRICS,
    RECALL_K,
    interval_rules,
    lagged_rules,
    rule_quality,
    sliced_rules,
)
from sglang_pariskv.config import ParisKVConfig, ParisKVConfigError


def add_reuse_parser(sub) -> None:
    p = sub.add_parser(
        "reuse",
        help="retrieval quality when retrieving only every N-th decode step, with an "
        "earlier step's candidates, or re-scoring one slice of the zone per step",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--intervals",
        default=",".join(str(i) for i in DEFAULT_INTERVALS),
        help="comma list of retrieval intervals N (1: every step)",
    )
    p.add_argument(
        "--lags",
        default=",".join(str(i) for i in DEFAULT_LAGS),
        help="comma list of lags d: every step retrieves, its candidates picked with the "
        "query of d steps earlier (the rerank with its own)",
    )
    p.add_argument(
        "--slices",
        default=",".join(str(i) for i in DEFAULT_SLICES),
        help="comma list of slice counts N: every step re-scores one of N slices of the zone "
        "(its collision scores, and its rerank estimates or not), the rest kept",
    )
    p.add_argument(
        "--slice-granule", type=int, default=128, help="positions per granule of a slice"
    )
    p.add_argument("--fraction", type=float, default=0.10, help="attended budget fraction")
    p.add_argument(
        "--candidate-ratio",
        type=float,
        help="ParisKV's candidate ratio in (0, 1] (default: the served length-adaptive one; "
        "0.1 is what it picks from 30K tokens on)",
    )
    p.add_argument(
        "--contexts",
        help="comma list of prompt lengths LEN[:TASK], as for `retrieval` (default: 2k,4k,8k "
        "scaled to the model)",
    )
    p.add_argument("--layers", default="all", help="layers to score: all | ::STRIDE | 0,5,29")
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


def _positive_list(text: str, flag: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise SystemExit(f"{flag}: {text!r} is not a comma list of integers") from None
    if not out or min(out) < 1:
        raise SystemExit(f"{flag}: {text!r}: each {what} must be >= 1")
    return sorted(set(out))


def _mean_by_key(per_layer: list[dict[int, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """{key: {metric: mean over layers}} of per-layer {key: {metric: value}}."""
    return {
        str(k): {m: sum(d[k][m] for d in per_layer) / len(per_layer) for m in METRICS}
        for k in per_layer[0]
    }


def _mean_over_contexts(contexts: dict, field: str) -> dict[str, dict[str, float]]:
    """{rule setting: {metric: mean over contexts}} of the contexts' ``field``."""
    keys = next(iter(contexts.values()))[field]
    return {
        k: {m: sum(c[field][k][m] for c in contexts.values()) / len(contexts) for m in METRICS}
        for k in keys
    }


def _with_drops(means: dict[str, dict], every: dict[str, float]) -> dict[str, dict]:
    """``means`` with each metric's drop against retrieving at every step with the step's
    own query (``every``)."""
    return {k: row | {f"{m}_drop": every[m] - row[m] for m in METRICS} for k, row in means.items()}


def run_reuse_cli(args, argv: list[str]) -> dict:
    from pariskv_tools.workloads.models import resolve_model

    t0 = time.monotonic()
    intervals = _positive_list(args.intervals, "--intervals", "interval")
    lags = _positive_list(args.lags, "--lags", "lag")
    slices = _positive_list(args.slices, "--slices", "slice count")
    if args.slice_granule < 1:
        raise SystemExit(f"--slice-granule: {args.slice_granule} must be >= 1")
    try:
        method = ParisKV(ParisKVConfig(candidate_ratio=args.candidate_ratio), outputs=("full",))
    except ParisKVConfigError as e:
        raise SystemExit(f"--candidate-ratio: {e}") from None
    specs = parse_contexts(args.contexts) if args.contexts else None
    model = resolve_model(args.model, args.cache_root, args.smollm2_gguf)
    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    cache_dir = args.cache_dir or default_cache_dir(args.cache_root)
    contexts = {}
    for spec in specs or default_contexts(model.max_positions):
        cap = load_or_capture(spec, args.n_decode, args.seed, cache_dir, model)
        budget = budget_for(args.fraction, cap.prompt_len)
        by_interval, by_lag, by_slices = [], [], []
        for layer in layers if layers is not None else range(cap.n_layers):
            trace = layer_trace(cap, layer)
            state = method.prepare(trace)  # the layer's codes, encoded once for every rule
            kw = dict(method=method, state=state)
            rules = {("interval", k): r for k, r in
                     interval_rules(trace, budget, [1, *intervals], **kw).items()}  # fmt: skip
            rules |= {("lag", k): r for k, r in lagged_rules(trace, budget, lags, **kw).items()}
            sliced = sliced_rules(trace, budget, slices, granule=args.slice_granule, **kw)
            rules |= {("slice", f"{kind}/{k}"): r for (kind, k), r in sliced.items()}
            res = rule_quality(trace, budget, rules)
            for rows, kind in ((by_interval, "interval"), (by_lag, "lag"), (by_slices, "slice")):
                rows.append(
                    {
                        k: {m: v.mean().item() for m, v in d.items()}
                        for (which, k), d in res.items()
                        if which == kind
                    }  # fmt: skip
                )
            print(f"[reuse] {spec.label} layer {layer}", file=sys.stderr, flush=True)
        contexts[spec.label] = {
            "task": cap.meta.get("task", spec.task),
            "prompt_len": cap.prompt_len,
            "n_decode": cap.n_decode,
            "intervals": _mean_by_key(by_interval),
            "lagged_candidates": _mean_by_key(by_lag),
            "sliced_refresh": _mean_by_key(by_slices),
        }
    by_interval_mean = _mean_over_contexts(contexts, "intervals")
    every = by_interval_mean["1"]
    summary = _with_drops(by_interval_mean, every)
    for iv, row in summary.items():
        row["fraction_of_steps_retrieving"] = 1.0 / int(iv)
    summary = {k: v for k, v in summary.items() if int(k) in intervals}
    lagged_summary = _with_drops(_mean_over_contexts(contexts, "lagged_candidates"), every)
    sliced_summary = _with_drops(_mean_over_contexts(contexts, "sliced_refresh"), every)
    doc = {
        "command": "python -m pariskv_tools.eval " + shlex.join(argv),
        "git_commit": git_commit(),
        "model": model.describe(),
        "device": "cpu",
        "host": platform.node(),
        "rule": "retrieve at every N-th decode step; in between attend sink + the last "
        "retrieved top-k + every position from that retrieval's local-window start on",
        "lagged_rule": "retrieve at every step, the candidates picked by the collision "
        "scores of the query of d steps earlier, reranked with the step's own query",
        "fraction": args.fraction,
        "layers": args.layers,
        "candidate_ratio": args.candidate_ratio or "auto",
        "recall_k": RECALL_K,
        "every_step": every,
        "contexts": contexts,
        "summary": summary,
        "lagged_summary": lagged_summary,
        "sliced_rule": "retrieve at every step; re-score one of N slices of the zone (granules "
        f"of {args.slice_granule} positions, slice j = granule index mod N, step t re-scores "
        "slice t mod N; the first step all): 'collision/N' keeps the other slices' collision "
        "scores from the step that last re-scored them and reranks every candidate with the "
        "step's own query; 'both/N' keeps their rerank estimates too",
        "sliced_summary": sliced_summary,
        "runtime_s": time.monotonic() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"every step: recall@100 {every['recall_at_100']:.3f}, mass {every['mass_recall']:.3f}")
    print(f"{'N':>3} {'retrieving':>10} {'recall@100':>10} {'mass':>7}")
    for iv, row in summary.items():
        print(
            f"{iv:>3} {row['fraction_of_steps_retrieving']:>10.3f} "
            f"{row['recall_at_100']:>10.3f} {row['mass_recall']:>7.3f}"
        )
    print(f"{'lag':>3} {'recall@100':>10} {'mass':>7}  (candidates from an earlier query)")
    for lag, row in lagged_summary.items():
        print(f"{lag:>3} {row['recall_at_100']:>10.3f} {row['mass_recall']:>7.3f}")
    print(f"{'slices':>12} {'recall@100':>10} {'mass':>7}  (one of N slices re-scored per step)")
    for key, row in sliced_summary.items():
        print(f"{key:>12} {row['recall_at_100']:>10.3f} {row['mass_recall']:>7.3f}")
    print(f"wrote {args.out}", file=sys.stderr)
    return doc
