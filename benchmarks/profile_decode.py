"""Where a decode step's GPU time goes, dense vs ParisKV: per-kernel totals from SGLang's
own torch-profiler hook, same prompts, same run.

    python benchmarks/profile_decode.py --input-len 32768 --batch 1 --steps 8 --out profile

Each engine (Llama-3.1-8B shape, dummy weights, CUDA graphs on) prefills the prompts,
then profiles ``--steps`` decode steps (``Engine.start_profile(num_steps=...)``, GPU
activity only) and writes its chrome trace. The kernels of each trace are summed by name
and divided by the number of steps; the table printed last lists the kernels whose time
per step differs most between the two engines, which is the ParisKV overhead to attack.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

from pariskv_tools.cli import HelpFormatter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_runs import _device_info, _engine, _run_isolated  # noqa: E402
from step_floor import LLAMA_8B  # noqa: E402

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
MODES = ("pariskv", "dense")

#: Kernel-name fragments of each category, first match wins ("other": everything else).
CATEGORIES = (
    (
        "pariskv",
        (
            "scan_kernel",
            "rerank_kernel",
            "topk_kernel",
            "query_table",
            "_count_kernel",
            "_write_kernel",
            "_assemble",
            "_encode",
            "pariskv",
        ),
    ),
    ("attention", ("flashinfer", "BatchDecode", "BatchPrefill", "PersistentVariableLength")),
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "splitK", "Kernel2")),
)


def category(name: str) -> str:
    for cat, parts in CATEGORIES:
        if any(p in name for p in parts):
            return cat
    return "other"


def _trace_events(f: Path) -> list[dict]:
    """All events of a chrome trace (plain or gzipped; a list or ``{"traceEvents": ...}``)."""
    opener = gzip.open if f.suffix == ".gz" else open
    with opener(f, "rt") as fh:
        events = json.load(fh)
    return events.get("traceEvents", events) if isinstance(events, dict) else events


def _is_gpu(ev: dict) -> bool:
    return ev.get("ph") == "X" and ev.get("cat") in GPU_CATS


def _gpu_events(f: Path) -> list[dict]:
    return [ev for ev in _trace_events(f) if _is_gpu(ev)]


def kernel_times_us(trace_files: list[Path]) -> Counter:
    """Summed duration (µs) per GPU kernel / memcpy name over chrome traces."""
    total: Counter = Counter()
    for f in trace_files:
        for ev in _gpu_events(f):
            total[ev["name"]] += float(ev.get("dur", 0.0))
    return total


def graph_kernel_times_us(trace_files: list[Path]) -> tuple[Counter, int]:
    """Summed duration (µs) per kernel name of the kernels launched by ``cudaGraphLaunch``,
    and the number of decode steps they span. Eager work in the window (the extend step,
    its prefill kernels) is left out, so totals / steps are per-decode-step times.

    A step may replay more than one graph (SGLang 0.5.17 showed about three launches per
    decode step), so a step is counted per launch holding at least half the kernel time
    of the largest one (the model's forward graph)."""
    total: Counter = Counter()
    steps = 0
    for f in trace_files:
        events = _trace_events(f)
        graph_corr = {
            ev.get("args", {}).get("correlation")
            for ev in events
            if ev.get("ph") == "X" and str(ev.get("name", "")).startswith("cudaGraphLaunch")
        }
        graph_corr.discard(None)
        per_launch: Counter = Counter()
        for ev in events:
            corr = ev.get("args", {}).get("correlation")
            if _is_gpu(ev) and corr in graph_corr:
                total[ev["name"]] += float(ev.get("dur", 0.0))
                per_launch[corr] += float(ev.get("dur", 0.0))
        if per_launch:
            biggest = max(per_launch.values())
            steps += sum(1 for v in per_launch.values() if v >= 0.5 * biggest)
    return total, steps


def busy_and_span_us(trace_files: list[Path]) -> tuple[float, float]:
    """(time with at least one GPU op running, first op start to last op end), summed over
    traces: span - busy is the GPU's idle time inside the profiled window (launch gaps,
    host work the GPU waits for)."""
    busy = span = 0.0
    for f in trace_files:
        iv = sorted(
            (float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0.0)))
            for ev in _gpu_events(f)
            if "ts" in ev
        )
        if not iv:
            continue
        span += iv[-1][1] - iv[0][0]
        cur_s, cur_e = iv[0]
        for s, e in iv[1:]:
            if s > cur_e:
                busy += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        busy += cur_e - cur_s
    return busy, span


