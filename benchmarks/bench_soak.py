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
1, requests filling the context exactly (input + output = context length), and malformed or
oversized requests, each of which must get an HTTP 4xx. Well-formed requests decode exactly
their ``max_new_tokens`` (``ignore_eos``) through SGLang's native ``/generate`` (the default
model has no tokenizer, which the OpenAI endpoints need for their text); the malformed ones
also go to ``/v1/completions`` and ``/v1/chat/completions``.

Around the load, on the idle server with an empty radix cache: the free KV tokens
(``/v1/loads``, computed when asked: ``max_total_num_tokens - num_used_tokens``, where used
excludes evictable radix-cache tokens) and a fixed set of greedy probes below the dense
threshold. Between the probes and the load, the KV pool is filled to its advertised capacity
(:mod:`pool_fill`: the fewest requests that hold every free token, sent at once), which is
where memory the server did not plan for would run out. ``--dense-reference`` then starts a
plain SGLang server (same flags without ``--enable-pariskv``) for the same probes. During
the load a sampler records output tokens/s and GPU memory (``nvidia-smi``, when present)
every ``--sample-interval`` seconds.

Writes ``benchmarks/results/soak.json`` and a PNG beside it. The run fails (exit 1, results
still written with ``failed: true``) on any error of a well-formed request (HTTP error,
error chunk, broken stream, wrong token count, timeout) or of a pool-fill request, a server
crash, a malformed request not answered 4xx, free tokens after the load different from
before, or ParisKV counters that do not match what was served.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_e2e as e2e  # noqa: E402
import bench_mixed_traffic as mt  # noqa: E402
import bench_workflows as wf  # noqa: E402
from pool_fill import fill_pool  # noqa: E402
from server_client import (  # noqa: E402
    RequestFailed,
    abort_stream,
    free_tokens,
    generate,
    post,
    used_tokens,
    wait_idle,
)

from pariskv_tools.cli import HelpFormatter, add_results_args, redraw, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
KINDS = ("chat", "long", "short", "stream", "abort", "max1", "ctx_limit", "malformed")
DEFAULT_MIX = "chat=3,long=2,short=5,stream=3,abort=2,max1=2,ctx_limit=1,malformed=2"
PK = "sglang:pariskv_"
#: Prompt-seed indices outside any client's range: the chats' shared document and probes.
CHAT_DOC_INDEX = 2**40
PROBE_INDEX = 2**41
CLIENT_STRIDE = 2**32
#: Scenario parameters (tokens): chat turns, their user chunks and answers; streams.
CHAT_TURNS = (2, 4)
CHAT_USER = (32, 256)
CHAT_ANSWER = (16, 64)
LONG_OUTPUT = (8, 64)
SHORT_OUTPUT = (16, 128)
STREAM_OUTPUT = (64, 256)
ABORT_OUTPUT = 512
ABORT_AFTER_CHUNKS = (1, 8)
CTX_LIMIT_OUTPUT = (1, 32)
MALFORMED_TIMEOUT_S = 60.0
MAX_ERROR_SAMPLES = 50
JOIN_GRACE_S = 10.0

#: Malformed or oversized requests: name -> endpoint. Each must be answered 4xx.
MALFORMED = {
    "generate_bad_json": "/generate",
    "generate_input_ids_not_a_list": "/generate",
    "generate_input_over_context": "/generate",
    "generate_total_over_context": "/generate",
    "completions_bad_json": "/v1/completions",
    "completions_max_tokens_not_an_int": "/v1/completions",
    "completions_prompt_over_context": "/v1/completions",
    "chat_bad_json": "/v1/chat/completions",
    "chat_messages_not_a_list": "/v1/chat/completions",
}

