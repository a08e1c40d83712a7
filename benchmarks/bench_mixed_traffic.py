"""Mixed traffic as an operator sees it: a plain SGLang server vs an ``--enable-pariskv`` one.

    python benchmarks/bench_mixed_traffic.py --rates 0.5 1 2 --requests 60
    python benchmarks/bench_mixed_traffic.py --modes dense --runs-dir $OUT/runs
    python benchmarks/bench_mixed_traffic.py --modes pariskv --runs-dir $OUT/runs

One server at a time (dense, then ParisKV; same model, same flags otherwise: FlashInfer
attention, radix cache on, ``127.0.0.1`` only) receives open-loop Poisson arrivals at each
request rate: about 90% short chats (1-4K input tokens) and 10% long documents (64-128K),
each decoding exactly ``--output-len`` tokens (``ignore_eos``). The client streams every
request through SGLang's native ``/generate`` endpoint and times it itself: time to first
token, and time per output token after the first, per class and rate. Both servers get the
same request list (same seed); prompts are random token ids, so the radix cache holds no
shared prefix, and it is flushed between rates, where the same prompts come back faster.

``/generate`` rather than ``/v1/completions``: SGLang's OpenAI completion stream reads the
detokenized text of every chunk, which a server started with ``--skip-tokenizer-init`` (the
default model here: Llama-3.1-8B's shape with random weights, no tokenizer) does not have.

Writes ``benchmarks/results/mixed_traffic.json`` and a PNG beside it (TPOT p50 per class
and rate). Nothing is written unless the ParisKV server's stats files show sparse decode
steps and the dense server's show none. ``--runs-dir`` keeps each server's measurements, so
the two servers can run in two invocations (``--modes dense``, then ``--modes pariskv``),
and it keeps them rate by rate: a run cut short (a time limit) keeps the rates it finished,
and the same command again runs only the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_e2e as e2e  # noqa: E402
import bench_workflows as wf  # noqa: E402

from pariskv_tools.cli import HelpFormatter, add_results_args, redraw, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "mixed_traffic.json"
CLASSES = ("short", "long")
MODES = ("dense", "pariskv")
#: Prompt token ids are drawn from this range: inside any Llama-family vocabulary, so the
#: same request list serves the dummy model and a real ``--model-path``.
TOKEN_ID_RANGE = (1000, 32000)
#: A stream yields one chunk per decode step (``--stream-interval`` 1) plus a few more;
#: a stream that goes on far past its token count is cut off as an error.
MAX_CHUNKS_PER_TOKEN = 4
JOIN_GRACE_S = 5.0

DEFINITIONS = {
    "ttft_definition": "per request, on the client: from sending the streamed /generate "
    "request to the first chunk carrying an output token",
    "tpot_definition": "per request, on the client: (time of the last output token - time "
    "of the first) / (output tokens - 1)",
    "output_tok_s_definition": "output tokens of the class's finished requests / the rate's "
    "wall time (first request sent to last request finished)",
    "percentiles": "linear interpolation between order statistics (numpy's default)",
}


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Request:
    """One request of a rate's workload: its class, prompt length and send time."""

    index: int
    cls: str
    input_len: int
    arrival_s: float


def make_workload(
    n: int,
    rate: float,
    long_fraction: float,
    short_input: tuple[int, int],
    long_input: tuple[int, int],
    seed: int,
) -> list[Request]:
    """``n`` requests: ``round(n * long_fraction)`` long ones at random positions, input
    lengths uniform in their class's inclusive range, Poisson arrivals (exponential gaps
    of mean ``1 / rate``, the first request at 0).

    Classes and lengths depend on the seed alone, and the gaps are one draw of unit
    exponentials divided by the rate, so every rate replays the same requests, compressed
    in time."""
    if n < 1 or rate <= 0 or not 0 <= long_fraction <= 1:
        raise ValueError(
            f"need n >= 1, rate > 0, 0 <= long_fraction <= 1 (got {n}, {rate}, {long_fraction})"
        )
    for lo, hi in (short_input, long_input):
        if not 1 <= lo <= hi:
            raise ValueError(f"input range {lo}-{hi}: need 1 <= low <= high")
    rng = np.random.default_rng(seed)
    n_long = round(n * long_fraction)
    is_long = np.zeros(n, dtype=bool)
    is_long[rng.permutation(n)[:n_long]] = True
    short_len = rng.integers(short_input[0], short_input[1], size=n, endpoint=True)
    long_len = rng.integers(long_input[0], long_input[1], size=n, endpoint=True)
    gaps = rng.exponential(1.0, size=n) / rate
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    return [
        Request(
            index=i,
            cls="long" if is_long[i] else "short",
            input_len=int(long_len[i] if is_long[i] else short_len[i]),
            arrival_s=float(arrivals[i]),
        )
        for i in range(n)
    ]


