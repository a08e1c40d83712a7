"""The soak's servers: the ParisKV server's whole run (idle state and greedy probes, the KV
pool filled, the load, idle state and probes again) and the same probes on a plain server.

The idle state is read after ``/flush_cache``, so the free KV tokens before and after the
load compare like with like: a difference is memory the load leaked. Probes stay below the
dense threshold, where ParisKV's greedy tokens after the load are compared with its own
before it and with plain SGLang's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from engine_runs import _read_stats
from pool_fill import check_fillable, fill_pool
from server_client import RequestFailed, free_tokens, generate, wait_idle
from server_process import _ACTIVE, _server_info, server_for
from soak_checks import parse_memory_log, server_error
from soak_load import drive
from soak_scenarios import PROBE_INDEX, Workload, ids_for


def probe_set(w: Workload, n: int, output_len: int) -> list[list[int]]:
    """``n`` prompts whose input + output stay at or below the dense threshold, lengths
    spread evenly from 16 tokens to the most that fits."""
    hi = w.dense_threshold - output_len
    if n < 1 or hi < 16:
        raise ValueError(f"{n} probes of {output_len} output tokens below {w.dense_threshold}")
    lens = np.linspace(16, hi, n).round().astype(int)
    return [ids_for(w.seed, PROBE_INDEX + i, int(k)) for i, k in enumerate(lens)]


def run_probes(url: str, probes: list[list[int]], output_len: int, timeout: float) -> list:
    """Each probe's greedy output ids, one request at a time; a failed probe's error text."""
    out = []
    for ids in probes:
        try:
            out.append(generate(url, ids, output_len, timeout, ignore_eos=False))
        except RequestFailed as e:
            out.append(f"error: {e}")
    return out


def _idle_state(srv, args) -> dict:
    """Wait (bounded) for idle, flush the radix cache, read the free KV tokens."""
    idle = wait_idle(srv.url, args.idle_timeout)
    try:
        srv.flush_cache()
    except (OSError, ValueError) as e:
        print(f"[{srv.name}] /flush_cache failed: {e!r}", flush=True)
    try:
        free = free_tokens(srv.url)
    except (OSError, ValueError, KeyError) as e:
        print(f"[{srv.name}] /v1/loads failed: {e!r}", flush=True)
        free = None
    return {"idle": idle, "free_tokens": free}


def _start(name: str, args, model: str, flags: list[str], log_dir: Path, pariskv: bool):
    """A started server (registered for the signal handler)."""
    # every long document retrieves, however few tokens its step holds
    cfg = {"dense_threshold": args.pariskv_dense_threshold, "min_sparse_tokens": 0}
    cfg = cfg if pariskv else None
    srv, _ = server_for(name, args, model, flags, log_dir, args.context_length, cfg)
    _ACTIVE.append(srv)
    try:
        srv.start(args.health_timeout)
    except Exception:
        _ACTIVE.remove(srv)
        raise
    return srv


def _stop(srv) -> None:
    srv.stop()
    if srv in _ACTIVE:
        _ACTIVE.remove(srv)


def _scrape(url: str) -> dict | None:
    from pariskv_tools.workloads import prom

    try:
        return prom.scrape(url)
    except (OSError, ValueError):
        return None


def _or_exit(check, *args):
    """``check(*args)``, whose ValueError (a setup the soak cannot test) ends the run with
    its message."""
    try:
        return check(*args)
    except ValueError as e:
        raise SystemExit(f"bench_soak: {e}") from None


def soak(args, w: Workload, model: str, flags: list[str], log_dir: Path) -> dict:
    """The soaked server's run (``args.engine``: ParisKV's, or plain SGLang's as a
    control): idle state and probes, load, idle state and probes; ``workload`` is ``w``
    with the request limits the running server reported."""
    probes = probe_set(w, args.probes, args.probe_output_len)
    srv = _start(args.engine, args, model, flags, log_dir, pariskv=args.engine == "pariskv")
    out: dict = {
        "server_command": " ".join(srv.cmd),
        "pool_fill": None,
        "free_tokens_idle_after": None,
        "idle_after": False,
        "probes_after": None,
        "counters_after": None,
    }
    try:
        out["server_info"] = info = _server_info(srv.url)
        if "error" not in info:
            w = _or_exit(w.served_by, info)  # the running server's request limits
        before = _idle_state(srv, args)
        out["free_tokens_idle_before"] = before["free_tokens"]
        if before["free_tokens"]:
            _or_exit(check_fillable, before["free_tokens"], w.max_total,
                     info.get("max_running_requests"))  # fmt: skip
        out["probes_before"] = run_probes(
            srv.url, probes, args.probe_output_len, args.request_timeout
        )
        if before["free_tokens"]:
            print(f"[soak] filling {before['free_tokens']} free KV tokens", flush=True)
            out["pool_fill"] = fill_pool(
                srv.url,
                before["free_tokens"],
                w.max_total,
                info.get("max_running_requests"),
                args.request_timeout,
                seed=args.seed,
            )
            _idle_state(srv, args)
        out["counters_before"] = _scrape(srv.url)
        print(f"[soak] {args.clients} clients for {args.duration:.0f} s", flush=True)
        out["load"] = drive(
            srv.url,
            w,
            args.clients,
            args.duration,
            args.request_timeout,
            args.max_requests_per_client,
            args.sample_interval,
            lambda: srv.proc is None or srv.proc.poll() is None,
        )
        if not out["load"]["crashed"]:
            after = _idle_state(srv, args)
            out["idle_after"] = after["idle"]
            out["free_tokens_idle_after"] = after["free_tokens"]
            out["probes_after"] = run_probes(
                srv.url, probes, args.probe_output_len, args.request_timeout
            )
            out["counters_after"] = _scrape(srv.url)
    except Exception:
        print(f"--- last lines of {srv.log_path} ---\n{srv.log_tail()}", flush=True)
        raise
    finally:
        _stop(srv)
    log = srv.log_path.read_text(errors="replace")
    out["memory_log"] = parse_memory_log(log)
    out["server_error"] = server_error(log)
    out["stats"] = _read_stats(log_dir / "pariskv-stats")
    out["probe_input_lens"] = [len(p) for p in probes]
    out["workload"] = w  # with the limits the server reported
    return out


def dense_probes(args, w: Workload, model: str, flags: list[str], log_dir: Path) -> dict:
    """The same probes on a plain SGLang server (same flags without --enable-pariskv)."""
    probes = probe_set(w, args.probes, args.probe_output_len)
    srv = _start("dense", args, model, flags, log_dir, pariskv=False)
    try:
        _idle_state(srv, args)
        got = run_probes(srv.url, probes, args.probe_output_len, args.request_timeout)
    finally:
        _stop(srv)
    return {"server_command": " ".join(srv.cmd), "probes": got}
