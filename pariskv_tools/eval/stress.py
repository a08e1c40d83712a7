"""``python -m pariskv_tools.eval stress``: ParisKV on real keys under controlled distortions
(:mod:`pariskv_tools.eval.stress_cases`), plain, with key centres, and with centres and
channel scales, reporting where the exact top-100 is lost.

For every case, layer and scored decode step, at the 10% budget rule of the evaluation:
recall@100 and attention-mass recall of ParisKV in three variants: **plain** (no
calibration), **centred** (key centres only) and **calibrated** (centres and channel
scales, what ``--pariskv-calibration`` serves), each measured by the calibrate tool's own
functions on the calibration text distorted the same way (what a calibration of the
distorted model would write); of ParisKV reranking every zone key (candidate ratio 1.0:
what the collision stage costs); and the exact top-k's mass. A key of the exact top-100
that ParisKV's top-100 misses is lost either at the **collision** stage (not a candidate)
or at the **rerank** (a candidate the 3-bit estimate ranked below 100).
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pariskv_tools.cli import HelpFormatter, add_model_args, load_calibration_for
from pariskv_tools.eval.budget import budget_for
from pariskv_tools.eval.calibrate import (
    calibration_capture,
    key_centres,
    key_scales,
    with_dense,
)
from pariskv_tools.eval.captures import ContextSpec, default_cache_dir, layer_trace, load_or_capture
from pariskv_tools.eval.layer_eval import evaluate_layer, exact_scores
from pariskv_tools.eval.methods import ExactTopK, ParisKV
from pariskv_tools.eval.methods.pariskv import _CANDIDATE_OFFSET
from pariskv_tools.eval.ranking import rank, zone_mask
from pariskv_tools.eval.retrieval import git_commit
from pariskv_tools.eval.stress_cases import Case, apply_case, common_cosine, default_cases
from pariskv_tools.eval.trace import LayerTrace, StepBatch
from sglang_pariskv.config import ParisKVConfig

RECALL_K = 100
VARIANTS = ("plain", "centred", "calibrated")


class LossTracker:
    """Wraps a ParisKV method: scores as the method does, and records per step and KV head
    which exact top-k keys its top-k misses, by stage (collision / rerank)."""

    def __init__(self, method: ParisKV, k: int = RECALL_K) -> None:
        self.method, self.k = method, k
        self.names, self.zone_dependent = method.names, method.zone_dependent
        self.lost: dict[str, list[torch.Tensor]] = {"collision": [], "rerank": []}

    def prepare(self, trace: LayerTrace) -> tuple[Any, torch.Tensor]:
        return self.method.prepare(trace), trace.keys

    def scores(self, state: tuple[Any, torch.Tensor], batch: StepBatch) -> dict:
        inner, keys = state
        out = self.method.scores(inner, batch)
        full = out[self.method.names[0]]
        lost = loss_by_stage(full, exact_scores(batch, keys), batch, self.k)
        for stage, v in lost.items():
            self.lost[stage].append(v)
        return out


def loss_by_stage(
    score: torch.Tensor, exact: torch.Tensor, batch: StepBatch, k: int
) -> dict[str, torch.Tensor]:
    """Fractions [S, H] of the exact top-k (zone) that the top-k of ``score`` misses because
    they were not candidates (collision) or were candidates ranked out (rerank)."""
    n = score.shape[-1]
    in_zone = zone_mask(batch.seq_lens, batch.sink, batch.local, n)
    truth_pos, truth_ok = rank(exact, in_zone, k)
    got_pos, got_ok = rank(score, in_zone, k)
    truth = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, truth_pos, truth_ok)
    got = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, got_pos, got_ok)
    cand = score >= _CANDIDATE_OFFSET / 2
    missed = truth & ~got
    return {
        "collision": (missed & ~cand).sum(-1).float() / k,
        "rerank": (missed & cand).sum(-1).float() / k,
    }


def case_calibration(
    case: Case, ref: LayerTrace, rope_theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, channel scales) [Hkv', D'] that the calibrate tool measures on the
    reference (calibration) trace under ``case``'s distortion."""
    t = apply_case(case, ref, rope_theta)
    centre = key_centres([t.keys], t.prompt_len)
    return centre[0], key_scales([t.keys], [t.queries], centre, t.prompt_len)[0]


