"""One request of a million tokens, served with host offload: its first-token and per-token times.

Served by ``launch_server --enable-pariskv --pariskv-offload host``:

    python benchmarks/bench_million_tokens.py                      # 1,000,000 input tokens
    python benchmarks/bench_million_tokens.py --input-len 262144   # the same path, shorter

The model is a Qwen2.5-7B-Instruct-1M shape (28 layers, 28 q / 4 KV heads, head_dim 128)
with random weights (``--load-format dummy``); ``--model-path`` serves a real checkpoint
instead. One server, on 127.0.0.1 only, keeps the K/V of every token in pinned host memory
(``--pariskv-host-pool-gb`` sized for the request unless given) and ParisKV's codes and hot
cache on the GPU. After a warm-up request above the dense threshold (first-use costs out of
the timings) and a cache flush, one request of ``--input-len`` random token ids decodes
``--output-len`` tokens, streamed through ``/v1/completions`` (the prompt as token ids) and
timed on this side: the time to first token (the whole chunked prefill) and the arrival of
every later token.

Beside the measurements, what limits each (``limits`` in the JSON; estimates from the
model's shape):

* prefill: its FLOPs (linear layers, causal attention) and the rate they ran at; and the K/V
  bytes its attention reads from host memory: each chunk of ``chunked_prefill_size`` tokens
  attends to every earlier token in every layer, whose K/V lives in the host pool, so that
  much crosses PCIe (once per layer and chunk where the prefix is staged on the GPU,
  ``offload.prefill_staging``; the server's ``prefill_staged_*`` / ``prefill_direct_extends``
  counters, in ``pariskv_stats``, say which). Its time at the UVA gather bandwidth that
  ``bench_offload.py`` measured is given beside it.
* decode: the kernel-level step of ``bench_offload.py`` at the nearest context, batch 1 (same
  model shape; retrieval, hot-cache fetch and attention in CUDA graphs, no scheduler), read
  from ``offload.json``.

And measured, ``prefill_progress``: when each chunk of the prompt was scheduled, read from
the server log (``prefill_log``); a chunk's time growing with the prefix it attends to
shows attention setting the prefill's pace.

Writes ``benchmarks/results/million_tokens.json`` and a PNG beside it. Nothing is written
unless the server's ParisKV counters show sparse decode steps. The prefill of a million
tokens can outlast a device call: start the script in its own process session on the GPU
host (``benchmarks/device/README.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mixed_traffic import add_server_args  # noqa: E402
from bench_offload import RESULTS as OFFLOAD_RESULTS  # noqa: E402
from engine_runs import _device_info, _read_stats  # noqa: E402
from mixed_workload import Request, prompt_ids  # noqa: E402
from offload_cases import SHAPE  # noqa: E402
from openai_stream import stream_completion  # noqa: E402
from prefill_log import read_chunk_progress  # noqa: E402
from server_process import (  # noqa: E402
    _check_plugin_installed,
    _on_signal,
    _server_info,
    serve_model,
    server_for,
    tracked,
)
from step_floor import head_dim, kv_bytes_per_token, layer_weights  # noqa: E402
from traffic_stats import tpot_s  # noqa: E402

from pariskv_tools.cli import HelpFormatter, add_results_args, redraw, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "million_tokens.json"
#: Slack of the host pool over the request's own tokens, in tokens.
POOL_SLACK_TOKENS = 8192


def model_config(context_length: int) -> dict:
    """A Qwen2.5-7B-Instruct-1M-shaped Qwen2 config (no dual-chunk attention) holding
    ``context_length`` positions."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": SHAPE["hidden_size"],
        "intermediate_size": SHAPE["intermediate_size"],
        "num_hidden_layers": SHAPE["num_hidden_layers"],
        "num_attention_heads": SHAPE["num_attention_heads"],
        "num_key_value_heads": SHAPE["num_key_value_heads"],
        "vocab_size": SHAPE["vocab_size"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000000.0,
        "max_position_embeddings": context_length,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }


