"""Mixed traffic as an operator sees it: a plain SGLang server vs an ``--enable-pariskv`` one.

    python benchmarks/bench_mixed_traffic.py --rates 0.5 1 2 --requests 60
    python benchmarks/bench_mixed_traffic.py --modes dense --runs-dir runs
    python benchmarks/bench_mixed_traffic.py --modes pariskv --runs-dir runs

One server at a time (dense, then ParisKV; same model, same flags otherwise: FlashInfer
attention, radix cache on, ``127.0.0.1`` only) receives open-loop Poisson arrivals at each
request rate: about 90% short chats (1-4K input tokens) and 10% long documents (64-128K),
each decoding exactly ``--output-len`` tokens (``ignore_eos``). The client streams every
request through the OpenAI-compatible ``/v1/completions`` endpoint, with the prompt as
token ids (``openai_stream``), and times it itself: time to first token, and time per
output token after the first, per class and rate. Both servers get the same request list
(same seed); prompts are random token ids, so the radix cache holds no shared prefix, and
it is flushed between rates, where the same prompts come back faster. The default model,
Llama-3.1-8B's shape with random weights, gets a word-per-id tokenizer, which the OpenAI
endpoints need to stream text.

Writes ``benchmarks/results/mixed_traffic.json`` and a PNG beside it (TPOT p50 per class
and rate). Nothing is written unless the ParisKV server's stats files show sparse decode
steps and the dense server's show none. ``--runs-dir`` keeps each server's measurements, so
the two servers can run in two invocations (``--modes dense``, then ``--modes pariskv``),
and it keeps them rate by rate: a run cut short (a time limit) keeps the rates it finished,
and the same command again runs only the rest.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import add_split_run_args  # noqa: E402
from engine_runs import _device_info, add_counters, resume_run  # noqa: E402
from mixed_runs import _context_length, run_server  # noqa: E402
from mixed_workload import CLASSES  # noqa: E402
from server_process import _on_signal, serve_model  # noqa: E402
from traffic_stats import MODES, summarize  # noqa: E402

from pariskv_tools.cli import HelpFormatter, add_results_args, redraw, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "mixed_traffic.json"

DEFINITIONS = {
    "ttft_definition": "per request, on the client: from sending the streamed /v1/completions "
    "request to the first chunk carrying an output token",
    "tpot_definition": "per request, on the client: (time of the last output chunk - time "
    "of the first) / (output tokens - those of the first chunk, by the server's running "
    "count: more than one where it coalesced a lagging client's outputs)",
    "output_tok_s_definition": "output tokens of the class's finished requests / the rate's "
    "wall time (first request sent to last request finished)",
    "percentiles": "linear interpolation between order statistics (numpy's default)",
}


# --------------------------------------------------------------------------- results


def check_pariskv_ran(stats: dict[str, dict], sent_long: int) -> None:
    """Refuse (raise) unless the ParisKV server decoded sparsely and the dense one never
    ran ParisKV: otherwise the comparison would be dense against dense."""
    if stats["dense"]:
        raise RuntimeError(f"refusing to write results: the dense server ran ParisKV ({stats})")
    if sent_long and not stats["pariskv"].get("sparse_request_steps"):
        raise RuntimeError(
            "refusing to write results: the --enable-pariskv server's stats files show no "
            f"sparse decode steps ({stats['pariskv']}) although long documents were sent"
        )
    if not stats["pariskv"]:
        raise RuntimeError("refusing to write results: the ParisKV server wrote no stats files")


def _workload_key(args, model_desc: str) -> dict:
    """What both servers' measurements must share to be compared."""
    return {
        "model": model_desc,
        "rates": args.rates,
        "requests": args.requests,
        "long_fraction": args.long_fraction,
        "short_input": list(args.short_input),
        "long_input": list(args.long_input),
        "output_len": args.output_len,
        "seed": args.seed,
        "max_seconds": args.max_seconds,
        "mem_fraction_static": args.mem_fraction,
        "server_args": args.server_arg,
    }


def compose(runs: dict[str, dict], key: dict, args) -> dict:
    """The results file's content from both servers' measurements."""
    from sglang_pariskv.config import ParisKVConfig

    sent_long = sum(
        r["cls"] == "long" for got in runs["pariskv"]["rates"].values() for r in got["records"]
    )
    stats = {m: runs[m]["stats"] for m in MODES}
    check_pariskv_ran(stats, sent_long)
    return {
        **_device_info(),
        "command": " ".join([sys.executable, *sys.argv]),
        "model": key["model"],
        "workload": {k: v for k, v in key.items() if k not in ("model", "rates")},
        "endpoint": "/v1/completions, streamed, token-id prompts",
        **DEFINITIONS,
        "pariskv_config": ParisKVConfig().to_dict(),
        "server_commands": {m: runs[m]["server_command"] for m in MODES},
        "server_info": {m: runs[m].get("server_info") for m in MODES},
        "pariskv_stats": stats["pariskv"],
        "rates": summarize(runs, args.rates),
    }


def merge_runs(done: dict | None, part: dict) -> dict:
    """One server's measurements from a run that was cut short (``done``, or None) and the
    run that resumed it (``part``): the rates of both, their counters summed."""
    if done is None:
        return part
    return {**part, **{k: v for k, v in done.items() if k in ("server_command", "server_info")},
            "rates": {**done["rates"], **part["rates"]},
            "stats": add_counters(done["stats"], part["stats"])}  # fmt: skip