def prompt_ids(seed: int, req: Request) -> list[int]:
    """The request's prompt: random token ids, a function of (seed, index) alone, so both
    servers see the same prompts and no two requests share a prefix."""
    rng = np.random.default_rng([seed, req.index])
    return rng.integers(*TOKEN_ID_RANGE, size=req.input_len).tolist()


# --------------------------------------------------------------------------- statistics


def percentile(xs: list[float], q: float) -> float | None:
    """The ``q``-th percentile by linear interpolation between order statistics (the
    definition of numpy's default); None for no values."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def tpot_s(rec: dict) -> float | None:
    """(last token time - first token time) / (tokens - 1); None below two tokens."""
    n = rec["tokens"]
    return (rec["last_s"] - rec["first_s"]) / (n - 1) if n > 1 else None


def class_stats(records: list[dict], cls: str, wall_s: float) -> dict:
    """TTFT and TPOT percentiles (ms), output tokens/s and errors of one class's requests."""
    mine = [r for r in records if r["cls"] == cls]
    ok = [r for r in mine if r["error"] is None]
    ttft = [1000 * (r["first_s"] - r["start_s"]) for r in ok]
    tpot = [1000 * t for t in (tpot_s(r) for r in ok) if t is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(mine),
        "input_tokens_mean": float(np.mean([r["input_len"] for r in mine])) if mine else None,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "tpot_p50_ms": percentile(tpot, 50),
        "tpot_p99_ms": percentile(tpot, 99),
        "output_tokens": tokens,
        "output_tok_s": tokens / wall_s if wall_s > 0 else None,
        "errors": len(mine) - len(ok),
    }


# --------------------------------------------------------------------------- client


def _check_local(url: str) -> None:
    host = urllib.parse.urlparse(url).hostname
    if host != "127.0.0.1":
        raise ValueError(f"{url}: this client only talks to 127.0.0.1")


def stream_one(
    url: str,
    req: Request,
    ids: list[int],
    output_len: int,
    timeout: float,
    t0: float | None = None,
    token_times: list[tuple[float, int]] | None = None,
) -> dict:
    """Send one streamed ``/generate`` request and time its tokens on this side.

    Times in the record (``start_s``: sent, ``first_s`` / ``last_s``: first and last output
    token) are seconds from ``t0`` (a ``time.perf_counter()`` value; default: the send).
    ``token_times``, when given, receives ``(seconds from t0, output tokens so far)`` for
    every chunk that brought new tokens.
    ``error`` is None, or why the request failed: an HTTP error, an error chunk, an
    aborted request, fewer or more tokens than ``output_len``, or no end within
    ``timeout`` seconds."""
    _check_local(url)
    body = json.dumps(
        {
            "input_ids": ids,
            "sampling_params": {
                "max_new_tokens": output_len,
                "ignore_eos": True,
                "temperature": 0.0,
            },
            "stream": True,
        }
    ).encode()
    rec = {
        "index": req.index,
        "cls": req.cls,
        "input_len": req.input_len,
        "tokens": 0,
        "start_s": None,
        "first_s": None,
        "last_s": None,
        "error": None,
    }
    http = urllib.request.Request(
        url + "/generate", data=body, headers={"Content-Type": "application/json"}
    )
    start = rec["start_s"] = time.perf_counter()
    try:
        with urllib.request.urlopen(http, timeout=timeout) as resp:
            done = False
            for _ in range(MAX_CHUNKS_PER_TOKEN * output_len + 16):
                if time.perf_counter() - start > timeout:
                    rec["error"] = f"no end after {timeout:.0f} s"
                    break
                line = resp.readline()
                now = time.perf_counter()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec["error"] = f"server error: {json.dumps(chunk['error'])[:300]}"
                    break
                meta = chunk.get("meta_info", {})
                finish = meta.get("finish_reason") or {}
                if finish.get("type") == "abort":
                    rec["error"] = f"aborted: {json.dumps(finish)[:300]}"
                    break
                n = int(meta.get("completion_tokens", 0))
                if n > rec["tokens"]:
                    if rec["first_s"] is None:
                        rec["first_s"] = now
                    rec["last_s"], rec["tokens"] = now, n
                    if token_times is not None:
                        token_times.append((now, n))
            if rec["error"] is None and not done:
                rec["error"] = "stream ended without [DONE]"
    except urllib.error.HTTPError as e:
        rec["error"] = f"HTTP {e.code}: {e.read()[:300]!r}"
    except (OSError, ValueError) as e:  # timeouts, refused connections, bad JSON
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    if rec["error"] is None and rec["tokens"] != output_len:
        rec["error"] = f"{rec['tokens']} output tokens, expected {output_len}"
    origin = start if t0 is None else t0
    for k in ("start_s", "first_s", "last_s"):
        if rec[k] is not None:
            rec[k] -= origin
    if token_times is not None:
        token_times[:] = [(t - origin, n) for t, n in token_times]
    return rec


