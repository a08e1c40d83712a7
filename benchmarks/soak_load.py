"""The soak's load: closed-loop client threads running their scenarios against the server,
their outcomes tallied, and a sampler of throughput, KV use and GPU memory over time.

Closed loop: each client sends its next scenario when its last one ended, so the server
holds about ``--clients`` requests all along. Every well-formed request must complete
exactly as asked and every malformed one must get a 4xx; the tally keeps samples of what
went wrong.
"""

from __future__ import annotations

import copy
import itertools
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
from mixed_workload import TOKEN_ID_RANGE
from openai_stream import stream_completion
from server_client import (
    RequestFailed,
    _check_local,
    abort_stream,
    generate,
    post,
    used_tokens,
)
from soak_scenarios import (
    CHAT_DOC_INDEX,
    CHAT_TURNS,
    CHAT_USER,
    KINDS,
    MALFORMED,
    Scenario,
    Workload,
    _draw,
    ids_for,
    malformed_body,
    scenarios,
)
from traffic_stats import tpot_s

MALFORMED_TIMEOUT_S = 60.0
MAX_ERROR_SAMPLES = 50
JOIN_GRACE_S = 10.0


def send_malformed(url: str, variant: str, context_length: int, timeout: float) -> int | str:
    """The HTTP status a malformed request got, or why it got none."""
    try:
        status, _ = post(url, MALFORMED[variant], malformed_body(variant, context_length), timeout)
        return status
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"[:300]


@dataclass
class Tally:
    """What the clients did, shared by their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    requests: int = 0
    by_kind: dict = field(default_factory=lambda: {k: {"sent": 0, "errors": 0} for k in KINDS})
    errors: int = 0
    error_samples: list = field(default_factory=list)
    aborts: int = 0
    aborts_finished_first: int = 0
    malformed_total: int = 0
    malformed_rejected_4xx: int = 0
    malformed_by_variant: dict = field(default_factory=dict)
    malformed_failures: list = field(default_factory=list)
    output_tokens: int = 0
    #: finished requests whose decode ran above / at or below the dense threshold
    sparse_expected: int = 0
    dense_expected: int = 0
    #: (kind, monotonic end time, seconds, seconds per output token after the first or
    #: None) of every well-formed request that succeeded
    latency: list = field(default_factory=list)

    def request(
        self,
        kind: str,
        error: str | None = None,
        tokens: int = 0,
        context: int = 0,
        threshold: int = 0,
        seconds: float | None = None,
        tpot: float | None = None,
    ) -> None:
        """One well-formed request's outcome (``context``: its input length; ``seconds``:
        how long it took; ``tpot``: a stream's seconds per output token after the first)."""
        end = time.monotonic()
        with self.lock:
            self.requests += 1
            self.by_kind[kind]["sent"] += 1
            self.output_tokens += tokens
            if error is not None:
                self.errors += 1
                self.by_kind[kind]["errors"] += 1
                if len(self.error_samples) < MAX_ERROR_SAMPLES:
                    self.error_samples.append(f"{kind}: {error}")
            else:
                if seconds is not None:
                    self.latency.append((kind, end, seconds, tpot))
                if tokens >= 2:  # a decode step ran
                    if context > threshold:
                        self.sparse_expected += 1
                    else:
                        self.dense_expected += 1

    def aborted(self, finished_first: bool, tokens: int) -> None:
        with self.lock:
            self.requests += 1
            self.by_kind["abort"]["sent"] += 1
            self.output_tokens += tokens
            if finished_first:
                self.aborts_finished_first += 1
            else:
                self.aborts += 1

    def malformed(self, variant: str, status: int | str) -> None:
        with self.lock:
            self.requests += 1
            self.by_kind["malformed"]["sent"] += 1
            self.malformed_total += 1
            row = self.malformed_by_variant.setdefault(variant, {"sent": 0, "rejected_4xx": 0})
            row["sent"] += 1
            if isinstance(status, int) and 400 <= status < 500:
                self.malformed_rejected_4xx += 1
                row["rejected_4xx"] += 1
            elif len(self.malformed_failures) < MAX_ERROR_SAMPLES:
                self.malformed_failures.append(f"{variant}: {status}")

    def progress(self, seen: int) -> tuple[int, int, int, list]:
        """What the sampler reads each interval: output tokens, requests and errors so far,
        and the latency records after the first ``seen``. Not a :meth:`snapshot`, which
        copies every record kept so far while the clients wait on the lock."""
        with self.lock:
            return self.output_tokens, self.requests, self.errors, self.latency[seen:]

    def snapshot(self) -> dict:
        with self.lock:
            return {
                f.name: copy.deepcopy(getattr(self, f.name))
                for f in fields(self)
                if f.name != "lock"
            }