# --------------------------------------------------------------------------- plot


def _k(n: int) -> str:
    return f"{n / 1024:g}K" if n >= 1024 else str(n)


def plot(data: dict, out: Path) -> None:
    """TPOT p50 per class (one panel each) and rate, dense vs ParisKV, ratio on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(data["rates"])
    fig, axes = plt.subplots(1, len(CLASSES), figsize=(5.5 * len(CLASSES), 3.8))
    x = np.arange(len(rates))
    for ax, cls in zip(axes, CLASSES):
        vals = {m: [data["rates"][r][cls][m]["tpot_p50_ms"] or 0 for r in rates] for m in MODES}
        ax.bar(x - 0.2, vals["dense"], 0.4, label="dense")
        ax.bar(x + 0.2, vals["pariskv"], 0.4, label="--enable-pariskv")
        for i in range(len(rates)):
            d, p = vals["dense"][i], vals["pariskv"][i]
            if d and p:
                ax.annotate(f"{p / d:.2f}x", (i + 0.2, p), ha="center", va="bottom", fontsize=8)
        n = [data["rates"][r][cls]["pariskv"]["requests"] for r in rates]
        ax.set_xticks(x, [f"{r} req/s\n(n={k})" for r, k in zip(rates, n)])
        ax.set_ylabel("time per output token, p50 (ms)")
        lo, hi = data["workload"][f"{cls}_input"]
        ax.set_title(f"{cls} requests ({_k(lo)}-{_k(hi)} input tokens)", fontsize=9)
        ax.margins(y=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{data.get('device', '')}: {data['model'][:70]}, mixed traffic", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


# --------------------------------------------------------------------------- main


def add_server_args(
    ap: argparse.ArgumentParser, default_model: str = "a Llama-3.1-8B-shaped config"
) -> None:
    """The options of the servers a benchmark starts (:func:`server_for`)."""
    ap.add_argument(
        "--model-path",
        help=f"model to serve (default: {default_model} with --load-format dummy)",
    )
    ap.add_argument(
        "--mem-fraction", type=float, default=0.85, help="--mem-fraction-static of the servers"
    )
    ap.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra launch_server argument for the servers, one token each: "
        "--server-arg=--chunked-prefill-size --server-arg=8192",
    )
    ap.add_argument(
        "--health-timeout",
        type=float,
        default=900.0,
        help="seconds to wait for a server's /health_generate",
    )
    ap.add_argument("--log-dir", type=Path, help="server logs and stats (default: a temp dir)")


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW-HIGH in tokens") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument(
        "--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="request rates, req/s"
    )
    ap.add_argument("--requests", type=int, default=60, help="requests per rate")
    ap.add_argument(
        "--long-fraction", type=float, default=0.1, help="fraction of long-document requests"
    )
    ap.add_argument(
        "--short-input",
        type=_range,
        default="1024-4096",
        help="input tokens of a short chat, LOW-HIGH (uniform)",
    )
    ap.add_argument(
        "--long-input",
        type=_range,
        default="65536-131072",
        help="input tokens of a long document, LOW-HIGH (uniform)",
    )
    ap.add_argument("--output-len", type=int, default=256, help="output tokens per request")
    ap.add_argument("--seed", type=int, default=0, help="workload seed (same for both servers)")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="per rate: send no request scheduled after this many seconds",
    )
    ap.add_argument(
        "--request-timeout", type=float, default=300.0, help="seconds one request may take"
    )
    add_server_args(ap)
    add_split_run_args(ap)
    add_results_args(ap, RESULTS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:
        redraw(args.plot, plot)
        return 0
    for name in ("short_input", "long_input"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            raise SystemExit(f"--{name.replace('_', '-')} {lo}-{hi}: need 1 <= LOW <= HIGH")
    if args.requests < 1 or any(r <= 0 for r in args.rates):
        raise SystemExit("--requests must be >= 1 and every rate > 0")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    model, model_desc, model_flags = serve_model(args.model_path, _context_length(args))
    key = _workload_key(args, model_desc)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-mixed-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"logs in {log_dir}", flush=True)

    def missing(done: dict | None) -> list[float]:
        return [r for r in args.rates if done is None or str(r) not in done["rates"]]

    runs = {}
    for mode in MODES:
        saved = args.runs_dir / f"mixed_{mode}.json" if args.runs_dir else None

        def measure(todo: list[float], on_rate, mode=mode) -> dict:
            part = run_server(mode, args, model, model_flags, log_dir, todo, on_rate)
            print(f"[{mode}] ran rates {todo}", flush=True)
            return part

        got = resume_run(saved, key, mode in args.modes, missing, measure, merge_runs, "workload")
        if got is not None:
            runs[mode] = got
    if len(runs) < len(MODES):
        print(f"saved {args.modes} in {args.runs_dir}; run the other mode with the same dir")
        return 0
    data = compose(runs, key, args)
    write_results(data, args.out, plot)
    for rate, per in data["rates"].items():
        for cls in CLASSES:
            d, p = per[cls]["dense"], per[cls]["pariskv"]
            print(
                f"{rate} req/s {cls:5}: TPOT p50 dense {d['tpot_p50_ms']} / ParisKV "
                f"{p['tpot_p50_ms']} ms; TTFT p50 dense {d['ttft_p50_ms']} / ParisKV "
                f"{p['ttft_p50_ms']} ms",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
