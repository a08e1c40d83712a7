"""Where retrieval starts to pay: the context tokens per decode step at which ParisKV
overtakes dense attention, the default of ``--pariskv-min-sparse-tokens``.

    python benchmarks/bench_crossover.py --inputs 16384 32768 49152 65536 98304 --batches 1
    python benchmarks/bench_crossover.py --inputs 32768 --batches 1 2 4 --runs-dir runs

Dense SGLang and ParisKV (retrieving at every size above the dense threshold:
``min_sparse_tokens`` 0) decode the same cached prompts, Llama-3.1-8B shape with dummy
weights, one engine per input length (``throughput.run_throughput``). A step's long
requests hold ``input_len x batch`` context tokens; the crossover is where the speedup
(dense step time / ParisKV's), interpolated linearly between the last measured step that
lost and the first after which none lost, reaches 1. Writes
``benchmarks/results/min_sparse_crossover.json`` and a PNG beside it (speedup against
tokens per step, with the plugin's default marked); ``--runs-dir`` keeps each engine's
rows so a run cut short resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import add_grow_prompts_arg, add_split_run_args  # noqa: E402
from engine_runs import _device_info  # noqa: E402
from throughput import run_throughput  # noqa: E402

from pariskv_tools.cli import HelpFormatter, add_results_args, redraw, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "min_sparse_crossover.json"


def summarize(cases: list[dict]) -> list[dict]:
    """Per measured (input, batch): context tokens per step and the speedup, sorted by
    tokens per step (cases that one engine could not run are left out)."""
    rows = [
        {
            "input_len": c["input_len"],
            "batch": c["batch"],
            "tokens_per_step": c["input_len"] * c["batch"],
            "dense_ms_per_token": c["dense_ms_per_token"],
            "pariskv_ms_per_token": c["pariskv_ms_per_token"],
            "speedup": c["dense_ms_per_token"] / c["pariskv_ms_per_token"],
        }
        for c in cases
        if c.get("dense_ms_per_token") and c.get("pariskv_ms_per_token")
    ]
    return sorted(rows, key=lambda r: (r["tokens_per_step"], r["batch"]))


def crossover(rows: list[dict]) -> float | None:
    """Tokens per step where the speedup reaches 1: linear between the last row that lost
    (speedup < 1) and the next row, after which every row won. The smallest measured size
    if none lost; None if the largest lost (no crossover within the range)."""
    if not rows:
        return None
    lost = [i for i, r in enumerate(rows) if r["speedup"] < 1.0]
    if not lost:
        return float(rows[0]["tokens_per_step"])
    i = lost[-1]
    if i == len(rows) - 1:
        return None
    a, b = rows[i], rows[i + 1]
    frac = (1.0 - a["speedup"]) / (b["speedup"] - a["speedup"])
    return a["tokens_per_step"] + frac * (b["tokens_per_step"] - a["tokens_per_step"])


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["cases"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for b in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == b]
        ax.plot(
            [r["tokens_per_step"] / 1024 for r in mine],
            [r["speedup"] for r in mine],
            "o-",
            label=f"batch {b}",
        )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axvline(data["default_min_sparse_tokens"] / 1024, color="C3", ls="--", label="default")
    if data["crossover_tokens"] is not None:
        ax.axvline(data["crossover_tokens"] / 1024, color="C2", ls=":", label="crossover")
    ax.set_xlabel("context tokens per step (K)")
    ax.set_ylabel("speedup (dense ms / ParisKV ms)")
    ax.set_title(f"{data.get('device', '')}: where retrieval pays, Llama-3.1-8B shape")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument(
        "--inputs",
        type=int,
        nargs="+",
        default=[16384, 32768, 49152, 65536, 98304],
        help="input lengths in tokens, each above the dense threshold",
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1], help="decode batch sizes")
    ap.add_argument("--output-len", type=int, default=256, help="new tokens per request")
    add_grow_prompts_arg(ap)
    add_split_run_args(ap)
    add_results_args(ap, RESULTS)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.plot is not None:
        print(redraw(args.plot, plot))
        return
    from sglang_pariskv.config import ParisKVConfig

    default = ParisKVConfig().min_sparse_tokens
    retrieving = ParisKVConfig(min_sparse_tokens=0)  # retrieval at every size
    cfg = retrieving.to_dict()
    for n in args.inputs:
        if retrieving.is_dense(n):
            raise SystemExit(f"--inputs {n}: requests must be above the dense threshold")
    run = run_throughput(
        args.inputs,
        args.batches,
        args.output_len,
        cfg,
        modes=tuple(args.modes),
        runs_dir=args.runs_dir,
        grow_prompts=args.grow_prompts,
    )
    if run is None:
        print("engine rows saved; run the other mode to finish", flush=True)
        return
    rows = summarize(run["cases"])
    data = {
        **_device_info(),
        "command": " ".join([sys.executable, *sys.argv]),
        "model": run["model"],
        "output_len": args.output_len,
        "config": cfg,
        "default_min_sparse_tokens": default,
        "crossover_tokens": crossover(rows),
        "cases": rows,
    }
    write_results(data, args.out, plot)
    for r in rows:
        print(f"{r['tokens_per_step']:>8} tokens/step (b{r['batch']}): {r['speedup']:.3f}x")
    print(f"crossover: {data['crossover_tokens']} tokens per step (default {default})")


if __name__ == "__main__":
    main()