def run_scenario(url: str, sc: Scenario, w: Workload, timeout: float, tally: Tally) -> None:
    """Send one scenario's request(s) and record the outcome(s)."""
    thr = w.dense_threshold
    if sc.kind == "malformed":
        tally.malformed(
            sc.variant,
            send_malformed(url, sc.variant, w.context_length, min(timeout, MALFORMED_TIMEOUT_S)),
        )
        return
    if sc.kind == "chat":
        history = ids_for(w.seed, CHAT_DOC_INDEX, sc.input_len)  # shared by every chat
        rng = np.random.default_rng([w.seed, sc.index])
        for _ in range(sc.turns):
            history = history + rng.integers(*TOKEN_ID_RANGE, _draw(rng, CHAT_USER)).tolist()
            t = time.monotonic()
            try:
                out = generate(url, history, sc.output_len, timeout)
            except RequestFailed as e:
                tally.request("chat", str(e))
                return
            tally.request("chat", None, len(out), len(history), thr, time.monotonic() - t)
            history = history + out
        return
    ids = ids_for(w.seed, sc.index, sc.input_len)
    if sc.kind == "abort":
        try:
            cut, tokens = abort_stream(url, ids, sc.output_len, sc.cut_after, timeout)
        except RequestFailed as e:
            tally.request("abort", str(e))
            return
        tally.aborted(not cut, tokens)
        return
    t = time.monotonic()
    if sc.kind in ("long", "stream"):
        rec = stream_completion(url, ids, sc.output_len, timeout)  # the OpenAI API
        seconds, n = time.monotonic() - t, rec["tokens"]
        tpot = tpot_s(rec)
        tally.request(sc.kind, rec["error"], n, sc.input_len, thr, seconds, tpot)
        return
    try:
        out = generate(url, ids, sc.output_len, timeout)
    except RequestFailed as e:
        tally.request(sc.kind, str(e))
        return
    tally.request(sc.kind, None, len(out), sc.input_len, thr, time.monotonic() - t)


def latency_summary(records: list, t0: float, wall: float) -> dict:
    """Per kind, over the well-formed requests that succeeded: how many, their seconds at
    p50 and p99, the p50 of those that ended in the first and in the last quarter of the
    load (a server that slows as it runs shows there), and streams' seconds per output
    token at p50 and p99."""
    out = {}
    for kind in sorted({r[0] for r in records}):
        rows = [r for r in records if r[0] == kind]
        secs = np.array([r[2] for r in rows])
        ends = np.array([r[1] - t0 for r in rows])
        first, last = secs[ends <= wall / 4], secs[ends > wall * 3 / 4]
        tpots = np.array([r[3] for r in rows if r[3] is not None])
        out[kind] = {
            "requests": len(rows),
            "p50_s": float(np.percentile(secs, 50)),
            "p99_s": float(np.percentile(secs, 99)),
            "first_quarter_p50_s": float(np.percentile(first, 50)) if first.size else None,
            "last_quarter_p50_s": float(np.percentile(last, 50)) if last.size else None,
        }
        if tpots.size:
            out[kind]["tpot_p50_s"] = float(np.percentile(tpots, 50))
            out[kind]["tpot_p99_s"] = float(np.percentile(tpots, 99))
    return out


def gpu_memory_mib() -> list[int] | None:
    """Used memory per GPU from ``nvidia-smi``, or None where it is missing or fails."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return [int(float(x)) for x in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def drive(
    url: str,
    w: Workload,
    clients: int,
    duration: float,
    request_timeout: float,
    max_per_client: int,
    sample_interval: float,
    alive: Callable[[], bool],
) -> dict:
    """``clients`` threads run their scenarios until ``duration`` seconds passed (at most
    ``max_per_client`` each; a started scenario finishes within its timeouts), while a
    sampler records throughput, GPU memory and KV usage. Stops early when ``alive()``
    turns False (a crashed server)."""
    _check_local(url)
    tally, stop, done = Tally(), threading.Event(), threading.Event()
    series: list[dict] = []
    crashed = threading.Event()
    t0 = time.monotonic()
    deadline = t0 + duration

    def client(c: int) -> None:
        for sc in itertools.islice(scenarios(w, c), max_per_client):
            if stop.is_set() or time.monotonic() >= deadline:
                return
            run_scenario(url, sc, w, request_timeout, tally)

    def sampler() -> None:
        last_t, last_tok, seen = t0, 0, 0
        while not done.wait(sample_interval):
            now = time.monotonic()
            tokens, requests, errors, new = tally.progress(seen)
            try:
                used = used_tokens(url)
            except (OSError, ValueError, KeyError):
                used = None
            # the short chats that finished since the last sample: the most frequent kind,
            # so their median shows the server's latency over time
            short = [r[2] for r in new if r[0] == "short"]
            series.append(
                {
                    "t_s": round(now - t0, 3),
                    "output_tok_s": (tokens - last_tok) / max(now - last_t, 1e-9),
                    "requests": requests,
                    "errors": errors,
                    "short_p50_s": float(np.median(short)) if short else None,
                    "kv_used_tokens": used,
                    "gpu_memory_mib": gpu_memory_mib(),
                }
            )
            last_t, last_tok, seen = now, tokens, seen + len(new)
            if not alive():
                crashed.set()
                stop.set()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    smp = threading.Thread(target=sampler, daemon=True)
    smp.start()
    for th in threads:
        th.start()
    join_by = deadline + request_timeout * (CHAT_TURNS[1] + 1) + JOIN_GRACE_S
    for th in threads:
        th.join(max(0.0, join_by - time.monotonic()))
    wall = time.monotonic() - t0
    done.set()
    smp.join(sample_interval + 30)
    if not alive():
        crashed.set()
    out = tally.snapshot()
    out["latency"] = latency_summary(out["latency"], t0, wall)
    out["hung_clients"] = sum(th.is_alive() for th in threads)
    out.update(wall_s=wall, series=series, crashed=crashed.is_set())
    return out
