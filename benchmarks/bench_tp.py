"""Tensor parallelism with ParisKV: ``--tp-size 2`` against ``--tp-size 1``, same run.

    python benchmarks/bench_tp.py correctness --tp 2
    python benchmarks/bench_tp.py correctness --tp 2 --modes dense --runs-dir /tmp/tp-runs
    python benchmarks/bench_tp.py correctness --tp 2 --modes pariskv --runs-dir /tmp/tp-runs
    python benchmarks/bench_tp.py throughput --tp 2 --inputs 131072 --batches 1 2 4
    python benchmarks/bench_tp.py throughput --tp 2 --modes dense --runs-dir /tmp/tp-runs
    python benchmarks/bench_tp.py plot

``correctness`` serves SmolLM2-135M with every attention head duplicated (an exactly
equivalent model, ``pariskv_tools.workloads.widen``: 18 query / 6 KV heads, so TP=2
shards it and each rank holds one full copy of the original heads) with real weights, at
TP=1 and TP=2, dense and ParisKV, and compares greedy outputs on passkey prompts above
and below the dense threshold. Dummy weights cannot serve this comparison: SGLang's
dummy loader draws each rank's shard from the same seed, so a TP=2 dummy model is a
different model from the TP=1 one. ``throughput`` measures decode throughput of a
Llama-3.1-8B shape (dummy weights) at TP=2, dense vs ParisKV, with the per-GPU byte floor.
Results go to ``benchmarks/results/tp.json`` and ``tp.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from pariskv_tools.cli import HelpFormatter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import _plot_throughput  # noqa: E402
from engine_runs import _device_info, _engine, _read_stats, _run_isolated  # noqa: E402
from passkey_runs import PASSKEY_CFG, passkey_prompts  # noqa: E402
from throughput import run_throughput  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "tp.json"


def _greedy_worker(model_path, pariskv, tp, prompts, new_tokens, out_q):
    try:
        stats_dir = tempfile.mkdtemp(prefix="pariskv-stats-")
        eng = _engine(
            model_path, pariskv, stats_dir, tp_size=tp, context_length=8192, mem_fraction_static=0.6
        )
        t0 = time.perf_counter()
        outs = eng.generate(
            input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": new_tokens}
        )
        seconds = time.perf_counter() - t0
        eng.shutdown()
        out_q.put(
            {
                "ids": [o["output_ids"] for o in outs],
                "texts": [o["text"] for o in outs],
                "seconds": seconds,
                "stats": _read_stats(stats_dir),
            }
        )
    except Exception as e:
        import traceback

        out_q.put({"error": f"{e!r}\n{traceback.format_exc()}"})


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Exact matches and, per prompt, tokens generated before the first difference."""
    prefix = []
    for x, y in zip(a, b):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        prefix.append(n)
    return {
        "identical": sum(x == y for x, y in zip(a, b)),
        "prompts": len(a),
        "mean_common_prefix_tokens": sum(prefix) / max(len(prefix), 1),
    }


def run_correctness(
    tp: int,
    contexts: list[int],
    trials: int,
    new_tokens: int,
    modes: tuple[str, ...] = ("dense", "pariskv"),
    runs_dir: Path | None = None,
) -> dict | None:
    """Greedy outputs at TP=1 and TP=``tp`` for ``modes`` (ParisKV required; dense, the
    baseline for how much TP alone changes greedy outputs, when asked for).

    With ``runs_dir``, each (mode, tp) run is saved there and reused, so the engine runs
    can be split over several calls (``--modes dense`` then ``--modes pariskv``) on a host
    whose calls are time-limited; returns None until the ParisKV runs exist."""
    from transformers import AutoTokenizer

    from pariskv_tools.workloads import tasks
    from pariskv_tools.workloads.smollm2 import cache_root, ensure_smollm2
    from pariskv_tools.workloads.widen import widen_checkpoint
    from sglang_pariskv.config import ParisKVConfig

    src = ensure_smollm2()
    model = str(widen_checkpoint(src, cache_root() / "SmolLM2-135M-Instruct-hf-wide2"))
    tok = AutoTokenizer.from_pretrained(model)
    task_list, prompts = passkey_prompts(tok, contexts, trials)
    cfg = PASSKEY_CFG
    runs = {}
    for mode, pk in (("dense", None), ("pariskv", cfg)):
        for t in (1, tp):
            saved = runs_dir / f"{mode}_tp{t}.json" if runs_dir is not None else None
            if mode in modes:
                runs[(mode, t)] = _run_isolated(_greedy_worker, model, pk, t, prompts, new_tokens)
                if saved is not None:
                    saved.parent.mkdir(parents=True, exist_ok=True)
                    saved.write_text(json.dumps(runs[(mode, t)]))
            elif saved is not None and saved.exists():
                runs[(mode, t)] = json.loads(saved.read_text())
    if ("pariskv", 1) not in runs or ("pariskv", tp) not in runs:
        return None
    done = [m for m in ("dense", "pariskv") if (m, 1) in runs and (m, tp) in runs]
    for t in (1, tp):
        if ("dense", t) in runs and runs[("dense", t)]["stats"]:
            raise RuntimeError(f"the dense run at tp {t} ran ParisKV")
        if not runs[("pariskv", t)]["stats"].get("sparse_request_steps"):
            raise RuntimeError(f"ParisKV did not run as expected at tp {t}")
    by_ctx = {}
    for ctx in contexts:
        idx = [i for i, (c, _) in enumerate(task_list) if c == ctx]
        row = {"trials": len(idx), "sparse": not ParisKVConfig.from_dict(cfg).is_dense(ctx)}
        for mode in done:
            pick = (
                [runs[(mode, 1)]["ids"][i] for i in idx],
                [runs[(mode, tp)]["ids"][i] for i in idx],
            )
            row[f"{mode}_tp{tp}_vs_tp1"] = _agreement(*pick)
            for t in (1, tp):
                texts = runs[(mode, t)]["texts"]
                row[f"{mode}_tp{t}_acc"] = sum(
                    tasks.score(task_list[i][1], texts[i]) for i in idx
                ) / len(idx)
        by_ctx[str(ctx)] = row
    return {
        "model": "SmolLM2-135M-Instruct with every attention head duplicated (18 q / 6 kv "
        "heads; exactly equivalent), real weights",
        "config": cfg,
        "new_tokens": new_tokens,
        "modes": done,
        "by_context": by_ctx,
        "pariskv_stats": {str(t): runs[("pariskv", t)]["stats"] for t in (1, tp)},
    }


