"""What ``--enable-pariskv`` costs requests that never retrieve.

    python benchmarks/bench_short_traffic.py --inputs 4096 --batches 1 8 32 64

Requests at or below the dense threshold decode with SGLang's own dense call, so their
answers are exact; this measures what they pay for ParisKV being on (the codes written
for every key, the planning), against plain SGLang on the same
attention backend with the same flags, in the same run: decode time per step and the
batch's time to first token (prefill, codes encoded; the median of ``--ttft-repeats``
prefills of fresh prompts). Llama-3.1-8B shape with dummy
weights, default ParisKV config. Writes ``benchmarks/results/short_traffic.json`` and
``.png``; ``--runs-dir`` keeps each engine's rows so a run cut short resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import add_split_run_args  # noqa: E402
from engine_runs import _device_info  # noqa: E402
from throughput import run_throughput  # noqa: E402

from pariskv_tools.cli import HelpFormatter, add_results_args, redraw, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "short_traffic.json"


def summarize(run: dict) -> list[dict]:
    """Per (input, batch): both engines' step and first-token times and their ratios
    (ParisKV / dense: 1.0 is free, 1.03 is 3% slower)."""
    cases = []
    for c in run["cases"]:
        case = {
            k: c.get(k)
            for k in (
                "input_len",
                "batch",
                "dense_ms_per_token",
                "pariskv_ms_per_token",
                "dense_ttft_ms",
                "pariskv_ttft_ms",
            )
        }
        for what in ("ms_per_token", "ttft_ms"):
            d, p = c.get(f"dense_{what}"), c.get(f"pariskv_{what}")
            case[f"{what}_ratio"] = p / d if d and p else None
        cases.append(case)
    return cases


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in data["cases"] if c["ms_per_token_ratio"]]
    labels = [f"{c['input_len'] // 1024}K\nb={c['batch']}" for c in cases]
    x = range(len(cases))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, what, title in (
        (axes[0], "ms_per_token", "decode step"),
        (axes[1], "ttft_ms", "time to first token (batch)"),
    ):
        ax.bar([i - 0.2 for i in x], [c[f"dense_{what}"] for c in cases], 0.4, label="dense")
        ax.bar(
            [i + 0.2 for i in x],
            [c[f"pariskv_{what}"] for c in cases],
            0.4,
            label="--enable-pariskv",
        )
        for i, c in enumerate(cases):
            ax.annotate(
                f"{c[f'{what}_ratio']:.3f}x",
                (i + 0.2, c[f"pariskv_{what}"]),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend(loc="upper left")
    device = data.get("device", "")
    fig.suptitle(f"{device}, Llama-3.1-8B shape: requests below the dense threshold")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument(
        "--inputs",
        type=int,
        nargs="+",
        default=[4096],
        help="input lengths, each at or below the dense threshold",
    )
    ap.add_argument(
        "--batches", type=int, nargs="+", default=[1, 8, 32, 64], help="decode batch sizes"
    )
    ap.add_argument("--output-len", type=int, default=256, help="new tokens per request")
    ap.add_argument(
        "--ttft-repeats",
        type=int,
        default=3,
        help="prefills per batch; the time to first token is their median",
    )
    add_split_run_args(ap)
    add_results_args(ap, RESULTS)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.plot is not None:
        print(redraw(args.plot, plot))
        return
    from sglang_pariskv.config import ParisKVConfig

    if args.ttft_repeats < 1:
        raise SystemExit(f"--ttft-repeats {args.ttft_repeats}: expected at least 1 prefill")
    cfg = ParisKVConfig().to_dict()
    for n in args.inputs:
        if not ParisKVConfig.from_dict(cfg).is_dense(n + args.output_len):
            raise SystemExit(f"--inputs {n}: requests must stay at or below the dense threshold")
    run = run_throughput(
        args.inputs,
        args.batches,
        args.output_len,
        cfg,
        modes=tuple(args.modes),
        runs_dir=args.runs_dir,
        ttft_repeats=args.ttft_repeats,
    )
    if run is None:
        print("engine rows saved; run the other mode to finish", flush=True)
        return
    data = {
        **_device_info(),
        "command": " ".join([sys.executable, *sys.argv]),
        "model": run["model"],
        "output_len": args.output_len,
        "ttft_repeats": args.ttft_repeats,
        "dense_backend": "flashinfer",
        "config": cfg,
        "pariskv_stats": run["engines"],
        "cases": summarize(run),
    }
    write_results(data, args.out, plot)
    for c in data["cases"]:
        print(json.dumps(c), flush=True)


if __name__ == "__main__":
    main()