DEFINITIONS = {
    "errors_definition": "well-formed requests that failed: an HTTP error, an error chunk, "
    "a stream ending without [DONE], fewer or more output tokens than max_new_tokens "
    "(ignore_eos), an abort the client did not cause, or no answer within --request-timeout",
    "aborts_definition": "streams the client closed after a few chunks, on purpose",
    "free_tokens_definition": "sum over DP ranks of /v1/loads max_total_num_tokens - "
    "num_used_tokens, on the idle server after /flush_cache",
    "throughput_definition": "output tokens the clients received (finished, aborted and "
    "chat requests) per sampling interval",
    "pool_fill_definition": "before the load, on the idle server: the fewest requests "
    "(each within the context length, at most max_running_requests) whose input + output "
    "tokens add up to the free KV tokens, sent at once; peak_used_tokens is the largest "
    "/v1/loads num_used_tokens seen while they ran",
    "memory_planned_definition": "GiB the pool sizing keeps out of the KV pool for the "
    "ParisKV backend (its startup log line), in bytes",
    "memory_allocated_definition": "histograms + decode workspace (+ hot cache) MiB the "
    "ParisKV backend logs once built, in bytes; first TP rank's lines",
}


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Workload:
    """What the scenario mix depends on."""

    seed: int
    context_length: int
    dense_threshold: int
    short_input: tuple[int, int]
    long_input: tuple[int, int]
    chat_doc_tokens: int
    weights: dict[str, float]

    def check(self) -> None:
        """Raise ValueError unless every kind's requests fit the context and long ones
        cross the dense threshold."""
        ctx, thr = self.context_length, self.dense_threshold
        chat_max = self.chat_doc_tokens + CHAT_TURNS[1] * (CHAT_USER[1] + CHAT_ANSWER[1])
        for what, ok in (
            (f"--long-input low > dense threshold {thr}", self.long_input[0] > thr),
            ("--long-input fits the context", self.long_input[1] + LONG_OUTPUT[1] < ctx),
            ("--short-input fits the context", self.short_input[1] + ABORT_OUTPUT < ctx),
            (f"a chat ({chat_max} tokens at most) fits the context", chat_max < ctx),
            ("context-limit requests cross the threshold", ctx - CTX_LIMIT_OUTPUT[1] > thr),
            ("1 <= LOW <= HIGH", all(1 <= a <= b for a, b in (self.short_input, self.long_input))),
        ):
            if not ok:
                raise ValueError(f"workload does not satisfy: {what} ({self})")
        if set(self.weights) - set(KINDS) or not sum(self.weights.values()) > 0:
            raise ValueError(f"--mix: weights of {KINDS} with a positive sum ({self.weights})")


@dataclass(frozen=True)
class Scenario:
    """One client action. ``index`` seeds its prompt (unique over clients)."""

    kind: str
    index: int
    input_len: int = 0
    output_len: int = 0
    turns: int = 0
    cut_after: int = 0
    variant: str = ""


def _draw(rng: np.random.Generator, lo_hi: tuple[int, int]) -> int:
    return int(rng.integers(lo_hi[0], lo_hi[1], endpoint=True))


def scenarios(w: Workload, client: int) -> Iterator[Scenario]:
    """Client ``client``'s endless scenario sequence, a function of (seed, client) alone.
    The first scenario of client ``c`` is the ``c``-th kind of positive weight (cyclically),
    so with at least as many clients as kinds every kind runs from the start; then kinds
    follow the mix."""
    rng = np.random.default_rng([w.seed, client])
    kinds = [k for k in KINDS if w.weights.get(k, 0) > 0]
    p = np.array([w.weights[k] for k in kinds], dtype=float)
    p /= p.sum()
    for k in itertools.count():
        kind = kinds[client % len(kinds)] if k == 0 else kinds[rng.choice(len(kinds), p=p)]
        index = client * CLIENT_STRIDE + k
        either = w.long_input if rng.random() < 0.5 else w.short_input
        if kind == "chat":
            yield Scenario(
                kind,
                index,
                w.chat_doc_tokens,
                _draw(rng, CHAT_ANSWER),
                turns=_draw(rng, CHAT_TURNS),
            )
        elif kind == "long":
            yield Scenario(kind, index, _draw(rng, w.long_input), _draw(rng, LONG_OUTPUT))
        elif kind == "short":
            yield Scenario(kind, index, _draw(rng, w.short_input), _draw(rng, SHORT_OUTPUT))
        elif kind == "stream":
            yield Scenario(kind, index, _draw(rng, w.short_input), _draw(rng, STREAM_OUTPUT))
        elif kind == "abort":
            yield Scenario(
                kind,
                index,
                _draw(rng, either),
                ABORT_OUTPUT,
                cut_after=_draw(rng, ABORT_AFTER_CHUNKS),
            )
        elif kind == "max1":
            yield Scenario(kind, index, _draw(rng, either), 1)
        elif kind == "ctx_limit":
            out = _draw(rng, CTX_LIMIT_OUTPUT)
            yield Scenario(kind, index, w.context_length - out, out)
        else:
            yield Scenario(kind, index, variant=str(rng.choice(list(MALFORMED))))


