"""Soak test: one ``--enable-pariskv`` SGLang server under long, mixed, adversarial traffic.

    python benchmarks/bench_soak.py --duration 1200 --clients 64
    python benchmarks/bench_soak.py --model-path $SMOLLM2 --context-length 8192 \\
        --pariskv-dense-threshold 1024 --short-input 64-768 --long-input 2048-6000 \\
        --chat-doc-tokens 2048 --dense-reference

One server (``127.0.0.1`` only; the Llama-3.1-8B shape with dummy weights unless
``--model-path``) receives ``--clients`` closed-loop client threads for ``--duration``
seconds. Each client draws scenarios from a seeded mix (:data:`KINDS`): shared-prefix
multi-turn chats over one long document, long documents above the dense threshold, short
chats, streamed requests, streams the client closes after a few chunks, ``max_new_tokens``
1, requests as long as the server serves in full (input + output up to where SGLang stops
a request, two tokens short of the context), and malformed or oversized requests, each of
which must get an HTTP 4xx. Well-formed requests decode exactly
their ``max_new_tokens`` (``ignore_eos``): long documents and streamed requests through the
OpenAI ``/v1/completions`` endpoint (prompts as token ids; the default model gets a
word-per-id tokenizer for it), the others through SGLang's native ``/generate``; the
malformed ones go to both and to ``/v1/chat/completions``.

Around the load, on the idle server with an empty radix cache: the free KV tokens
(``/v1/loads``, computed when asked: ``max_total_num_tokens - num_used_tokens``, where used
excludes evictable radix-cache tokens) and a fixed set of greedy probes below the dense
threshold. Between the probes and the load, the KV pool is filled to its advertised capacity
(:mod:`pool_fill`: the fewest requests that hold every free token, sent at once), which is
where memory the server did not plan for would run out. ``--dense-reference`` then starts a
plain SGLang server (same flags without ``--enable-pariskv``) for the same probes (the
results are written once before it, so a run cut short there keeps the soak's). During
the load a sampler records output tokens/s and GPU memory (``nvidia-smi``, when present)
every ``--sample-interval`` seconds, and each successful request's latency is kept for
a per-kind summary (p50, p99, and the p50 of the load's first and last quarter).

Writes ``benchmarks/results/soak.json`` and a PNG beside it. The run fails (exit 1, results
still written with ``failed: true``) on any error of a well-formed request (HTTP error,
error chunk, broken stream, wrong token count, timeout) or of a pool-fill request, a server
crash, a malformed request not answered 4xx, free tokens after the load different from
before, ParisKV counters that do not match what was served, or ParisKV's GPU allocations
(as its backend measured and logged them) more than 2% from the memory planned for them.
The server log's first traceback (why a crashed server died) is kept as ``server_error``.

``--engine dense`` soaks a plain SGLang server instead, with the same flags and load: a
control that tells whether a failure is SGLang's own (its results skip the ParisKV
counter and memory checks).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mixed_traffic import _range, add_server_args  # noqa: E402
from engine_runs import _device_info  # noqa: E402
from server_process import _check_plugin_installed, _on_signal, serve_model  # noqa: E402
from soak_checks import check_counters, verdict  # noqa: E402
from soak_scenarios import DEFAULT_MIX, KINDS, Workload  # noqa: E402
from soak_server import dense_probes, probe_set, soak  # noqa: E402

from pariskv_tools.cli import HelpFormatter, add_results_args, redraw, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"

DEFINITIONS = {
    "errors_definition": "well-formed requests that failed: an HTTP error, an error chunk, "
    "a stream ending without [DONE], fewer or more output tokens than max_new_tokens "
    "(ignore_eos), an abort the client did not cause, or no answer within --request-timeout",
    "aborts_definition": "streams the client closed after a few chunks, on purpose",
    "free_tokens_definition": "sum over DP ranks of /v1/loads max_total_num_tokens - "
    "num_used_tokens, on the idle server after /flush_cache",
    "throughput_definition": "output tokens the clients received (finished, aborted and "
    "chat requests) per sampling interval",
    "latency_definition": "per kind, seconds from sending a well-formed request to its "
    "last token, over those that succeeded (each chat turn is a request); first and last "
    "quarter: the requests that ended in the first and in the last quarter of the load; "
    "tpot: a stream's seconds per output token after its first",
    "pool_fill_definition": "before the load, on the idle server: the fewest requests "
    "(each within the context length, at most max_running_requests) whose input + output "
    "tokens add up to the free KV tokens, sent at once; peak_used_tokens is the largest "
    "/v1/loads num_used_tokens seen while they ran",
    "memory_planned_definition": "GPU bytes the pool sizing took out of the KV pool for "
    "ParisKV (its backend and, with offload, the hot cache), as the backend's last 'backend "
    "memory' log line states them; first TP rank",
    "memory_allocated_definition": "GPU bytes ParisKV allocated beyond plain SGLang, "
    "measured by PyTorch's caching allocator around the backend's construction, its "
    "CUDA-graph state and captures (the same log line); the run fails if they are more "
    "than 2% apart",
}


# --------------------------------------------------------------------------- results


def _same(a: list | None, b: list | None) -> bool:
    """Both probe sets complete (no error) and equal."""
    ok = a is not None and b is not None
    return ok and a == b and not any(isinstance(x, str) for x in a)


def compose(args, w: Workload, model_desc: str, run: dict, dense: dict | None) -> dict:
    """The results file's content, failures included."""
    from pariskv_tools.workloads import prom

    load = run["load"]
    pariskv = args.engine == "pariskv"
    counters = (
        prom.delta(run["counters_before"], run["counters_after"])
        if pariskv and run["counters_after"] is not None
        else None
    )
    res = {
        **_device_info(),
        "command": " ".join([sys.executable, *sys.argv]),
        "model": model_desc,
        "engine": args.engine,
        "workload": {
            **asdict(w),
            "clients": args.clients,
            "duration_s": args.duration,
            "request_timeout_s": args.request_timeout,
            "mem_fraction_static": args.mem_fraction,
            "server_args": args.server_arg,
        },
        **DEFINITIONS,
        "server_commands": {args.engine: run["server_command"]}
        | ({"dense": dense["server_command"]} if dense else {}),
        "server_info": run.get("server_info"),
        "duration_s": load["wall_s"],
        "clients": args.clients,
        "requests": load["requests"],
        "requests_by_kind": load["by_kind"],
        "output_tokens": load["output_tokens"],
        "latency_by_kind": load["latency"],
        "errors": load["errors"],
        "error_samples": load["error_samples"],
        "aborts": load["aborts"],
        "aborts_finished_first": load["aborts_finished_first"],
        "crashes": int(load["crashed"]),
        "server_error": run.get("server_error"),
        "hung_clients": load["hung_clients"],
        "malformed_total": load["malformed_total"],
        "malformed_rejected_4xx": load["malformed_rejected_4xx"],
        "malformed_by_variant": load["malformed_by_variant"],
        "malformed_failures": load["malformed_failures"],
        "pool_fill": run["pool_fill"],
        "free_tokens_idle_before": run["free_tokens_idle_before"],
        "free_tokens_idle_after": run["free_tokens_idle_after"],
        "idle_after": run["idle_after"],
        "probe_input_lens": run["probe_input_lens"],
        "probe_output_len": args.probe_output_len,
        "probe_identical_before_after": _same(run["probes_before"], run["probes_after"]),
        "probe_identical_to_dense": None
        if dense is None
        else _same(run["probes_before"], dense["probes"])
        and _same(run["probes_after"], dense["probes"]),
        "probes": {
            f"{args.engine}_before": run["probes_before"],
            f"{args.engine}_after": run["probes_after"],
        }
        | ({"dense": dense["probes"]} if dense else {}),
        "pariskv_counters": counters,
        "counter_problems": check_counters(counters, load) if pariskv else [],
        "pariskv_stats": run["stats"],
        **run["memory_log"],
        "series": load["series"],
    }
    res["failures"] = verdict(res)
    res["failed"] = bool(res["failures"])
    return res