def model_config_of(model_dir: str) -> dict | None:
    """The (text) config of a model directory's config.json, an HF-style dict; None
    without one (e.g. a GGUF file: the estimates are then left out)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    return cfg.get("text_config", cfg)


def host_pool_gb(cfg: dict, tokens: int) -> float:
    """GiB of host pool that holds ``tokens`` tokens of K/V plus :data:`POOL_SLACK_TOKENS`,
    rounded up to half a GiB (the pool holds ``int(GiB * 2**30) // bytes per token``)."""
    need = (tokens + POOL_SLACK_TOKENS) * kv_bytes_per_token(cfg) / 2**30
    return math.ceil(need * 2) / 2


def prefill_estimates(cfg: dict, n: int, chunk: int) -> dict:
    """FLOPs of a prefill of ``n`` tokens in chunks of ``chunk``, and the K/V bytes its
    attention reads from earlier chunks (each at least once per chunk and layer).

    Linear: 2 FLOPs per weight and token (Q, K, V, O projections and the gated MLP; the LM
    head runs on the last token only). Attention: token i attends to i + 1 tokens, 2 ·
    head_dim FLOPs each for q·k and for the weighted sum of V, in every query head."""
    layers, hq = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    chunks = math.ceil(n / chunk)
    prefix_tokens = chunk * chunks * (chunks - 1) // 2  # chunk j starts after j * chunk
    return {
        "chunks": chunks,
        "linear_flops": 2 * n * layers * layer_weights(cfg),
        "attention_flops": 2 * layers * hq * head_dim(cfg) * n * (n + 1),
        "prefix_kv_bytes_read": prefix_tokens * kv_bytes_per_token(cfg),
    }


def kernel_reference(n: int, path: Path = OFFLOAD_RESULTS) -> dict | None:
    """``bench_offload.py``'s batch-1 case nearest to ``n`` tokens, with its device and
    commit and the UVA gather bandwidth of that run (None if there is no such file)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    cases = [c for c in data["cases"] if c["batch"] == 1]
    if not cases:
        return None
    c = min(cases, key=lambda c: abs(c["context"] - n))
    keys = ("context", "pariskv_ms_per_token", "weights_ms", "retrieval_ms", "fetch_ms",
            "attention_ms", "hot_cache_hit_rate", "dense_ms_per_token")  # fmt: skip
    return {k: c.get(k) for k in keys} | {
        "device": data.get("device"),
        "git_commit": data.get("git_commit"),
        "uva_gather_gbs": data.get("uva_gather_gbs_256B_rows"),
        "source": f"benchmarks/results/{path.name}",
    }


def token_intervals_ms(times: list) -> list[tuple[float, int]]:
    """(ms per token, output tokens so far) of each chunk after the first, from the
    stream's ``(seconds, output tokens so far)`` arrivals."""
    return [((t1 - t0) / (k1 - k0) * 1000, k1) for (t0, k0), (t1, k1) in zip(times, times[1:])]


def measure(url: str, n: int, output_len: int, seed: int, timeout: float) -> dict:
    """Stream one request of ``n`` random token ids; its time to first token and the
    time per output token after it (mean and p50 over the chunks that brought tokens)."""
    req = Request(index=0, cls="long", input_len=n, arrival_s=0.0)
    times: list[tuple[float, int]] = []
    rec = stream_completion(url, prompt_ids(seed, req), output_len, timeout, token_times=times)
    if rec["error"] is not None:
        raise RuntimeError(f"the {n}-token request failed: {rec['error']}")
    per_token = [ms for ms, _ in token_intervals_ms(times)]
    return {
        "ttft_s": rec["first_s"] - rec["start_s"],
        "tpot_ms": tpot_s(rec) * 1000,
        "tpot_p50_ms": statistics.median(per_token) if per_token else None,
        "output_tokens": rec["tokens"],
        "token_times_s": [[round(t, 6), k] for t, k in times],
    }


def limits(got: dict, est: dict | None, ref: dict | None) -> dict:
    """What the measured times are made of, as far as estimates tell (see the module
    docstring); every field is None where its inputs are missing."""
    out: dict = {"prefill": None, "decode": None}
    if est is not None:
        flops = est["linear_flops"] + est["attention_flops"]
        uva = ref.get("uva_gather_gbs") if ref else None
        out["prefill"] = est | {
            "attention_flop_fraction": est["attention_flops"] / flops,
            "achieved_tflops": flops / got["ttft_s"] / 1e12,
            "prefix_read_s_at_uva_gather_bandwidth": (
                est["prefix_kv_bytes_read"] / (uva * 1e9) if uva else None
            ),
        }
    if ref is not None:
        out["decode"] = {
            "kernel_level_ms_per_token": ref["pariskv_ms_per_token"],
            "kernel_level_context": ref["context"],
            "tpot_over_kernel_level": got["tpot_ms"] / ref["pariskv_ms_per_token"],
        }
    return out


def check_pariskv_ran(stats: dict) -> None:
    """Refuse (raise) unless the server's ParisKV counters show sparse decode steps."""
    if not stats.get("sparse_request_steps"):
        raise RuntimeError(
            "refusing to write results: the server's ParisKV stats files show no sparse "
            f"decode steps ({stats}): the request was not served by ParisKV"
        )


def run(args) -> dict:
    """Start the server, warm it up, time the request, stop it; the results' content."""
    _check_plugin_installed()
    context = args.input_len + args.output_len + 64
    model, desc, flags = serve_model(args.model_path, context, model_config(context), SHAPE["name"])
    cfg = model_config_of(model)
    pool_gb = args.host_pool_gb
    if pool_gb is None:
        if cfg is None:
            raise SystemExit(f"{model}: no config.json to size the host pool; give --host-pool-gb")
        pool_gb = host_pool_gb(cfg, max(context, args.warm_up_len + 64))
    pariskv = {"offload": "host", "host_pool_gb": pool_gb}
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-million-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"logs in {log_dir}", flush=True)
    srv, stats_dir = server_for("pariskv", args, model, flags, log_dir, context, pariskv)
    with tracked(srv):
        srv.start(args.health_timeout)
        info = _server_info(srv.url)
        warm = Request(index=1, cls="long", input_len=args.warm_up_len, arrival_s=0.0)
        rec = stream_completion(srv.url, prompt_ids(args.seed + 1, warm), 8, 600.0)
        if rec["error"]:
            raise RuntimeError(f"warm-up request failed: {rec['error']}")
        srv.flush_cache()
        print(f"prefill of {args.input_len} tokens started", flush=True)
        got = measure(srv.url, args.input_len, args.output_len, args.seed, args.request_timeout)
        print(f"TTFT {got['ttft_s']:.1f} s, TPOT {got['tpot_ms']} ms", flush=True)
    progress = read_chunk_progress(srv.log_path, args.input_len)
    stats = _read_stats(stats_dir)
    check_pariskv_ran(stats)
    chunk = info.get("chunked_prefill_size")
    est = prefill_estimates(cfg, args.input_len, chunk) if cfg and chunk else None
    ref = kernel_reference(args.input_len)
    return {
        **_device_info(),
        "command": " ".join([sys.executable, *sys.argv]),
        "server_command": " ".join(srv.cmd),
        "server_info": info,
        "model": desc,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "host_pool_gb": pool_gb,
        **got,
        "prefill_progress": progress,
        "pariskv_stats": stats,
        "kernel_reference": ref,
        "limits": limits(got, est, ref),
    }


