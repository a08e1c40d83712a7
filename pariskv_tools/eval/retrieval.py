"""The retrieval-quality run: captures -> per-layer evaluation -> JSON, table and plots."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from pariskv_tools.eval.budget import budget_for
from pariskv_tools.eval.captures import (
    DEFAULT_CONTEXTS,
    ContextSpec,
    layer_trace,
    load_or_capture,
)
from pariskv_tools.eval.layer_eval import LayerResult, evaluate_layer
from pariskv_tools.eval.methods import Method
from pariskv_tools.eval.plots import plot_all
from pariskv_tools.eval.summary import LAYER_GROUPS, summarize, table

if TYPE_CHECKING:
    from pariskv_tools.workloads.models import ModelSource

#: Sources whose uncommitted edits would make the run irreproducible from the commit.
_EVAL_SOURCES = ("pariskv_tools/eval", "sglang_pariskv/codec", "sglang_pariskv/config.py")
BASELINES = ("streaming", "quest", "magicpig_simhash", "pqcache")


@dataclass
class RetrievalSettings:
    fraction: float = 0.10
    sweep: tuple[float, ...] = (0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20)
    sweep_stride: int = 16
    layers: list[int] | None = None  # None: every layer
    n_decode: int = 1024
    recall_k: int = 100
    chunk: int = 32
    seed: int = 0
    device: str = "cpu"
    contexts: tuple[ContextSpec, ...] = field(default=DEFAULT_CONTEXTS)
    dense_first: int = 0  # >0: also report pariskv with layers < dense_first dense


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *_EVAL_SOURCES],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def add_dense_first(results: dict[str, dict[int, LayerResult]], name: str, d: int) -> None:
    """Derive ``{name}_dense_first{d}``: ``name`` with layers < d attending densely
    (recall 1, full mass, exact output), the "first layers dense" deployment option."""
    new = f"{name}_dense_first{d}"
    for per_layer in results.values():
        for layer, res in per_layer.items():
            mets = {m: v.clone() for m, v in res.metrics[name].items()}
            if layer < d:
                for m in mets:
                    mets[m].fill_(0.0 if m == "output_rel_err" else 1.0)
            res.metrics[new] = mets
            if name in res.sweep_mass:
                res.sweep_mass[new] = (
                    torch.ones_like(res.sweep_mass[name]) if layer < d else res.sweep_mass[name]
                )


def diagnostics(results: dict[str, dict[int, LayerResult]]) -> dict:
    """Per-context means of the methods' own diagnostics (e.g. PQ reconstruction error)."""
    out = {}
    for ctx, per_layer in results.items():
        keys = {k for r in per_layer.values() for k in r.diagnostics}
        out[ctx] = {
            k: sum(r.diagnostics[k] for r in per_layer.values()) / len(per_layer) for k in keys
        }
    return out


def check_targets(summary: dict) -> dict:
    """The project's retrieval-quality targets (recall@100, attention-mass recall at a 10%
    budget; see docs/retrieval_quality.md), evaluated on this run."""
    p = summary.get("pariskv")
    if p is None:
        return {}
    out = {
        "recall_at_100_ge_0.85": {"value": p["recall_at_100"], "met": p["recall_at_100"] >= 0.85},
        "recall_no_downward_trend": {
            "slope_per_1000_steps": p["recall_at_100_drift"]["slope_per_1000_steps"],
            "met": p["recall_at_100_drift"]["slope_per_1000_steps"] > -0.01,
        },
        "mass_recall_ge_0.95_at_budget": {
            "value": p["mass_recall"],
            "met": p["mass_recall"] >= 0.95,
        },
    }
    groups = {}
    for g in LAYER_GROUPS:
        mine = p["by_layer_group"][g]["mass_recall"]
        others = {
            b: summary[b]["by_layer_group"][g]["mass_recall"] for b in BASELINES if b in summary
        }
        best = max(others, key=others.get) if others else None
        groups[g] = {
            "pariskv": mine,
            "best_baseline": best,
            "best_baseline_value": others.get(best),
            "met": all(mine >= v for v in others.values()),
        }
    out["beats_baselines_on_mass_in_every_layer_group"] = {
        "groups": groups,
        "met": all(v["met"] for v in groups.values()),
    }
    return out


def _captured_model(caps: dict) -> object:
    """What the captures say they were recorded on, when no model was given."""
    return next(iter(caps.values())).meta.get("model")