def ids_for(seed: int, index: int, n: int) -> list[int]:
    """``n`` prompt token ids of seed index ``index`` (bench_mixed_traffic's prompts)."""
    return mt.prompt_ids(seed, mt.Request(index=index, cls="", input_len=n, arrival_s=0.0))


def malformed_body(variant: str, context_length: int) -> bytes:
    """The body of a malformed or oversized request (see :data:`MALFORMED`)."""
    over = list(range(1000, 1000 + context_length + 16))
    bodies = {
        "generate_bad_json": b'{"input_ids": [1000, 1001, 1002',
        "generate_input_ids_not_a_list": {
            "input_ids": "1000 1001",
            "sampling_params": {"max_new_tokens": 4},
        },
        "generate_input_over_context": {
            "input_ids": over,
            "sampling_params": {"max_new_tokens": 4},
        },
        "generate_total_over_context": {
            "input_ids": over[: context_length // 2],
            "sampling_params": {"max_new_tokens": context_length},
        },
        "completions_bad_json": b'{"model": "default", "prompt": ',
        "completions_max_tokens_not_an_int": {
            "model": "default",
            "prompt": [1000, 1001],
            "max_tokens": "many",
        },
        "completions_prompt_over_context": {"model": "default", "prompt": over, "max_tokens": 4},
        "chat_bad_json": b'{"model": "default", "messages": [{"role": "user"',
        "chat_messages_not_a_list": {"model": "default", "messages": "hello"},
    }
    body = bodies[variant]
    return body if isinstance(body, bytes) else json.dumps(body).encode()


# --------------------------------------------------------------------------- client


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

    def request(
        self,
        kind: str,
        error: str | None = None,
        tokens: int = 0,
        context: int = 0,
        threshold: int = 0,
    ) -> None:
        """One well-formed request's outcome (``context``: its input length)."""
        with self.lock:
            self.requests += 1
            self.by_kind[kind]["sent"] += 1
            self.output_tokens += tokens
            if error is not None:
                self.errors += 1
                self.by_kind[kind]["errors"] += 1
                if len(self.error_samples) < MAX_ERROR_SAMPLES:
                    self.error_samples.append(f"{kind}: {error}")
            elif tokens >= 2:  # a decode step ran
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
            history = history + rng.integers(*mt.TOKEN_ID_RANGE, _draw(rng, CHAT_USER)).tolist()
            try:
                out = generate(url, history, sc.output_len, timeout)
            except RequestFailed as e:
                tally.request("chat", str(e))
                return
            tally.request("chat", None, len(out), len(history), thr)
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
    if sc.kind in ("long", "stream"):
        req = mt.Request(index=sc.index, cls=sc.kind, input_len=sc.input_len, arrival_s=0.0)
        rec = mt.stream_one(url, req, ids, sc.output_len, timeout)
        tally.request(sc.kind, rec["error"], rec["tokens"], sc.input_len, thr)
        return
    try:
        out = generate(url, ids, sc.output_len, timeout)
    except RequestFailed as e:
        tally.request(sc.kind, str(e))
        return
    tally.request(sc.kind, None, len(out), sc.input_len, thr)


# --------------------------------------------------------------------------- server state


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


# --------------------------------------------------------------------------- the load


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
    mt._check_local(url)
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
        last_t, last_tok = t0, 0
        while not done.wait(sample_interval):
            now, snap = time.monotonic(), tally.snapshot()
            try:
                used = used_tokens(url)
            except (OSError, ValueError, KeyError):
                used = None
            series.append(
                {
                    "t_s": round(now - t0, 3),
                    "output_tok_s": (snap["output_tokens"] - last_tok) / max(now - last_t, 1e-9),
                    "requests": snap["requests"],
                    "errors": snap["errors"],
                    "kv_used_tokens": used,
                    "gpu_memory_mib": gpu_memory_mib(),
                }
            )
            last_t, last_tok = now, snap["output_tokens"]
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
    out["hung_clients"] = sum(th.is_alive() for th in threads)
    out.update(wall_s=wall, series=series, crashed=crashed.is_set())
    return out


# --------------------------------------------------------------------------- checks


_PLANNED = re.compile(
    r"ParisKV: (\d+) tokens fit SGLang's KV budget; ([\d.]+) GiB \((\d+) tokens\) are kept"
)
_BACKEND = re.compile(
    r"ParisKV backend: codes ([\d.]+) MiB, histograms ([\d.]+) MiB \((\d+) request slots\), "
    r"decode workspace ([\d.]+) MiB"
)
_HOT_CACHE = re.compile(
    r"ParisKV offload: host pool ([\d.]+) GiB, hot cache (\d+) lines/layer "
    r"\(([\d.]+) MiB\)"
)


def parse_memory_log(text: str) -> dict:
    """ParisKV's planned and allocated backend memory from a server log (first TP rank's
    lines): planned = the GiB the pool sizing keeps for the backend; allocated = the
    histograms + decode workspace (+ hot cache) the backend logs. None where absent."""
    out: dict = {"memory_planned_bytes": None, "memory_allocated_bytes": None}
    if m := _PLANNED.search(text):
        out["memory_planned_bytes"] = round(float(m.group(2)) * 2**30)
        out["kv_tokens_before_reserve"] = int(m.group(1))
        out["kv_tokens_reserved"] = int(m.group(3))
    if m := _BACKEND.search(text):
        hist, ws = float(m.group(2)), float(m.group(4))
        hot = float(h.group(3)) if (h := _HOT_CACHE.search(text)) else 0.0
        out["memory_allocated_bytes"] = round((hist + ws + hot) * 2**20)
        out["codes_mib"] = float(m.group(1))
    return out


def check_counters(delta: dict | None, tally: dict) -> list[str]:
    """Problems with the ParisKV counters' movement over the load given what was served."""
    if delta is None:
        return ["/metrics served no sglang:pariskv_* counters (was the plugin loaded?)"]
    problems = []
    served = tally["requests"] - tally["errors"] - tally["malformed_total"]
    if served > 0 and not delta.get(f"{PK}tokens_encoded_total", 0) > 0:
        problems.append(f"{served} requests served but {PK}tokens_encoded_total did not grow")
    if tally["sparse_expected"] and not delta.get(f"{PK}sparse_request_steps_total", 0) > 0:
        problems.append(
            f"{tally['sparse_expected']} requests decoded above the dense threshold but "
            f"{PK}sparse_request_steps_total did not grow"
        )
    if tally["dense_expected"] and not delta.get(f"{PK}dense_request_steps_total", 0) > 0:
        problems.append(
            f"{tally['dense_expected']} requests decoded below the dense threshold but "
            f"{PK}dense_request_steps_total did not grow"
        )
    return problems


def verdict(res: dict) -> list[str]:
    """Why the run failed (empty: it passed)."""
    why = []
    if res["errors"]:
        why.append(f"{res['errors']} well-formed requests failed")
    if res["crashes"]:
        why.append("the server process exited")
    if res["hung_clients"]:
        why.append(f"{res['hung_clients']} clients still running after their timeouts")
    if res["malformed_rejected_4xx"] != res["malformed_total"]:
        why.append(
            f"{res['malformed_total'] - res['malformed_rejected_4xx']} of "
            f"{res['malformed_total']} malformed requests not answered 4xx"
        )
    fill = res["pool_fill"]
    if fill is None:
        why.append("the KV pool was not filled (no free-token count on the idle server)")
    elif fill["errors"]:
        why.append(f"{fill['errors']} of {fill['requests']} requests filling the KV pool failed")
    before, after = res["free_tokens_idle_before"], res["free_tokens_idle_after"]
    if before is None or after != before:
        why.append(f"free KV tokens on the idle server: {before} before, {after} after")
    if not res["idle_after"]:
        why.append("the server did not become idle after the load")
    why += res["counter_problems"]
    return why


# --------------------------------------------------------------------------- servers


def _start(name: str, args, model: str, flags: list[str], log_dir: Path, pariskv: bool):
    """A started server (registered for the signal handler)."""
    # every long document retrieves, however few tokens its step holds
    cfg = {"dense_threshold": args.pariskv_dense_threshold, "min_sparse_tokens": 0}
    cfg = cfg if pariskv else None
    srv, _ = mt.server_for(name, args, model, flags, log_dir, args.context_length, cfg)
    wf._ACTIVE.append(srv)
    try:
        srv.start(args.health_timeout)
    except Exception:
        wf._ACTIVE.remove(srv)
        raise
    return srv


def _stop(srv) -> None:
    srv.stop()
    if srv in wf._ACTIVE:
        wf._ACTIVE.remove(srv)


def _scrape(url: str) -> dict | None:
    from pariskv_tools.workloads import prom

    try:
        return prom.scrape(url)
    except (OSError, ValueError):
        return None


def soak(args, w: Workload, model: str, flags: list[str], log_dir: Path) -> dict:
    """The ParisKV server's run: idle state and probes, load, idle state and probes."""
    probes = probe_set(w, args.probes, args.probe_output_len)
    srv = _start("pariskv", args, model, flags, log_dir, pariskv=True)
    out: dict = {
        "server_command": " ".join(srv.cmd),
        "pool_fill": None,
        "free_tokens_idle_after": None,
        "idle_after": False,
        "probes_after": None,
        "counters_after": None,
    }
    try:
        out["server_info"] = wf._server_info(srv.url)
        before = _idle_state(srv, args)
        out["free_tokens_idle_before"] = before["free_tokens"]
        out["probes_before"] = run_probes(
            srv.url, probes, args.probe_output_len, args.request_timeout
        )
        if before["free_tokens"]:
            max_running = (out["server_info"] or {}).get("max_running_requests")
            print(f"[soak] filling {before['free_tokens']} free KV tokens", flush=True)
            out["pool_fill"] = fill_pool(
                srv.url,
                before["free_tokens"],
                args.context_length,
                max_running,
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
    out["memory_log"] = parse_memory_log(srv.log_path.read_text(errors="replace"))
    out["stats"] = wf._read_stats(log_dir / "pariskv-stats")
    out["probe_input_lens"] = [len(p) for p in probes]
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


def _same(a: list | None, b: list | None) -> bool:
    """Both probe sets complete (no error) and equal."""
    ok = a is not None and b is not None
    return ok and a == b and not any(isinstance(x, str) for x in a)


def compose(args, w: Workload, model_desc: str, run: dict, dense: dict | None) -> dict:
    """The results file's content, failures included."""
    from pariskv_tools.workloads import prom

    load = run["load"]
    counters = (
        prom.delta(run["counters_before"], run["counters_after"])
        if run["counters_after"] is not None
        else None
    )
    res = {
        **e2e._device_info(),
        "command": " ".join([sys.executable, *sys.argv]),
        "model": model_desc,
        "workload": {
            **asdict(w),
            "clients": args.clients,
            "duration_s": args.duration,
            "request_timeout_s": args.request_timeout,
            "mem_fraction_static": args.mem_fraction,
            "server_args": args.server_arg,
        },
        **DEFINITIONS,
        "server_commands": {"pariskv": run["server_command"]}
        | ({"dense": dense["server_command"]} if dense else {}),
        "server_info": run.get("server_info"),
        "duration_s": load["wall_s"],
        "clients": args.clients,
        "requests": load["requests"],
        "requests_by_kind": load["by_kind"],
        "output_tokens": load["output_tokens"],
        "errors": load["errors"],
        "error_samples": load["error_samples"],
        "aborts": load["aborts"],
        "aborts_finished_first": load["aborts_finished_first"],
        "crashes": int(load["crashed"]),
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
        "probes": {"pariskv_before": run["probes_before"], "pariskv_after": run["probes_after"]}
        | ({"dense": dense["probes"]} if dense else {}),
        "pariskv_counters": counters,
        "counter_problems": check_counters(counters, load),
        "pariskv_stats": run["stats"],
        **run["memory_log"],
        "series": load["series"],
    }
    res["failures"] = verdict(res)
    res["failed"] = bool(res["failures"])
    return res


# --------------------------------------------------------------------------- plot


def plot(data: dict, out: Path) -> None:
    """Output tokens/s and memory (GPU MiB, KV tokens in use) over the soak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["series"]
    t = [p["t_s"] / 60 for p in s]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.plot(t, [p["output_tok_s"] for p in s])
    a.set_ylabel("output tokens/s (clients)")
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
    state = "FAILED: " + "; ".join(data["failures"])[:90] if data["failed"] else "passed"
    fig.suptitle(
        f"{data.get('device', '')}: {data['model'][:50]}, {data['clients']} clients, "
        f"{data['requests']} requests ({state})",
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
        type=mt._range,
        default="128-2048",
        help="input tokens of short chats and streams, LOW-HIGH (uniform)",
    )
    ap.add_argument(
        "--long-input",
        type=mt._range,
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
    mt.add_server_args(ap)
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
    wf._check_plugin_installed()
    signal.signal(signal.SIGTERM, wf._on_signal)
    signal.signal(signal.SIGINT, wf._on_signal)
    model, model_desc, flags = mt.serve_model(args.model_path, args.context_length)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"logs in {log_dir}", flush=True)
    run = soak(args, w, model, flags, log_dir)
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