# --------------------------------------------------------------------------- plot


def plot(data: dict, out: Path) -> None:
    """Output tokens/s and the short chats' median latency, and memory (GPU MiB, KV tokens
    in use), over the soak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["series"]
    t = [p["t_s"] / 60 for p in s]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.plot(t, [p["output_tok_s"] for p in s])
    a.set_ylabel("output tokens/s (clients)", color="tab:blue")
    short = [p.get("short_p50_s") for p in s]
    if any(x is not None for x in short):
        lat = a.twinx()
        lat.plot(t, [np.nan if x is None else x for x in short], color="tab:green")
        lat.set_ylabel("short chats, median s", color="tab:green")
    gpu = [sum(p["gpu_memory_mib"]) / 1024 if p["gpu_memory_mib"] else None for p in s]
    if any(g is not None for g in gpu):
        b.plot(t, [np.nan if g is None else g for g in gpu], label="GPU memory used")
        b.set_ylabel("GPU memory, GiB")
    kv = b.twinx()
    kv.plot(
        t,
        [np.nan if p["kv_used_tokens"] is None else p["kv_used_tokens"] for p in s],
        color="tab:orange",
        label="KV tokens in use",
    )
    kv.set_ylabel("KV tokens in use", color="tab:orange")
    b.set_xlabel("minutes into the soak")
    state = "FAILED: " + data["failures"][0][:100] if data["failed"] else "passed"
    model = Path(data["model"]).name  # a model folder by its name
    if data.get("engine") == "dense":
        model = f"plain SGLang, {model}"
    fig.suptitle(
        f"{data.get('device', '')}: {model[:50]}, {data['clients']} clients, "
        f"{data['requests']} requests\n{state}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)


# --------------------------------------------------------------------------- main


def _mix(text: str) -> dict[str, float]:
    try:
        pairs = [p.split("=") for p in text.split(",") if p]
        out = {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND=WEIGHT,...") from None
    if set(out) - set(KINDS):
        raise argparse.ArgumentTypeError(f"unknown kinds {set(out) - set(KINDS)}; kinds {KINDS}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument("--duration", type=float, default=1200.0, help="seconds of load")
    ap.add_argument("--clients", type=int, default=64, help="concurrent client threads")
    ap.add_argument("--seed", type=int, default=0, help="scenario and prompt seed")
    ap.add_argument(
        "--mix",
        type=_mix,
        default=DEFAULT_MIX,
        help=f"relative weight of each scenario kind ({', '.join(KINDS)})",
    )
    ap.add_argument(
        "--context-length",
        type=int,
        default=32768,
        help="the server's --context-length (ctx_limit requests fill it)",
    )
    ap.add_argument(
        "--pariskv-dense-threshold",
        type=int,
        default=8192,
        help="the server's dense threshold; probes stay at or below it",
    )
    ap.add_argument(
        "--short-input",
        type=_range,
        default="128-2048",
        help="input tokens of short chats and streams, LOW-HIGH (uniform)",
    )
    ap.add_argument(
        "--long-input",
        type=_range,
        default="12288-28672",
        help="input tokens of long documents, LOW-HIGH (above the threshold)",
    )
    ap.add_argument(
        "--chat-doc-tokens",
        type=int,
        default=12288,
        help="tokens of the document every multi-turn chat shares",
    )
    ap.add_argument("--probes", type=int, default=8, help="greedy probe requests")
    ap.add_argument("--probe-output-len", type=int, default=32, help="output tokens per probe")
    ap.add_argument(
        "--request-timeout", type=float, default=300.0, help="seconds one request may take"
    )
    ap.add_argument(
        "--max-requests-per-client",
        type=int,
        default=100000,
        help="scenarios one client runs at most",
    )
    ap.add_argument(
        "--sample-interval",
        type=float,
        default=5.0,
        help="seconds between throughput and memory samples",
    )
    ap.add_argument(
        "--idle-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the server to become idle around the load",
    )
    ap.add_argument(
        "--dense-reference",
        action="store_true",
        help="also send the probes to a plain SGLang server afterwards",
    )
    ap.add_argument(
        "--engine",
        choices=("pariskv", "dense"),
        default="pariskv",
        help="the server soaked: ParisKV's, or plain SGLang's under the same load and flags "
        "(a control: whether a failure is SGLang's own; no ParisKV counters or memory checks)",
    )
    add_server_args(ap)
    add_results_args(ap, RESULTS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:
        redraw(args.plot, plot)
        return 0
    weights = args.mix if isinstance(args.mix, dict) else _mix(args.mix)
    w = Workload(
        args.seed,
        args.context_length,
        args.pariskv_dense_threshold,
        tuple(args.short_input),
        tuple(args.long_input),
        args.chat_doc_tokens,
        weights,
    )
    try:
        w.check()
        probe_set(w, args.probes, args.probe_output_len)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.clients < 1 or args.duration <= 0 or args.sample_interval <= 0:
        raise SystemExit("--clients >= 1, --duration > 0 and --sample-interval > 0")
    if args.engine == "dense" and args.dense_reference:
        raise SystemExit(
            "--dense-reference compares ParisKV's probes with plain SGLang's; with --engine "
            "dense the soaked server is plain SGLang: drop one of them"
        )
    _check_plugin_installed()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    model, model_desc, flags = serve_model(args.model_path, args.context_length)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"logs in {log_dir}", flush=True)
    run = soak(args, w, model, flags, log_dir)
    w = run["workload"]
    if args.dense_reference:
        # the soak's own result first: a run cut short during the reference keeps it
        write_results(
            compose(args, w, model_desc, run, None) | {"dense_reference": "not run yet"},
            args.out,
            plot,
        )
    dense = dense_probes(args, w, model, flags, log_dir) if args.dense_reference else None
    data = compose(args, w, model_desc, run, dense)
    write_results(data, args.out, plot)
    print(
        f"{data['requests']} requests in {data['duration_s']:.0f} s: {data['errors']} errors, "
        f"{data['aborts']} aborts, {data['malformed_rejected_4xx']}/{data['malformed_total']} "
        f"malformed answered 4xx, free tokens {data['free_tokens_idle_before']} -> "
        f"{data['free_tokens_idle_after']}, probes identical before/after "
        f"{data['probe_identical_before_after']}, to dense {data['probe_identical_to_dense']}",
        flush=True,
    )
    if data["failed"]:
        print("FAILED: " + "; ".join(data["failures"]), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
