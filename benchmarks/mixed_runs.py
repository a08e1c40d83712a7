"""One server's part of the mixed-traffic comparison: start it, warm it up, and send each
rate's requests open loop at their arrival times, every stream timed on the client.

Open loop means a request leaves at its arrival time whether or not earlier ones finished,
as users' requests do, so a slow server builds a queue instead of slowing the arrivals. The
first failed request stops the rate and fails the run: numbers from a server that failed
some requests compare nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from engine_runs import _read_stats
from mixed_workload import CLASSES, Request, make_workload, prompt_ids
from openai_stream import stream_completion
from server_client import _check_local
from server_process import _check_plugin_installed, _server_info, server_for, tracked

JOIN_GRACE_S = 5.0


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
        rec = {"index": req.index, "cls": req.cls, "input_len": req.input_len}
        rec |= stream_completion(url, ids, output_len, request_timeout, t0)
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


def _context_length(args) -> int:
    return max(args.short_input[1], args.long_input[1]) + args.output_len + 64


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
        _check_plugin_installed()
    pariskv = {} if mode == "pariskv" else None  # ParisKV's defaults
    srv, stats_dir = server_for(
        mode, args, model, model_flags, log_dir, _context_length(args), pariskv
    )
    result = {"server_command": " ".join(srv.cmd), "rates": {}}
    with tracked(srv):
        srv.start(args.health_timeout)
        result["server_info"] = _server_info(srv.url)
        for cls in CLASSES:  # first-use costs (JIT, graphs, allocator) out of the timings
            lo = (args.short_input if cls == "short" else args.long_input)[0]
            warm = Request(index=CLASSES.index(cls), cls=cls, input_len=lo, arrival_s=0.0)
            rec = stream_completion(
                srv.url, prompt_ids(args.seed + 1, warm), 8, args.request_timeout
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
                on_rate(result | {"stats": _read_stats(stats_dir)})
    result["stats"] = _read_stats(stats_dir)
    return result