def _methods(centre: torch.Tensor, scale: torch.Tensor) -> tuple[list, dict[str, LossTracker]]:
    every = ParisKVConfig(candidate_ratio=1.0)
    calib = {"plain": {}, "centred": {"centres": centre}}
    calib["calibrated"] = {"centres": centre, "scales": scale}
    trackers = {
        v: LossTracker(ParisKV(name=v, outputs=("full", "stage1"), **kw)) for v, kw in calib.items()
    }
    methods = [
        *trackers.values(),
        *(
            ParisKV(every, name=f"{v}_rerank_all", outputs=("full",), **kw)
            for v, kw in calib.items()
        ),
        ExactTopK(),
    ]
    return methods, trackers


def _steps(trace: LayerTrace, case: Case, stride: int) -> LayerTrace:
    total = trace.queries.shape[0]
    if case.steps == "late":  # the last quarter, as many steps as the others score
        idx = torch.arange(total - total // 4, total, max(1, stride // 4))
    else:
        idx = torch.arange(0, total, stride)
    trace.queries, trace.seq_lens = trace.queries[idx], trace.seq_lens[idx]
    return trace


def run_case(case, cap, calib_cap, layers, stride, rope_theta) -> dict:
    """Means over layers, KV heads and scored steps of every metric of one case;
    ``calib_cap``: the calibration text's capture (the distortions' reference)."""
    budget = budget_for(0.10, cap.prompt_len)
    sums: dict[str, list[float]] = {}

    def add(key: str, value: torch.Tensor) -> None:
        sums.setdefault(key, []).append(float(value.double().mean()))

    for layer in layers:
        ref = layer_trace(calib_cap, layer)
        trace = apply_case(case, _steps(layer_trace(cap, layer), case, stride), rope_theta, ref=ref)
        add("common_cosine", torch.tensor(common_cosine(trace.keys)))
        methods, trackers = _methods(*case_calibration(case, ref, rope_theta))
        res = evaluate_layer(trace, methods, budget).metrics
        add("exact_mass_recall", res["exact_topk"]["mass_recall"])
        for v in VARIANTS:
            add(f"{v}.recall_at_100", res[v]["recall_at_100"])
            add(f"{v}.mass_recall", res[v]["mass_recall"])
            add(f"{v}.stage1_recall_at_100", res[f"{v}_stage1"]["recall_at_100"])
            add(f"{v}.rerank_all_recall_at_100", res[f"{v}_rerank_all"]["recall_at_100"])
            for stage, parts in trackers[v].lost.items():
                add(f"{v}.lost_at_{stage}", torch.cat(parts))
    mean = {k: sum(v) / len(v) for k, v in sums.items()}
    out: dict[str, Any] = {
        "name": case.name,
        "distortion": {k: v for k, v in vars(case).items() if k != "name"},
        "common_cosine": round(mean["common_cosine"], 4),
        "exact_mass_recall": round(mean["exact_mass_recall"], 4),
    }
    for v in VARIANTS:
        out[v] = {k.split(".", 1)[1]: round(x, 4) for k, x in mean.items() if k.startswith(v)}
    return out


def table(cases: list[dict]) -> str:
    """Markdown: per case, plain → centred → calibrated for recall@100, mass, and the
    losses."""
    head = (
        "| case | cos to mean | recall@100 | mass (exact) | lost at collision | lost at rerank "
        "| rerank-all recall@100 |\n|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for c in cases:

        def pair(key: str, c=c) -> str:
            return " → ".join(f"{c[v][key]:.3f}" for v in VARIANTS)

        rows.append(
            f"| {c['name']} | {c['common_cosine']:.2f} | {pair('recall_at_100')} | "
            f"{pair('mass_recall')} ({c['exact_mass_recall']:.3f}) | "
            f"{pair('lost_at_collision')} | {pair('lost_at_rerank')} | "
            f"{pair('rerank_all_recall_at_100')} |"
        )
    return "\n".join(rows)


def add_stress_parser(sub) -> None:
    s = sub.add_parser(
        "stress",
        help="ParisKV under controlled key distortions, with and without centring",
        formatter_class=HelpFormatter,
    )
    s.add_argument("--calibration", type=Path, required=True, help="calibration file (centres)")
    s.add_argument("--context", type=int, default=4096, help="prompt tokens of the trace")
    s.add_argument("--task", default="multikey_needle", help="task generator of the prompt")
    s.add_argument("--n-decode", type=int, default=1024, help="decode steps captured")
    s.add_argument("--step-stride", type=int, default=16, help="score every N-th decode step")
    s.add_argument("--layers", default="0,5,10,15,20,25", help="comma list of layers")
    s.add_argument("--cases", help="comma list of case names (default: all)")
    s.add_argument("--seed", type=int, default=0, help="seed of the task")
    s.add_argument("--cache-dir", type=Path, help="captured traces (default: under --cache-root)")
    s.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/retrieval_robustness.json"),
        help="results JSON (a PNG is written next to it)",
    )
    s.add_argument(
        "--dense-gain",
        type=Path,
        help="instead of the cases: per-layer mass recall of the real trace on every layer, "
        "and the mass with the calibration's dense layers (and the first 1-3) dense, to JSON",
    )
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's)")
    add_model_args(s)


def run_stress_cli(args, argv: list[str]) -> dict:
    from pariskv_tools.workloads.models import resolve_model

    t0 = time.monotonic()
    model = resolve_model(args.model, args.cache_root, args.smollm2_gguf)
    cal = load_calibration_for(args.calibration, model.config)
    spec = ContextSpec(f"{args.context}", args.task, args.context)
    cache_dir = args.cache_dir or default_cache_dir(args.cache_root)
    cap = load_or_capture(spec, args.n_decode, args.seed, cache_dir, model)
    calib_cap = calibration_capture(cal.extra.get("settings", {}), model, cache_dir)
    layers = [int(x) for x in args.layers.split(",")]
    cases = default_cases()
    if args.cases:
        keep = set(args.cases.split(","))
        cases = [c for c in cases if c.name in keep]
    rope_theta = float(model.config.rope_parameters["rope_theta"])
    if args.dense_gain is not None:
        return dense_gain(cap, calib_cap, cal, args, rope_theta)
    results = []
    for case in cases:
        print(f"[stress] {case.name}", file=sys.stderr, flush=True)
        results.append(run_case(case, cap, calib_cap, layers, args.step_stride, rope_theta))
    doc = {
        "command": "python -m pariskv_tools.eval " + shlex.join(argv),
        "git_commit": git_commit(),
        "model": model.describe(),
        "host": platform.node(),
        "trace": {"task": args.task, "prompt_len": cap.prompt_len, "n_decode": cap.n_decode},
        "settings": {
            "budget": "10% rule of eval.retrieval (sink/window scaled to half the budget)",
            "layers": layers,
            "decode_step_stride": args.step_stride,
            "recall_k": RECALL_K,
            "calibration": str(args.calibration),
            "calibration_of_a_case": "the calibrate tool's centres and channel scales, "
            "measured on the calibration file's text (another prompt) under the case's "
            "distortion",
        },
        "runtime_s": round(time.monotonic() - t0, 1),
        "cases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(table(results))
    from pariskv_tools.eval.plots import plot_stress

    print(f"wrote {args.out} and {plot_stress(results, args.out.with_suffix('.png'))}")
    return doc


def dense_gain(cap, calib_cap, cal, args, rope_theta: float) -> dict:
    """What --pariskv-dense-layers buys on the real trace: per-layer masses, then the mean
    over layers with the calibration's recommendation and with the first 1-3 layers dense
    (each dense layer reads its full KV: the KV read grows by (1 - budget) / L per layer)."""
    real = Case("real")
    per = [
        run_case(real, cap, calib_cap, [la], args.step_stride, rope_theta)
        for la in range(cap.n_layers)
    ]
    mass = {v: [p[v]["mass_recall"] for p in per] for v in VARIANTS}
    mass["exact"] = [p["exact_mass_recall"] for p in per]
    sets = {"none": [], "auto": list(cal.dense_layers)}
    sets.update({f"first{n}": list(range(n)) for n in (1, 2, 3)})
    doc = {
        "command": "python -m pariskv_tools.eval " + shlex.join(sys.argv[1:]),
        "git_commit": git_commit(),
        "trace": {"prompt_len": cap.prompt_len, "n_decode": cap.n_decode},
        "decode_step_stride": args.step_stride,
        "budget": 0.10,
        "per_layer_mass_recall": mass,
        "dense_sets": {
            name: {
                "layers": layers,
                "kv_read_fraction": (len(layers) + (cap.n_layers - len(layers)) * 0.10)
                / cap.n_layers,
                **{v: round(with_dense(m, layers), 4) for v, m in mass.items()},
            }
            for name, layers in sets.items()
        },
    }
    args.dense_gain.write_text(json.dumps(doc, indent=1))
    for name, row in doc["dense_sets"].items():
        print(name, row)
    return doc