def run_rate(
    url: str,
    requests: list[Request],
    output_len: int,
    seed: int,
    max_seconds: float,
    request_timeout: float,
) -> dict:
    """Send ``requests`` open loop at their arrival times (one thread each), stop sending
    after ``max_seconds`` or at the first failed request, wait for those sent, and raise
    if any failed. Returns the per-request records (times in seconds from the rate's
    start), how many were sent and the wall time."""
    _check_local(url)
    records: list[dict] = []
    lock = threading.Lock()
    failed = threading.Event()

    def worker(req: Request, ids: list[int]) -> None:
        rec = stream_one(url, req, ids, output_len, request_timeout, t0)
        with lock:
            records.append(rec)
        if rec["error"] is not None:
            failed.set()

    threads = []
    t0 = time.perf_counter()
    for req in requests:
        if req.arrival_s > max_seconds or failed.is_set():
            break
        ids = prompt_ids(seed, req)
        wait = t0 + req.arrival_s - time.perf_counter()
        if wait > 0 and failed.wait(wait):
            break
        th = threading.Thread(target=worker, args=(req, ids), daemon=True)
        th.start()
        threads.append(th)
    deadline = time.perf_counter() + request_timeout + JOIN_GRACE_S
    for th in threads:
        th.join(max(0.0, deadline - time.perf_counter()))
    wall = time.perf_counter() - t0
    with lock:
        got = sorted(records, key=lambda r: r["index"])
    errors = [
        f"request {r['index']} ({r['cls']}, {r['input_len']} tokens): {r['error']}"
        for r in got
        if r["error"] is not None
    ]
    missing = len(threads) - len(got)
    if missing:
        errors.append(f"{missing} requests still running {request_timeout:.0f} s after the last")
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests at {url}:\n" + "\n".join(errors))
    return {"records": got, "sent": len(threads), "wall_s": wall}


# --------------------------------------------------------------------------- summary


def summarize(runs: dict[str, dict], rates: list[float]) -> dict:
    """Per rate: per class, each server's statistics; and each server's total output
    tokens/s. ``runs[mode]["rates"][str(rate)]`` is :func:`run_rate`'s result."""
    out = {}
    for rate in rates:
        key = str(rate)
        per = {cls: {} for cls in CLASSES}
        per["total_output_tok_s"], per["sent"], per["wall_s"] = {}, {}, {}
        for mode in MODES:
            got = runs[mode]["rates"][key]
            for cls in CLASSES:
                per[cls][mode] = class_stats(got["records"], cls, got["wall_s"])
            tokens = sum(r["tokens"] for r in got["records"] if r["error"] is None)
            per["total_output_tok_s"][mode] = tokens / got["wall_s"] if got["wall_s"] else None
            per["sent"][mode], per["wall_s"][mode] = got["sent"], got["wall_s"]
        out[key] = per
    return out


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


# --------------------------------------------------------------------------- servers


def serve_model(
    model_path: str | None,
    context_length: int,
    config: dict | None = None,
    name: str = "Llama-3.1-8B shape",
) -> tuple[str, str, list[str]]:
    """(model path, description, server flags that depend on it): the user's model, or
    ``config`` (an HF config dict named ``name``; default Llama-3.1-8B's) with dummy
    weights, holding at least ``context_length`` positions."""
    if model_path:
        return model_path, model_path, []
    d = Path(tempfile.mkdtemp(prefix="dummy-model-"))
    cfg = dict(e2e.LLAMA_8B if config is None else config)
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], context_length)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d), f"{name}, dummy weights", ["--load-format", "dummy", "--skip-tokenizer-init"]


