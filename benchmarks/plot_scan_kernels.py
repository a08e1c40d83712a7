"""Draws results/scan_kernels.png from results/scan_kernels.json (the collision
scan variants, timed by bench_retrieval_in_step.py at the commit the JSON names).

    python benchmarks/plot_scan_kernels.py [--results results/scan_kernels.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def plot(path: Path = RESULTS / "scan_kernels.json") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = json.loads(path.read_text())
    runs = rep["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(12, 4.5), sharey=True)
    for ax, (name, run) in zip(axes, runs.items()):
        us = run["scan_us"]
        ax.bar(range(len(us)), list(us.values()), color="tab:blue")
        ax.set_xticks(range(len(us)), list(us), rotation=40, ha="right", fontsize=8)
        ax.set_title(name, fontsize=10)
        for i, v in enumerate(us.values()):
            ax.text(i, v + 0.3, f"{v:.1f}", ha="center", fontsize=8)
    axes[0].set_ylabel("scan kernel, us per layer (32-layer graph)")
    fig.suptitle(
        f"collision scan variants, {rep['N'] // 1024}K x {rep['batch']}, {rep['device']}",
        fontsize=11,
    )
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def build_parser() -> argparse.ArgumentParser:
    from pariskv_tools.cli import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument(
        "--results",
        type=Path,
        default=RESULTS / "scan_kernels.json",
        help="results file to draw",
    )
    return ap


if __name__ == "__main__":
    print(plot(build_parser().parse_args().results))
