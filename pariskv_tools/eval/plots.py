"""PNG plots of the retrieval-quality run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pariskv_tools.eval.summary import LAYER_GROUPS  # noqa: E402


def _smooth(values: list[float], window: int = 32) -> torch.Tensor:
    """Moving average (valid part) so per-step noise does not hide a trend."""
    t = torch.tensor(values, dtype=torch.float64)
    if len(t) <= window:
        return t
    return t.unfold(0, window, 1).mean(-1)


def replot(json_path: Path) -> list[Path]:
    """Redraw the plots of a saved run (no re-evaluation)."""
    import json

    doc = json.loads(Path(json_path).read_text())
    return plot_all(doc["summary"], Path(json_path).parent, Path(json_path).stem)


def plot_all(summary: dict, out_dir: Path, prefix: str = "retrieval_quality") -> list[Path]:
    """Recall@100 vs decode step, mass recall vs budget, per-layer-group bars."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Derived entries off the equal budget (first layers dense) stay out of the plots.
    names = sorted(
        (n for n in summary if "dense_first" not in n), key=lambda n: -summary[n]["mass_recall"]
    )
    paths = []

    fig, ax = plt.subplots(figsize=(9, 5))
    for name in names:
        y = _smooth(summary[name]["recall_at_100_by_step"])
        x = torch.arange(len(y)) + (len(summary[name]["recall_at_100_by_step"]) - len(y)) // 2
        ax.plot(x.numpy(), y.numpy(), label=name, lw=1.5)
    ax.set(xlabel="decode step", ylabel="recall@100 (32-step moving mean)", ylim=(0, 1.02))
    ax.set_title("Drift: recall@100 over 1024 generated tokens (keys appended, no refit)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    paths.append(out_dir / f"{prefix}_recall_by_step.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        sweep = summary[name].get("mass_recall_vs_budget")
        if not sweep:
            continue
        xs = [100 * float(f) for f in sweep]
        ax.plot(xs, list(sweep.values()), marker="o", label=name)
    ax.set(xlabel="attended budget (% of context)", ylabel="attention-mass recall")
    ax.set_title("Attention-mass recall vs budget (sink + window + retrieved)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(out_dir / f"{prefix}_mass_vs_budget.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        g = summary[name]["by_layer_group"]
        ys = [g[k]["mass_recall"] for k in LAYER_GROUPS]
        xs = [j + i * width for j in range(len(LAYER_GROUPS))]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(LAYER_GROUPS))], LAYER_GROUPS)
    low = min(summary[n]["by_layer_group"][k]["mass_recall"] for n in names for k in LAYER_GROUPS)
    ax.set(ylabel="attention-mass recall at the configured budget", ylim=(max(0, low - 0.05), 1))
    ax.set_title("Attention-mass recall by layer group (thirds of depth)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    paths.append(out_dir / f"{prefix}_layer_groups.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def plot_stress(cases: list[dict], path: Path) -> Path:
    """Recall@100 per stress case, ParisKV plain vs centred vs calibrated (centres and
    channel scales), with the share of the exact top-100 lost at the collision stage
    stacked on top (the bars' gaps to 1)."""
    names = [c["name"] for c in cases]
    xs = torch.arange(len(names)).numpy()
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(names)), 5))
    variants = (("plain", "tab:gray"), ("centred", "tab:blue"), ("calibrated", "tab:green"))
    width = 0.8 / len(variants)
    for i, (variant, color) in enumerate(variants):
        recall = [c[variant]["recall_at_100"] for c in cases]
        lost = [c[variant]["lost_at_collision"] for c in cases]
        pos = xs + (i - (len(variants) - 1) / 2) * width
        ax.bar(pos, recall, width, color=color, label=f"{variant}: recall@100")
        ax.bar(
            pos,
            lost,
            width,
            bottom=recall,
            color=color,
            alpha=0.3,
            label=f"{variant}: lost at collision",
        )
    ax.set_xticks(xs, names, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="share of the exact top-100", ylim=(0, 1.02))
    ax.set_title("ParisKV under key distortions at a 10% budget: plain, centred, calibrated keys")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
