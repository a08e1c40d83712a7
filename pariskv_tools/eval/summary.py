"""Reduce per-(context, layer, step, head) metrics to the JSON summary and the table."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pariskv_tools.eval.layer_eval import METRICS, LayerResult

LAYER_GROUPS = ("early", "middle", "late")


def layer_group(layer: int, num_layers: int) -> str:
    """Thirds of the model's depth."""
    return LAYER_GROUPS[min(2, 3 * layer // num_layers)]


def _mean(ts: Sequence[torch.Tensor]) -> float:
    return float(torch.cat([t.flatten() for t in ts]).double().mean()) if ts else float("nan")


def drift(by_step: torch.Tensor) -> dict[str, float]:
    """Trend of a per-step series: least-squares slope per 1000 steps, first/last 128 means."""
    s = by_step.double()
    x = torch.arange(len(s), dtype=torch.float64)
    xc = x - x.mean()
    slope = float((xc * (s - s.mean())).sum() / (xc * xc).sum()) * 1000
    w = min(128, len(s) // 4)
    return {
        "slope_per_1000_steps": slope,
        "first_steps_mean": float(s[:w].mean()),
        "last_steps_mean": float(s[-w:].mean()),
        "window": w,
    }


def summarize(
    results: dict[str, dict[int, LayerResult]],
    num_layers: int,
    fraction: float,
    sweep_fractions: Sequence[float],
    attended_fraction: float,
) -> dict:
    """The ``summary`` object: per method, means over contexts, layers, steps and heads."""
    names = list(next(iter(next(iter(results.values())).values())).metrics)
    out = {}
    for name in names:
        cells = [(c, layer, r) for c, lr in results.items() for layer, r in lr.items()]
        entry = {m: _mean([r.metrics[name][m] for _, _, r in cells]) for m in METRICS}
        entry["budget_fraction"] = fraction
        # Per step: mean over contexts, layers and heads (all contexts have the same steps).
        per_step = torch.stack([r.metrics[name]["recall_at_100"].mean(-1) for _, _, r in cells])
        entry["recall_at_100_by_step"] = [round(v, 5) for v in per_step.mean(0).tolist()]
        mass_step = torch.stack([r.metrics[name]["mass_recall"].mean(-1) for _, _, r in cells])
        entry["mass_recall_by_step"] = [round(v, 5) for v in mass_step.mean(0).tolist()]
        entry["recall_at_100_drift"] = drift(per_step.mean(0))
        entry["mass_recall_drift"] = drift(mass_step.mean(0))
        entry["by_layer_group"] = {
            g: {
                m: _mean(
                    [r.metrics[name][m] for _, la, r in cells if layer_group(la, num_layers) == g]
                )
                for m in ("mass_recall", "recall_at_100", "output_rel_err")
            }
            for g in LAYER_GROUPS
        }
        entry["by_context"] = {
            c: {m: _mean([r.metrics[name][m] for r in lr.values()]) for m in METRICS}
            for c, lr in results.items()
        }
        entry["by_layer"] = {
            m: [
                _mean([results[c][la].metrics[name][m] for c in results])
                for la in sorted(next(iter(results.values())))
            ]
            for m in ("mass_recall", "recall_at_100")
        }
        sweep = [r.sweep_mass[name] for _, _, r in cells if name in r.sweep_mass]
        if sweep:
            per_f = torch.stack([t.double().mean((1, 2)) for t in sweep]).mean(0)
            entry["mass_recall_vs_budget"] = {
                f"{f:.2f}": round(float(v), 5) for f, v in zip(sweep_fractions, per_f)
            }
        entry["attended_fraction"] = attended_fraction  # mean attended / context, all methods
        out[name] = entry
    return out


def table(summary: dict) -> str:
    """Plain-text table of the headline numbers."""
    head = (
        f"{'method':<22}{'R@100':>8}{'R@budget':>10}{'mass':>8}{'out_err':>9}"
        f"{'early':>8}{'middle':>8}{'late':>8}{'drift/1k':>10}"
    )
    lines = [head, "-" * len(head)]
    for name, e in sorted(summary.items(), key=lambda kv: -kv[1]["mass_recall"]):
        g = e["by_layer_group"]
        lines.append(
            f"{name:<22}{e['recall_at_100']:>8.3f}{e['recall_at_budget']:>10.3f}"
            f"{e['mass_recall']:>8.3f}{e['output_rel_err']:>9.3f}"
            f"{g['early']['mass_recall']:>8.3f}{g['middle']['mass_recall']:>8.3f}"
            f"{g['late']['mass_recall']:>8.3f}"
            f"{e['recall_at_100_drift']['slope_per_1000_steps']:>+10.3f}"
        )
    return "\n".join(lines)