def plot(data: dict, out: Path) -> None:
    """Left: the time of each output token after the first, with the kernel-level step.
    Middle: the time to first token beside the prefix-read estimate. Right (where the
    server log had it): the seconds the prefill took to reach each chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    progress = data.get("prefill_progress")
    fig, axes = plt.subplots(1, 3 if progress else 2, figsize=(16 if progress else 11, 3.8))
    a, b = axes[:2]
    times = data["token_times_s"]
    steps = token_intervals_ms(times)
    a.plot([k for _, k in steps], [ms for ms, _ in steps], ".-", label="served (this run)")
    ref = data.get("kernel_reference")
    if ref:
        label = f"kernel level, {ref['context'] // 1024}K x 1 ({ref['device']})"
        a.axhline(ref["pariskv_ms_per_token"], color="C1", ls="--", label=label)
    a.set_xlabel("output token")
    a.set_ylabel("ms per token")
    a.set_ylim(bottom=0)
    a.legend(fontsize=8)
    a.set_title(f"decode: TPOT {data['tpot_ms']:.2f} ms", fontsize=9)
    pre = (data.get("limits") or {}).get("prefill") or {}
    bars = {"time to first token": data["ttft_s"]}
    if pre.get("prefix_read_s_at_uva_gather_bandwidth"):
        bars["prefix K/V read once per\nchunk at UVA bandwidth"] = pre[
            "prefix_read_s_at_uva_gather_bandwidth"
        ]
    b.bar(list(bars), list(bars.values()), color=["C0", "C2"][: len(bars)])
    b.set_ylabel("seconds")
    rate = f", {pre['achieved_tflops']:.0f} TFLOP/s" if pre.get("achieved_tflops") else ""
    b.set_title(f"prefill of {data['input_len']:,} tokens{rate}", fontsize=9)
    if progress:
        c = axes[2]
        c.plot(progress["prefix_tokens"], progress["seconds"], ".-", ms=3)
        c.set_xlabel("prompt tokens before the chunk")
        c.set_ylabel("seconds since the first chunk (server log)")
        c.set_title(f"chunks of {progress['chunk_tokens'][0]:,} tokens", fontsize=9)
    fig.suptitle(f"{data.get('device', '')}: {data['model']}, --pariskv-offload host", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument("--input-len", type=int, default=1_000_000, help="input tokens")
    ap.add_argument("--output-len", type=int, default=64, help="output tokens")
    ap.add_argument("--seed", type=int, default=0, help="prompt seed")
    ap.add_argument(
        "--warm-up-len",
        type=int,
        default=16384,
        help="input tokens of the warm-up request (above the dense threshold)",
    )
    ap.add_argument(
        "--host-pool-gb",
        type=float,
        help="--pariskv-host-pool-gb of the server (default: what the request needs, from "
        "the model's config.json)",
    )
    ap.add_argument(
        "--request-timeout", type=float, default=7200.0, help="seconds the request may take"
    )
    add_server_args(ap, default_model=f"a {SHAPE['name']} config")
    add_results_args(ap, RESULTS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:
        redraw(args.plot, plot)
        return 0
    if args.input_len < 1 or args.output_len < 2 or args.warm_up_len < 1:
        raise SystemExit("--input-len and --warm-up-len must be >= 1, --output-len >= 2")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    data = run(args)
    write_results(data, args.out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