def plot(results: Path = RESULTS) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    panels = [k for k in ("correctness", "throughput") if k in data]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False)
    for ax, name in zip(axes[0], panels):
        if name == "throughput":
            _plot_throughput(ax, data[name])
            ax.set_title(f"TP={data['tp']}: {data[name]['model']}")
            continue
        c = data[name]
        ctxs = list(c["by_context"])
        tp = data["tp"]
        x = range(len(ctxs))
        for off, mode in ((-0.2, "dense"), (0.2, "pariskv")):
            if mode not in c.get("modes", ("dense", "pariskv")):
                continue
            vals = [
                c["by_context"][k][f"{mode}_tp{tp}_vs_tp1"]["identical"]
                / c["by_context"][k][f"{mode}_tp{tp}_vs_tp1"]["prompts"]
                for k in ctxs
            ]
            ax.bar([i + off for i in x], vals, 0.4, label=mode)
        ax.set_xticks(list(x), ctxs)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("context tokens")
        ax.set_ylabel(f"greedy outputs identical, TP={tp} vs TP=1")
        ax.set_title("SmolLM2 (heads x2), real weights")
        ax.legend(loc="lower left")
    fig.tight_layout()
    out = results.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


def _merge(section: str, value: dict, tp: int) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.update(_device_info())
    data["tp"] = tp
    data["command_" + section] = " ".join([sys.executable, *sys.argv])
    data[section] = value
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("correctness", formatter_class=HelpFormatter)
    c.add_argument("--tp", type=int, default=2, help="tensor-parallel size compared with TP=1")
    c.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=[800, 4096, 8000],
        help="passkey prompt lengths in tokens",
    )
    c.add_argument("--trials", type=int, default=10, help="passkeys (seeds) per context")
    c.add_argument("--new-tokens", type=int, default=24, help="tokens generated per prompt")
    c.add_argument(
        "--modes",
        nargs="+",
        choices=("dense", "pariskv"),
        default=["dense", "pariskv"],
        help="engines to run",
    )
    c.add_argument("--runs-dir", type=Path, help="save / reuse each (mode, tp) run here")
    t = sub.add_parser("throughput", formatter_class=HelpFormatter)
    t.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    t.add_argument(
        "--inputs", type=int, nargs="+", default=[131072], help="input lengths in tokens"
    )
    t.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="concurrent requests")
    t.add_argument("--output-len", type=int, default=256, help="tokens decoded per request")
    t.add_argument(
        "--modes",
        nargs="+",
        choices=("dense", "pariskv"),
        default=["dense", "pariskv"],
        help="engines to run",
    )
    t.add_argument("--runs-dir", type=Path, help="save / reuse each mode's engine run here")
    sub.add_parser("plot", formatter_class=HelpFormatter)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "plot":
        print(plot())
        return 0
    if args.cmd == "correctness":
        res = run_correctness(
            args.tp, args.contexts, args.trials, args.new_tokens, tuple(args.modes), args.runs_dir
        )
        if res is None:
            print(f"saved {args.modes} runs in {args.runs_dir}; run the other mode(s) next")
            return 0
        _merge("correctness", res, args.tp)
        for ctx, r in res["by_context"].items():
            same = " ".join(
                f"{m} {r[k]['identical']}/{r[k]['prompts']}"
                for m in res["modes"]
                if (k := f"{m}_tp{args.tp}_vs_tp1") in r
            )
            print(
                f"{ctx:>6} sparse={r['sparse']!s:5} identical tp{args.tp} vs tp1: {same}; "
                f"pariskv acc tp1 {r['pariskv_tp1_acc']:.2f} "
                f"tp{args.tp} {r[f'pariskv_tp{args.tp}_acc']:.2f}"
            )
    else:
        cfg = {"topk": 2048, "sink": 64, "local": 256, "dense_threshold": 8192}
        res = run_throughput(
            args.inputs,
            args.batches,
            args.output_len,
            cfg,
            {"tp_size": args.tp},
            args.tp,
            tuple(args.modes),
            args.runs_dir,
        )
        if res is None:
            print(f"saved {args.modes} runs in {args.runs_dir}; run the other mode next")
            return 0
        _merge("throughput", res, args.tp)
        for case in res["cases"]:
            print(case)
    plot()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