def server_for(
    name: str,
    args,
    model: str,
    model_flags: list[str],
    log_dir: Path,
    context_length: int,
    pariskv: dict | None,
) -> tuple[wf.Server, Path]:
    """A server (not started) on 127.0.0.1 with the flags of :func:`add_server_args`, and
    its stats folder; ``pariskv`` is the ParisKV config (None: plain SGLang)."""
    stats_dir = log_dir / f"{name}-stats"
    shutil.rmtree(stats_dir, ignore_errors=True)
    cfg = {
        "context_length": context_length,
        "server_args": model_flags + ["--mem-fraction-static", str(args.mem_fraction)],
        "pariskv": pariskv or {},
    }
    port = wf._free_port()
    cmd = wf._server_cmd(model, port, cfg, pariskv is not None, args.server_arg, str(stats_dir))
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_PARISKV_CONFIG"}
    return wf.Server(name, cmd, log_dir / f"{name}.log", env), stats_dir


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


def _context_length(args) -> int:
    return max(args.short_input[1], args.long_input[1]) + args.output_len + 64


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


def run_server(
    mode: str,
    args,
    model: str,
    model_flags: list[str],
    log_dir: Path,
    rates: list[float],
    on_rate: Callable[[dict], None] | None = None,
) -> dict:
    """Start one server, warm it up, run ``rates`` against it, stop it. ``on_rate`` gets
    the result so far (its stats read back from the stats files) after each rate, so a run
    cut short keeps the rates it finished."""
    if mode == "pariskv":
        wf._check_plugin_installed()
    pariskv = {} if mode == "pariskv" else None  # ParisKV's defaults
    srv, stats_dir = server_for(
        mode, args, model, model_flags, log_dir, _context_length(args), pariskv
    )
    wf._ACTIVE.append(srv)
    result = {"server_command": " ".join(srv.cmd), "rates": {}}
    try:
        srv.start(args.health_timeout)
        result["server_info"] = wf._server_info(srv.url)
        for cls in CLASSES:  # first-use costs (JIT, graphs, allocator) out of the timings
            lo = (args.short_input if cls == "short" else args.long_input)[0]
            warm = Request(index=CLASSES.index(cls), cls=cls, input_len=lo, arrival_s=0.0)
            rec = stream_one(
                srv.url, warm, prompt_ids(args.seed + 1, warm), 8, args.request_timeout
            )
            if rec["error"]:
                raise RuntimeError(f"[{mode}] warm-up {cls} request failed: {rec['error']}")
        srv.flush_cache()
        for rate in rates:
            reqs = make_workload(
                args.requests,
                rate,
                args.long_fraction,
                args.short_input,
                args.long_input,
                args.seed,
            )
            got = run_rate(
                srv.url, reqs, args.output_len, args.seed, args.max_seconds, args.request_timeout
            )
            result["rates"][str(rate)] = got
            print(
                f"[{mode}] {rate} req/s: {got['sent']} requests in {got['wall_s']:.0f} s",
                flush=True,
            )
            srv.flush_cache()  # the next rate sends the same prompts
            if on_rate is not None:
                on_rate(result | {"stats": wf._read_stats(stats_dir)})
    except Exception:
        print(f"--- last lines of {srv.log_path} ---\n{srv.log_tail()}", flush=True)
        raise
    finally:
        srv.stop()
        wf._ACTIVE.remove(srv)
    result["stats"] = wf._read_stats(stats_dir)
    return result


def compose(runs: dict[str, dict], key: dict, args) -> dict:
    """The results file's content from both servers' measurements."""
    from sglang_pariskv.config import ParisKVConfig

    sent_long = sum(
        r["cls"] == "long" for got in runs["pariskv"]["rates"].values() for r in got["records"]
    )
    stats = {m: runs[m]["stats"] for m in MODES}
    check_pariskv_ran(stats, sent_long)
    return {
        **e2e._device_info(),
        "command": " ".join([sys.executable, *sys.argv]),
        "model": key["model"],
        "workload": {k: v for k, v in key.items() if k not in ("model", "rates")},
        "endpoint": "/generate, streamed, input_ids prompts",
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
            "stats": e2e.add_counters(done["stats"], part["stats"])}  # fmt: skip


# --------------------------------------------------------------------------- main


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
    e2e.add_split_run_args(ap)
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
    signal.signal(signal.SIGTERM, wf._on_signal)
    signal.signal(signal.SIGINT, wf._on_signal)
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

        got = e2e.resume_run(
            saved, key, mode in args.modes, missing, measure, merge_runs, "workload"
        )
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