def run_retrieval(
    settings: RetrievalSettings,
    methods: Sequence[Method],
    cache_dir: Path,
    out_json: Path,
    command: str,
    plots: bool = True,
    captures: dict | None = None,
    model: ModelSource | None = None,
) -> dict:
    """Evaluate ``methods`` on every context and write JSON + plots next to ``out_json``.

    ``captures`` (label -> Capture) skips loading, for tests on synthetic traces; a missing
    capture is recorded on ``model``, which the JSON's ``model`` field describes (without
    a model, the captures' own ``meta["model"]``)."""
    t0 = time.monotonic()
    caps = dict(captures or {})
    for spec in settings.contexts:
        if spec.label not in caps:
            if model is None:
                raise ValueError(f"no capture for {spec.label!r} and no model to record one")
            caps[spec.label] = load_or_capture(
                spec, settings.n_decode, settings.seed, cache_dir, model
            )
    capture_s = time.monotonic() - t0
    num_layers = next(iter(caps.values())).n_layers
    layers = settings.layers if settings.layers is not None else list(range(num_layers))
    total = sum(len(layers) * c.n_decode for c in caps.values())
    bar = tqdm(total=total, desc="retrieval eval", unit="step", file=sys.stderr, smoothing=0.05)
    results: dict[str, dict[int, LayerResult]] = {}
    contexts_meta = {}
    attended = []
    for spec in settings.contexts:
        cap = caps[spec.label]
        main = budget_for(settings.fraction, cap.prompt_len)
        sweep = [budget_for(f, cap.prompt_len) for f in settings.sweep]
        results[spec.label] = {}
        for layer in layers:
            bar.set_postfix_str(f"{spec.label} layer {layer}")
            trace = layer_trace(cap, layer, settings.device)
            results[spec.label][layer] = evaluate_layer(
                trace,
                methods,
                main,
                sweep,
                sweep_stride=settings.sweep_stride,
                recall_k=settings.recall_k,
                chunk=settings.chunk,
                progress=bar,
            )
        seq = layer_trace(cap, 0).seq_lens
        attended.append((main.attended(seq).double() / seq).mean().item())
        contexts_meta[spec.label] = {
            "task": cap.meta.get("task", spec.task),
            "prompt_len": cap.prompt_len,
            "n_decode": cap.n_decode,
            "decode_steps_evaluated": int(len(seq)),
            "final_len": int(seq[-1]),
            "answer": cap.meta.get("answer"),
            "model_answer": cap.text[:120],
            "model_correct": cap.meta.get("correct"),
            "budget": asdict(main),
            "retrieved_tokens_first_last": [
                int(main.retrieved(seq[:1])),
                int(main.retrieved(seq[-1:])),
            ],
        }
    bar.close()
    frac = sum(attended) / len(attended)
    if (
        settings.dense_first
        and "pariskv" in next(iter(next(iter(results.values())).values())).metrics
    ):
        add_dense_first(results, "pariskv", settings.dense_first)
    summary = summarize(results, num_layers, settings.fraction, settings.sweep, frac)
    if settings.dense_first:
        name = f"pariskv_dense_first{settings.dense_first}"
        d = settings.dense_first
        summary[name]["attended_fraction"] = (d + (num_layers - d) * frac) / num_layers
        summary[name]["note"] = (
            f"pariskv with layers < {d} attending densely (derived: those layers' metrics set "
            "to dense); its attended_fraction is the KV read over all layers, so it is NOT at "
            "the equal budget of the other methods"
        )
    doc = {
        "command": command,
        "seed": settings.seed,
        "git_commit": git_commit(),
        "model": model.describe() if model is not None else _captured_model(caps),
        "device": settings.device,
        "host": platform.node(),
        "runtime_s": {"capture_or_load": capture_s, "total": time.monotonic() - t0},
        "settings": {
            "fraction": settings.fraction,
            "sweep_fractions": list(settings.sweep),
            "recall_k": settings.recall_k,
            "n_decode": settings.n_decode,
            "retrieval_query": "GQA group mean per KV head, for every method",
            "exact_target": "top-k of group-mean q.k over [sink, N - local)",
            "budget_rule": "attended = round(f*N) = sink + local + retrieved; sink/local 64/256, "
            "scaled 1:4 to half of round(f*prompt_len) when larger",
        },
        "subsampling": {
            "layers_evaluated": layers,
            "all_layers": layers == list(range(num_layers)),
            "decode_steps": "all",
            "budget_sweep_steps": f"every {settings.sweep_stride}th decode step",
        },
        "contexts": contexts_meta,
        "diagnostics": diagnostics(results),
        "summary": summary,
        "targets": check_targets(summary),
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1))
    print(table(summary))
    if plots:
        for p in plot_all(summary, out_json.parent, out_json.stem):
            print(f"wrote {p}", file=sys.stderr)
    print(f"wrote {out_json} in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return doc