def _profile_worker(model_dir, pariskv, input_len, batch, steps, out_dir, out_q):
    try:
        import random

        eng = _engine(
            model_dir,
            pariskv,
            load_format="dummy",
            skip_tokenizer_init=True,
            context_length=input_len + 256,
            max_running_requests=batch,
            mem_fraction_static=0.85,
        )
        rng = random.Random(0)
        prompts = [[rng.randrange(1000, 100000) for _ in range(input_len)] for _ in range(batch)]
        eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1})
        eng.start_profile(output_dir=out_dir, num_steps=steps + 2, activities=["GPU"])
        eng.generate(
            input_ids=prompts,
            sampling_params={"max_new_tokens": steps + 64, "ignore_eos": True},
        )
        eng.shutdown()
        out_q.put({"files": [str(p) for p in Path(out_dir).rglob("*.trace.json*")]})
    except Exception as e:
        import traceback

        out_q.put({"error": f"{e!r}\n{traceback.format_exc()}"})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument("--input-len", type=int, default=32768, help="prompt tokens per request")
    ap.add_argument("--batch", type=int, default=1, help="requests")
    ap.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    ap.add_argument(
        "--out", type=Path, help="folder for traces and summary (default: a new temp folder)"
    )
    ap.add_argument("--top", type=int, default=25, help="kernels listed in the tables")
    ap.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="engines to profile"
    )
    ap.add_argument(
        "--reuse",
        type=Path,
        help="a folder holding an earlier call's profile_<mode>.json: that mode is not re-run "
        "(one comparison can span two device calls)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out = args.out or Path(tempfile.mkdtemp(prefix="profile-"))
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(tempfile.mkdtemp(prefix="llama8b-shape-"))
    (model_dir / "config.json").write_text(json.dumps(LLAMA_8B))
    cfg = {"topk": 2048, "sink": 64, "local": 256, "dense_threshold": 8192}
    per_step, windows, graph_steps = {}, {}, {}
    for mode, pk in (("pariskv", cfg), ("dense", None)):
        if mode not in args.modes:
            continue
        saved = args.reuse / f"profile_{mode}.json" if args.reuse else None
        if saved is not None and saved.exists():
            got = json.loads(saved.read_text())
            per_step[mode], windows[mode] = got["kernels_us_per_step"], got["window"]
            graph_steps[mode] = got.get("graph_steps", {"decode_steps": 0})
            continue
        out_dir = tempfile.mkdtemp(prefix=f"trace-{mode}-")
        res = _run_isolated(
            _profile_worker, str(model_dir), pk, args.input_len, args.batch, args.steps, out_dir
        )
        # The profiled window covers steps + 2 scheduler steps, all decode after the
        # radix-cached one-token extend; normalise by the decode steps profiled.
        if "error" in res:
            raise RuntimeError(f"{mode} engine failed: {res['error']}")
        files = [Path(f) for f in res["files"]]
        n = args.steps + 2
        per_step[mode] = {k: v / n for k, v in kernel_times_us(files).items()}
        graph_total, decode_steps = graph_kernel_times_us(files)
        graph_steps[mode] = {
            "decode_steps": decode_steps,
            "kernels_us_per_step": {k: v / decode_steps for k, v in graph_total.items()}
            if decode_steps
            else {},
        }
        if not decode_steps:
            print(f"{mode}: no cudaGraphLaunch-correlated kernels in the trace", flush=True)
        busy, span = busy_and_span_us(files)
        windows[mode] = {"busy_us_per_step": busy / n, "span_us_per_step": span / n}
        (args.out / f"profile_{mode}.json").write_text(
            json.dumps(
                {
                    "kernels_us_per_step": per_step[mode],
                    "window": windows[mode],
                    "graph_steps": graph_steps[mode],
                }
            )
        )
    for mode in MODES:  # a mode not run shows as zeros
        per_step.setdefault(mode, {})
        windows.setdefault(mode, {"busy_us_per_step": 0.0, "span_us_per_step": 0.0})
        graph_steps.setdefault(mode, {"decode_steps": 0, "kernels_us_per_step": {}})
    names = set(per_step["dense"]) | set(per_step["pariskv"])
    rows = sorted(
        names,
        key=lambda n: -abs(per_step["pariskv"].get(n, 0) - per_step["dense"].get(n, 0)),
    )
    cats = [c for c, _ in CATEGORIES] + ["other"]
    summary = {
        "input_len": args.input_len,
        "batch": args.batch,
        "steps": args.steps,
        "device_info": _device_info(),
        "total_us_per_step": {m: sum(v.values()) for m, v in per_step.items()},
        "window": windows,
        "categories_us_per_step": {
            m: {c: sum(t for k, t in v.items() if category(k) == c) for c in cats}
            for m, v in per_step.items()
        },
        "kernels_us_per_step": per_step,
        # Decode steps alone: kernels of the CUDA-graph replays / the decode steps.
        "graph_steps": graph_steps,
        "graph_categories_us_per_step": {
            m: {
                c: sum(t for k, t in v.get("kernels_us_per_step", {}).items() if category(k) == c)
                for c in cats
            }
            for m, v in graph_steps.items()
        },
    }
    (args.out / "profile_decode.json").write_text(json.dumps(summary, indent=2))
    print(f"{'kernel':<70} {'dense us':>9} {'pkv us':>9}")
    for n in rows[: args.top]:
        d, p = per_step["dense"].get(n, 0), per_step["pariskv"].get(n, 0)
        print(f"{n[:70]:<70} {d:>9.1f} {p:>9.1f}")
    t = summary["total_us_per_step"]
    print(f"{'TOTAL GPU time per step':<70} {t['dense']:>9.1f} {t['pariskv']:>9.1f}")
    c = summary["categories_us_per_step"]
    for cat in cats:
        print(f"{'  category ' + cat:<70} {c['dense'][cat]:>9.1f} {c['pariskv'][cat]:>9.1f}")
    gc = summary["graph_categories_us_per_step"]
    print("decode steps alone (CUDA-graph kernels / decode steps):")
    for cat in cats:
        d, p = gc["dense"][cat], gc["pariskv"][cat]
        print(f"{'  graph category ' + cat:<70} {d:>9.1f} {p:>9.1f}")
    gp = graph_steps["pariskv"].get("kernels_us_per_step", {})
    for name, us in sorted(gp.items(), key=lambda x: -x[1])[: args.top]:
        print(f"  pariskv graph {name[:62]:<62} {us:>9.1f}")
    for key in ("busy_us_per_step", "span_us_per_step"):
        print(f"{key:<70} {windows['dense'][key]:>9.1f} {windows['pariskv'][key]:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
