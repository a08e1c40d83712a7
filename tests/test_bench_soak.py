"""bench_soak on the CPU: the scenario mix, the client's outcomes and the run's verdict,
against an in-process server that answers the endpoints the soak uses the way SGLang does
(``/generate`` streamed and not, the OpenAI endpoints' 4xx, ``/v1/loads``, ``/metrics``)."""

from __future__ import annotations

import ast
import collections
import itertools
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_soak as bench  # noqa: E402
import pool_fill  # noqa: E402
import server_client  # noqa: E402
import server_process  # noqa: E402
import soak_checks  # noqa: E402
import soak_load  # noqa: E402
import soak_scenarios  # noqa: E402
import soak_server  # noqa: E402

from tests.loopback_server import LoopbackServer  # noqa: E402

CTX, THR = 2048, 256
MAX_TOTAL = 100_000
#: SGLang's request limits for this context and pool (scheduler and tokenizer manager):
#: max_req_len = min(context, pool) - 1, inputs shorter than max_req_len - 5, outputs cut
#: where input + output reaches max_req_len - 1.
MAX_REQ_LEN = min(CTX, MAX_TOTAL) - 1
MAX_REQ_INPUT_LEN = MAX_REQ_LEN - 5
SERVED = MAX_REQ_LEN - 1  # the longest input + output served in full
WEIGHTS = bench._mix(soak_scenarios.DEFAULT_MIX)


def _wl(seed=0, weights=None, **kw) -> soak_scenarios.Workload:
    args = dict(
        seed=seed,
        context_length=CTX,
        dense_threshold=THR,
        short_input=(16, 128),
        long_input=(300, 900),
        chat_doc_tokens=300,
        weights=weights or WEIGHTS,
    )
    args.update(kw)
    return soak_scenarios.Workload(**args)


# --------------------------------------------------------------------------- scenario mix


def _plan(w, clients=8, n=100):
    return [list(itertools.islice(soak_scenarios.scenarios(w, c), n)) for c in range(clients)]


def test_the_mix_is_a_function_of_its_seed():
    assert _plan(_wl(seed=3)) == _plan(_wl(seed=3))
    a, b = _plan(_wl(seed=3)), _plan(_wl(seed=4))
    assert [s.kind for s in a[1]] != [s.kind for s in b[1]]
    assert a[0] != a[1]  # clients differ from each other
    idx = [s.index for c in a for s in c]
    assert len(set(idx)) == len(idx)  # every scenario has its own prompt


def test_the_mix_covers_every_kind_from_the_start_and_follows_the_weights():
    w = _wl()
    plan = _plan(w, clients=64, n=200)
    assert {c[0].kind for c in plan[: len(soak_scenarios.KINDS)]} == set(soak_scenarios.KINDS)
    counts = collections.Counter(s.kind for c in plan for s in c[1:])
    total, wsum = sum(counts.values()), sum(WEIGHTS.values())
    for kind in soak_scenarios.KINDS:
        assert counts[kind] / total == pytest.approx(WEIGHTS[kind] / wsum, abs=0.01)
    for s in (s for c in plan for s in c):
        if s.kind == "long":
            assert THR < s.input_len <= 900
        elif s.kind == "ctx_limit":
            assert s.input_len + s.output_len == SERVED and s.input_len > THR
            assert s.input_len < MAX_REQ_INPUT_LEN
        elif s.kind == "max1":
            assert s.output_len == 1
        elif s.kind == "abort":
            assert 1 <= s.cut_after <= 8 and s.output_len == soak_scenarios.ABORT_OUTPUT
        elif s.kind == "chat":
            assert s.input_len == 300 and 2 <= s.turns <= 4
        elif s.kind == "malformed":
            assert s.variant in soak_scenarios.MALFORMED
        else:
            assert 16 <= s.input_len <= 128


def test_a_kind_of_weight_zero_never_runs():
    plan = _plan(_wl(weights={"short": 1.0, "malformed": 0.0, "abort": 2.0}), clients=9)
    assert {s.kind for c in plan for s in c} == {"short", "abort"}


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"long_input": (200, 900)}, "dense threshold"),
        ({"chat_doc_tokens": 1500}, "chat"),
        ({"short_input": (64, 16)}, "LOW <= HIGH"),
        ({"weights": {"short": 0.0}}, "positive sum"),
    ],
)
def test_impossible_workloads_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        _wl(**kw).check()
    _wl().check()


def test_the_request_limits_come_from_the_server():
    nominal = _wl()
    assert (nominal.max_input, nominal.max_total) == (MAX_REQ_INPUT_LEN - 1, SERVED)
    small = nominal.served_by({"max_req_input_len": 1700})  # a pool smaller than the context
    assert (small.max_input, small.max_total) == (1699, 1704)
    plan = [list(itertools.islice(soak_scenarios.scenarios(small, c), 200)) for c in range(8)]
    limit = [s for c in plan for s in c if s.kind == "ctx_limit"]
    assert limit and all(s.input_len + s.output_len == 1704 for s in limit)
    assert all(s.input_len <= 1699 for s in limit)
    with pytest.raises(ValueError, match="chat"):
        nominal.served_by({"max_req_input_len": 1000})  # the chats no longer fit


def test_context_limit_requests_are_served_in_full(fake):
    srv, _ = fake()
    w = _wl(weights={"ctx_limit": 1.0})
    got = soak_load.drive(srv.url, w, 4, 60, 10, 6, 0.2, lambda: True)
    assert got["by_kind"]["ctx_limit"]["sent"] == 24 and got["errors"] == 0
    # what a request of input + output = context length gets from SGLang instead
    ids = soak_scenarios.ids_for(0, 1, CTX)
    assert len(server_client.generate(srv.url, ids[: CTX - 30], 30, 10, ignore_eos=False)) == 28
    with pytest.raises(server_client.RequestFailed, match="HTTP 400"):
        server_client.generate(srv.url, ids[: CTX - 4], 4, 10)


def test_malformed_bodies_are_what_their_names_say():
    for variant, path in soak_scenarios.MALFORMED.items():
        body = soak_scenarios.malformed_body(variant, CTX)
        if variant.endswith("bad_json"):
            with pytest.raises(ValueError):
                json.loads(body)
            continue
        req = json.loads(body)
        if variant.endswith("over_context"):
            ids = req.get("input_ids", req.get("prompt"))
            new = req.get("max_tokens") or req["sampling_params"]["max_new_tokens"]
            assert len(ids) >= CTX or len(ids) + new > CTX
        elif variant == "generate_input_ids_not_a_list":
            assert isinstance(req["input_ids"], str)
        elif variant == "completions_max_tokens_not_an_int":
            assert isinstance(req["max_tokens"], str)
        else:
            assert isinstance(req["messages"], str) and path == "/v1/chat/completions"


def test_probes_stay_at_or_below_the_dense_threshold():
    probes = soak_server.probe_set(_wl(), 5, 32)
    assert [len(p) for p in probes] == [16, 68, 120, 172, 224]
    assert probes == soak_server.probe_set(_wl(), 5, 32)
    with pytest.raises(ValueError):
        soak_server.probe_set(_wl(), 4, THR)


# --------------------------------------------------------------------------- fake server


class FakeState:
    """What the fake SGLang serves and saw. ``leak_per_abort``: KV tokens never freed per
    client disconnect; ``status_override``: path -> status for malformed requests there;
    ``drift_after_flushes``: probe outputs change after that many /flush_cache calls."""

    def __init__(
        self,
        leak_per_abort=0,
        status_override=None,
        drift_after_flushes=None,
        answer_delay=0.0,
        max_running=None,
    ):
        self.lock = threading.Lock()
        self.max_running = max_running  # /server_info's max_running_requests
        self.answer_delay = answer_delay  # seconds a non-streamed /generate takes
        self.in_use = 0  # KV tokens of the requests running now
        self.leak_per_abort = leak_per_abort
        self.status_override = status_override or {}
        self.drift_after_flushes = drift_after_flushes
        self.flushes = 0
        self.running = 0
        self.leaked = 0
        self.disconnects = 0
        self.generated = 0
        self.counters = collections.Counter()
        self.streamed = collections.Counter()  # well-formed streams per endpoint

    def outputs(self, ids: list[int], n: int) -> list[int]:
        salt = int(self.drift_after_flushes is not None and self.flushes > self.drift_after_flushes)
        return [(sum(ids) + 7 * k + salt) % 32000 for k in range(n)]


def _fake(state: FakeState) -> LoopbackServer:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _json(self, status: int, obj) -> None:
            data = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.startswith("/v1/loads"):
                with state.lock:
                    load = {
                        "num_running_reqs": state.running,
                        "num_waiting_reqs": 0,
                        "num_used_tokens": state.leaked + state.in_use,
                        "max_total_num_tokens": MAX_TOTAL,
                    }
                self._json(200, {"loads": [load]})
            elif self.path == "/metrics":
                with state.lock:
                    lines = [
                        f'sglang:pariskv_{k}_total{{tp_rank="0"}} {v}'
                        for k, v in state.counters.items()
                    ]
                self._json(200, ("\n".join(lines) + "\n").encode())
            elif self.path == "/server_info":
                info = {
                    "context_length": CTX,
                    "max_req_input_len": MAX_REQ_INPUT_LEN,
                    "max_running_requests": state.max_running,
                }
                self._json(200, info)
            else:  # /health_generate
                self._json(200, {})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.startswith("/flush_cache"):
                with state.lock:
                    state.flushes += 1
                return self._json(200, b"")
            try:
                req = json.loads(body)
            except ValueError:
                return self._json(state.status_override.get(self.path, 400), {"error": "json"})
            if req.get("stream"):
                with state.lock:
                    state.streamed[self.path] += 1
            if self.path == "/v1/completions" and req.get("stream"):  # a streamed completion
                ids, n = req["prompt"], req["max_tokens"]
                assert req["ignore_eos"] and isinstance(ids, list) and isinstance(n, int), req
            elif self.path != "/generate":
                bad = not isinstance(req.get("max_tokens", 0), int) or isinstance(
                    req.get("messages", []), str
                )
                bad = bad or len(req.get("prompt", [])) >= CTX
                assert bad, req  # well-formed chat requests: the soak sends none
                return self._json(state.status_override.get(self.path, 400), {"error": "bad"})
            else:
                ids = req["input_ids"]
                if not isinstance(ids, list):
                    return self._json(400, {"error": "input_ids"})
                n = req["sampling_params"]["max_new_tokens"]
            if len(ids) >= CTX or len(ids) + n > CTX:  # the tokenizer manager's check
                return self._json(400, {"error": "too long"})
            if len(ids) >= MAX_REQ_INPUT_LEN:  # the scheduler's
                return self._json(400, {"error": "input too long"})
            n = min(n, MAX_REQ_LEN - len(ids) - 1)  # the scheduler's cap, without an error
            with state.lock:
                state.running += 1
                state.in_use += len(ids) + n
                state.counters["tokens_encoded"] += len(ids)
            try:
                self._generate(req, ids, n)
            finally:
                with state.lock:
                    state.running -= 1
                    state.in_use -= len(ids) + n

        def _count_decode(self, ids, k):
            with state.lock:
                state.generated += 1
                state.counters["tokens_encoded"] += k
                state.counters[
                    "sparse_request_steps" if len(ids) > THR else "dense_request_steps"
                ] += max(k - 1, 0)

        def _generate(self, req, ids, n):
            out = state.outputs(ids, n)
            if not req.get("stream"):
                time.sleep(state.answer_delay)
                self._count_decode(ids, n)
                meta = {"finish_reason": {"type": "length"}, "completion_tokens": n}
                return self._json(200, {"output_ids": out, "meta_info": meta})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for k in range(1, n + 1):
                    time.sleep(0.001)
                    if self.path == "/v1/completions":
                        fin = "length" if k == n else None
                        self._chunk(
                            {"choices": [{"text": f" w{out[k - 1]}", "finish_reason": fin}]}
                        )
                        continue
                    meta = {
                        "finish_reason": {"type": "length"} if k == n else None,
                        "completion_tokens": k,
                    }
                    self._chunk({"output_ids": out[:k], "meta_info": meta})
                if self.path == "/v1/completions":
                    usage = {"prompt_tokens": len(ids), "completion_tokens": n}
                    self._chunk({"choices": [], "usage": usage})
                self._write(b"data: [DONE]\n\n")
                self._write(b"")
                self._count_decode(ids, n)
            except (BrokenPipeError, ConnectionResetError):
                with state.lock:
                    state.disconnects += 1
                    state.leaked += state.leak_per_abort

        def _chunk(self, obj):
            self._write(f"data: {json.dumps(obj)}\n\n".encode())

        def _write(self, data: bytes):
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    return LoopbackServer(H)


@pytest.fixture
def fake():
    made = []

    def make(**kw):
        state = FakeState(**kw)
        srv = _fake(state)
        made.append(srv)
        return srv, state

    yield make
    for srv in made:
        srv.close()


# --------------------------------------------------------------------------- client


def test_an_abort_mid_stream_is_an_abort_and_the_server_sees_the_client_go(fake):
    srv, state = fake()
    ids = soak_scenarios.ids_for(0, 1, 40)
    cut, tokens = server_client.abort_stream(srv.url, ids, 512, cut_after=3, timeout=10)
    assert cut and tokens == 3
    deadline = time.monotonic() + 5
    while state.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.disconnects == 1 and state.generated == 0
    # a stream shorter than the cut is a finished request, not an abort
    assert server_client.abort_stream(srv.url, ids, 2, cut_after=5, timeout=10) == (False, 2)
    tally = soak_load.Tally()
    soak_load.run_scenario(
        srv.url, soak_scenarios.Scenario("abort", 9, 40, 512, cut_after=2), _wl(), 10, tally
    )
    assert (tally.aborts, tally.errors, tally.requests) == (1, 0, 1)


def test_an_error_before_the_cut_is_an_error(fake):
    srv, _ = fake()
    with pytest.raises(server_client.RequestFailed, match="HTTP 400"):
        server_client.abort_stream(srv.url, list(range(CTX)), 512, 3, timeout=10)
    tally = soak_load.Tally()
    w = _wl(context_length=CTX + 1000)  # the fake's context is CTX: the request is refused
    soak_load.run_scenario(
        srv.url, soak_scenarios.Scenario("abort", 9, CTX, 512, cut_after=2), w, 10, tally
    )
    assert (tally.aborts, tally.errors) == (0, 1)
    assert "HTTP 400" in tally.error_samples[0]


def test_drive_runs_every_kind_without_errors_and_ends_on_time(fake):
    srv, state = fake()
    duration = 2.0
    t0 = time.monotonic()
    got = soak_load.drive(
        srv.url,
        _wl(),
        clients=16,
        duration=duration,
        request_timeout=10,
        max_per_client=10_000,
        sample_interval=0.5,
        alive=lambda: True,
    )
    took = time.monotonic() - t0
    assert duration <= got["wall_s"] <= took < duration + 3.0
    assert got["errors"] == 0, got["error_samples"]
    assert got["hung_clients"] == 0 and not got["crashed"]
    assert all(got["by_kind"][k]["sent"] > 0 for k in soak_scenarios.KINDS)
    assert (
        got["malformed_total"]
        == got["malformed_rejected_4xx"]
        == got["by_kind"]["malformed"]["sent"]
    )
    assert got["aborts"] > 0 and got["aborts"] == state.disconnects
    # long documents and streams through the OpenAI API, aborted streams through /generate
    assert state.streamed["/v1/completions"] >= got["by_kind"]["long"]["sent"] > 0
    assert state.streamed["/generate"] >= got["by_kind"]["abort"]["sent"] > 0
    assert got["sparse_expected"] > 0 and got["dense_expected"] > 0
    assert 3 <= len(got["series"]) <= duration / 0.5 + 8
    assert got["series"][-1]["requests"] <= got["requests"]
    assert sum(p["output_tok_s"] for p in got["series"]) > 0
    assert any(p["short_p50_s"] for p in got["series"])  # short chats ended in some interval
    # latency: every well-formed request that succeeded, by kind; streams with their TPOT
    lat = got["latency"]
    timed = {"chat", "long", "short", "stream", "max1", "ctx_limit"}
    assert set(lat) == timed
    assert sum(v["requests"] for v in lat.values()) == (
        got["requests"] - got["malformed_total"] - got["by_kind"]["abort"]["sent"]
    )
    for kind, v in lat.items():
        assert 0 < v["p50_s"] <= v["p99_s"] < 10, kind
        assert ("tpot_p50_s" in v) == (kind in ("long", "stream")), kind
    assert 0 < lat["long"]["tpot_p50_s"] <= lat["long"]["tpot_p99_s"] < lat["long"]["p99_s"]


def test_latency_is_summarized_by_kind_and_by_quarter_of_the_load():
    import numpy as np

    rng = np.random.default_rng(0)
    t0, wall = 100.0, 40.0
    ends = rng.uniform(t0, t0 + wall, 400)
    secs = rng.uniform(0.1, 2.0, 400)
    records = [("short", e, x, None) for e, x in zip(ends[:300], secs[:300])]
    records += [("stream", e, x, x / 50) for e, x in zip(ends[300:], secs[300:])]
    got = soak_load.latency_summary(records, t0, wall)
    short_ends, short_secs = ends[:300] - t0, secs[:300]
    assert got["short"]["requests"] == 300
    assert got["short"]["p99_s"] == pytest.approx(np.percentile(short_secs, 99))
    assert got["short"]["first_quarter_p50_s"] == pytest.approx(
        np.median(short_secs[short_ends <= 10.0])
    )
    assert got["short"]["last_quarter_p50_s"] == pytest.approx(
        np.median(short_secs[short_ends > 30.0])
    )
    assert "tpot_p50_s" not in got["short"]
    assert got["stream"]["tpot_p50_s"] == pytest.approx(np.median(secs[300:] / 50))
    late = soak_load.latency_summary([("max1", t0 + 39.0, 0.5, None)], t0, wall)
    assert late["max1"]["first_quarter_p50_s"] is None
    assert late["max1"]["last_quarter_p50_s"] == 0.5


def test_drive_stops_at_the_per_client_count(fake):
    srv, state = fake()
    t0 = time.monotonic()
    got = soak_load.drive(
        srv.url,
        _wl(weights={"short": 1.0}),
        clients=4,
        duration=60,
        request_timeout=10,
        max_per_client=3,
        sample_interval=0.2,
        alive=lambda: True,
    )
    assert time.monotonic() - t0 < 5
    assert got["requests"] == state.generated == 12 and got["errors"] == 0


def test_a_dead_server_stops_the_load_as_a_crash(fake):
    srv, _ = fake()
    t0 = time.monotonic()
    got = soak_load.drive(
        srv.url,
        _wl(),
        clients=4,
        duration=60,
        request_timeout=10,
        max_per_client=10_000,
        sample_interval=0.2,
        alive=lambda: False,
    )
    assert got["crashed"] and time.monotonic() - t0 < 5


def test_the_client_talks_to_loopback_only():
    with pytest.raises(ValueError, match="127.0.0.1"):
        soak_load.drive("http://localhost:1", _wl(), 1, 1, 1, 1, 1, lambda: True)
    with pytest.raises(ValueError, match="127.0.0.1"):
        server_client.abort_stream("http://10.0.0.1:1", [1], 4, 1, 1)


# --------------------------------------------------------------------------- checks

POOL_FMT = (
    "ParisKV: %d tokens fit SGLang's KV budget; %.2f GiB (%d tokens) are kept for "
    "ParisKV's backend%s: serving %d"
)
BACKEND_FMT = (
    "ParisKV backend: codes %.1f MiB, decode workspace %.1f MiB (%d requests x %d "
    "tokens), config %s"
)
HOT_FMT = "ParisKV offload: host pool %.1f GiB, hot cache %d lines/layer (%.1f MiB)"
MEMORY_FMT = "ParisKV backend memory: %.1f MiB allocated on the GPU, %.1f MiB planned (%s)"


def _log(offload: bool = False, allocated: float = 1275.5) -> str:
    """Server log lines as SGLang prints the plugin's messages (prefix, two TP ranks)."""
    lines = ["[2026-01-01 10:00:00] server_args=ServerArgs(...)"]
    for rank, scale in ((0, 1.0), (1, 2.0)):
        p = f"[2026-01-01 10:00:0{rank + 1} TP{rank}] "
        lines.append(p + POOL_FMT % (812345, 1.25 * scale, 10240, "", 802105))
        if offload:
            lines.append(p + HOT_FMT % (64.0, 4096, 96.5 * scale))
        lines.append(p + BACKEND_FMT % (512.0, 300.25 * scale, 32, 32768, "{}"))
        # after construction, then again once the CUDA graphs are captured
        lines.append(p + MEMORY_FMT % (300.3 * scale, 1280.0 * scale, "..."))
        lines.append(p + MEMORY_FMT % (allocated * scale, 1280.0 * scale, "..."))
    return "\n".join(lines)


def _logged_formats(path: Path) -> set[str]:
    """The format strings of the ``logger.<level>(...)`` calls in a source file (the parser
    joins implicitly concatenated literals)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and getattr(node.func.value, "id", None) == "logger"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            out.add(node.args[0].value)
    return out


def test_the_sample_log_lines_use_the_plugins_format_strings():
    pkg = ROOT / "sglang_pariskv"
    assert POOL_FMT in _logged_formats(pkg / "pool_sizing.py")
    assert BACKEND_FMT in _logged_formats(pkg / "attention" / "backend.py")
    assert HOT_FMT in _logged_formats(pkg / "attention" / "offload_wiring.py")
    assert MEMORY_FMT in _logged_formats(pkg / "attention" / "memory_check.py")


def test_planned_and_allocated_memory_from_the_log():
    got = soak_checks.parse_memory_log(_log())
    # the first TP rank's last line (after graph capture)
    assert got["memory_planned_bytes"] == round(1280.0 * 2**20)
    assert got["memory_allocated_bytes"] == round(1275.5 * 2**20)
    assert got["kv_tokens_reserved"] == 10240 and got["codes_mib"] == 512.0
    assert soak_checks.memory_problems(got) == []  # 0.35% apart
    over = soak_checks.parse_memory_log(_log(allocated=1320.0))  # 3.1% over the plan
    (problem,) = soak_checks.memory_problems(over)
    assert "1320.0 MiB" in problem and "1280.0 MiB planned" in problem
    plain = soak_checks.parse_memory_log(MEMORY_FMT % (10.0, 10.1, "...") + "\n")
    assert plain["memory_allocated_bytes"] == round(10.0 * 2**20)  # no log prefix
    none = soak_checks.parse_memory_log("[TP0] Load weight end.\n")
    assert none["memory_planned_bytes"] is None and none["memory_allocated_bytes"] is None
    (problem,) = soak_checks.memory_problems(none)
    assert "no 'ParisKV backend memory' line" in problem


def _raised_in_a_server(depth: int) -> list[str]:
    """A real traceback, ``depth`` frames deep, as a scheduler logs it."""
    import traceback

    # distinct functions, so Python does not fold the frames into one repeated line
    scope = {}
    exec(
        'def f0():\n    raise RuntimeError("CUDA error: an illegal memory access was encountered")',
        scope,
    )
    for n in range(1, depth + 1):
        exec(f"def f{n}():\n    f{n - 1}()", scope)
    try:
        scope[f"f{depth}"]()
    except RuntimeError as e:
        text = "".join(traceback.format_exception(e))
    return ("[2026-01-01 00:00:00] Scheduler hit an exception: " + text).splitlines()


def test_a_crashed_servers_traceback_goes_into_the_results():
    tb = _raised_in_a_server(2)
    log = ["[x] Decode batch, #running-req: 30", *tb, "", "terminate called after throwing"]
    got = soak_checks.server_error("\n".join(log))
    assert got.splitlines() == tb
    assert got.splitlines()[-1].startswith("RuntimeError: CUDA error: an illegal memory")
    assert soak_checks.server_error("[x] Decode batch\n[x] Prefill batch\n") is None
    deep = soak_checks.server_error("\n".join(_raised_in_a_server(60)))
    lines = deep.splitlines()
    assert len(lines) == soak_checks.ERROR_LINES and lines[-2] == "..."
    assert lines[-1] == tb[-1] and lines[0] == tb[0]
    passing = {
        "errors": 0,
        "crashes": 0,
        "hung_clients": 0,
        "malformed_total": 3,
        "malformed_rejected_4xx": 3,
        "pool_fill": {"errors": 0, "requests": 2},
        "free_tokens_idle_before": 100,
        "free_tokens_idle_after": 100,
        "idle_after": True,
        "counter_problems": [],
        "memory_planned_bytes": 1000,
        "memory_allocated_bytes": 1000,
    }
    assert soak_checks.verdict(passing) == []
    assert soak_checks.verdict(passing | {"crashes": 1, "server_error": got}) == [
        "the server process exited (RuntimeError: CUDA error: an illegal memory access was "
        "encountered)"
    ]
    assert soak_checks.verdict(passing | {"crashes": 1}) == ["the server process exited"]


def _tally(**kw):
    base = {
        "requests": 10,
        "errors": 0,
        "malformed_total": 2,
        "sparse_expected": 3,
        "dense_expected": 2,
    }
    return base | kw


def test_counters_must_match_what_was_served():
    pk = soak_checks.PK
    good = {
        f"{pk}tokens_encoded_total": 9e3,
        f"{pk}sparse_request_steps_total": 40.0,
        f"{pk}dense_request_steps_total": 30.0,
    }
    assert soak_checks.check_counters(good, _tally()) == []
    no_sparse = good | {f"{pk}sparse_request_steps_total": 0.0}
    assert "sparse_request_steps" in " ".join(soak_checks.check_counters(no_sparse, _tally()))
    assert soak_checks.check_counters(no_sparse, _tally(sparse_expected=0)) == []
    no_enc = {k: v for k, v in good.items() if "encoded" not in k}
    assert "tokens_encoded" in " ".join(soak_checks.check_counters(no_enc, _tally()))
    assert soak_checks.check_counters(None, _tally())


# --------------------------------------------------------------------------- whole runs


#: server_process.Server's /flush_cache call (the tests replace the class)
REAL_FLUSH = server_process.Server.flush_cache


class FakeServer:
    """Stands in for server_process.Server: the fake SGLang of the named server, which
    'logs' the plugin's memory lines when it is the ParisKV one."""

    FAKES: dict = {}

    def __init__(self, name, cmd, log_path, env):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self.url = self.FAKES[name].url
        self.proc = None
        self.pariskv = "--enable-pariskv" in cmd

    def start(self, health_timeout):
        self.log_path.write_text(_log() if self.pariskv else "dense\n")

    def stop(self):
        pass

    def log_tail(self, n=60):
        return self.log_path.read_text()

    def flush_cache(self):
        REAL_FLUSH(self)


def _main(tmp_path, monkeypatch, fakes, *extra):
    monkeypatch.setattr(FakeServer, "FAKES", fakes)
    monkeypatch.setattr(server_process, "Server", FakeServer)
    monkeypatch.setattr(bench, "_check_plugin_installed", lambda: None)
    monkeypatch.setattr(bench, "_device_info", lambda: {"device": "fake GPU"})
    monkeypatch.setattr(bench.signal, "signal", lambda *a: None)
    out = tmp_path / "soak.json"
    argv = [
        "--duration",
        "1.5",
        "--clients",
        "12",
        "--context-length",
        str(CTX),
        "--pariskv-dense-threshold",
        str(THR),
        "--short-input",
        "16-128",
        "--long-input",
        "300-900",
        "--chat-doc-tokens",
        "300",
        "--probes",
        "4",
        "--request-timeout",
        "10",
        "--sample-interval",
        "0.3",
        "--idle-timeout",
        "3",
        "--model-path",
        "fake-model",
        "--log-dir",
        str(tmp_path / "logs"),
        "--out",
        str(out),
        *extra,
    ]
    rc = bench.main(argv)
    return rc, json.loads(out.read_text())


def test_a_clean_run_passes_and_states_what_it_checked(tmp_path, monkeypatch, fake):
    pk, dense = fake()[0], fake()[0]
    rc, data = _main(tmp_path, monkeypatch, {"pariskv": pk, "dense": dense}, "--dense-reference")
    assert rc == 0 and data["failed"] is False and data["failures"] == []
    assert data["device"] == "fake GPU" and data["clients"] == 12
    assert data["workload"]["max_req_input_len"] == MAX_REQ_INPUT_LEN  # the server's
    assert data["errors"] == data["crashes"] == 0 and data["requests"] > 0
    assert data["malformed_total"] == data["malformed_rejected_4xx"] > 0
    assert data["free_tokens_idle_before"] == data["free_tokens_idle_after"] == MAX_TOTAL
    fill = data["pool_fill"]
    assert fill["errors"] == 0 and fill["tokens_requested"] == MAX_TOTAL
    assert fill["requests"] == -(-MAX_TOTAL // SERVED)
    assert data["probe_identical_before_after"] is True
    assert data["probe_identical_to_dense"] is True
    assert data["probe_input_lens"] == [16, 85, 155, 224]
    assert data["memory_planned_bytes"] == round(1280.0 * 2**20)
    assert data["memory_allocated_bytes"] == round(1275.5 * 2**20)
    assert data["pariskv_counters"][f"{soak_checks.PK}sparse_request_steps_total"] > 0
    assert data["series"] and "--enable-pariskv" in data["server_commands"]["pariskv"]
    assert "--enable-pariskv" not in data["server_commands"]["dense"]
    assert (tmp_path / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_dense_control_soaks_plain_sglang_without_pariskv_checks(tmp_path, monkeypatch, fake):
    dense = fake()[0]
    rc, data = _main(tmp_path, monkeypatch, {"dense": dense}, "--engine", "dense")
    assert rc == 0 and data["failed"] is False and data["engine"] == "dense"
    assert data["errors"] == data["crashes"] == 0 and data["requests"] > 0
    assert data["free_tokens_idle_before"] == data["free_tokens_idle_after"] == MAX_TOTAL
    assert data["probe_identical_before_after"] is True
    assert set(data["probes"]) == {"dense_before", "dense_after"}
    assert "--enable-pariskv" not in data["server_commands"]["dense"]
    assert data["pariskv_counters"] is None and data["counter_problems"] == []
    assert data["memory_planned_bytes"] is None  # nothing of ParisKV's to check
    with pytest.raises(SystemExit, match="--dense-reference"):
        _main(tmp_path, monkeypatch, {"dense": dense}, "--engine", "dense", "--dense-reference")


def test_the_soak_is_written_before_the_dense_reference_starts(tmp_path, monkeypatch, fake):
    pk = fake()[0]

    def cut_short(*a):  # the machine is taken back while the reference starts
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "dense_probes", cut_short)
    with pytest.raises(KeyboardInterrupt):
        _main(tmp_path, monkeypatch, {"pariskv": pk}, "--dense-reference")
    kept = json.loads((tmp_path / "soak.json").read_text())
    assert kept["dense_reference"] == "not run yet" and kept["probe_identical_to_dense"] is None
    assert kept["failed"] is False and kept["requests"] > 0 and kept["errors"] == 0


def test_a_malformed_request_answered_500_fails_the_run(tmp_path, monkeypatch, fake):
    pk, _ = fake(status_override={"/v1/chat/completions": 500})
    rc, data = _main(tmp_path, monkeypatch, {"pariskv": pk}, "--mix", "malformed=1,short=1")
    assert rc == 1 and data["failed"] is True
    assert data["malformed_rejected_4xx"] < data["malformed_total"]
    assert any("not answered 4xx" in f for f in data["failures"])
    assert all(f.startswith("chat_") and f.endswith(": 500") for f in data["malformed_failures"])
    assert data["errors"] == 0 and data["probe_identical_to_dense"] is None


def test_leaked_kv_tokens_fail_the_run(tmp_path, monkeypatch, fake):
    pk, state = fake(leak_per_abort=3)
    rc, data = _main(tmp_path, monkeypatch, {"pariskv": pk}, "--mix", "abort=1,short=1")
    assert rc == 1 and data["aborts"] > 0 and data["errors"] == 0
    assert data["free_tokens_idle_before"] == MAX_TOTAL
    assert data["free_tokens_idle_after"] == MAX_TOTAL - 3 * state.disconnects
    assert any("free KV tokens" in f for f in data["failures"])


def test_a_fill_that_fails_fails_the_run(tmp_path, monkeypatch, fake):
    pk, _ = fake()
    asked = []

    def failing_fill(url, free, ctx, max_running, timeout, seed=0):
        asked.append((free, ctx))
        return {"requests": 4, "errors": 1, "error_samples": ["HTTP 500: out of memory"]}

    monkeypatch.setattr(soak_server, "fill_pool", failing_fill)
    rc, data = _main(tmp_path, monkeypatch, {"pariskv": pk}, "--mix", "short=1")
    assert rc == 1 and asked == [(MAX_TOTAL, SERVED)]
    assert any("1 of 4 requests filling the KV pool failed" in f for f in data["failures"])


def test_a_pool_the_fill_cannot_reach_is_refused_before_the_load(tmp_path, monkeypatch, fake):
    pk, state = fake(max_running=2)  # 2 requests of SERVED tokens hold far less than the pool
    with pytest.raises(SystemExit, match="--max-total-tokens") as e:
        _main(tmp_path, monkeypatch, {"pariskv": pk}, "--mix", "short=1")
    assert f"{MAX_TOTAL} free tokens" in str(e.value) and str(2 * SERVED) in str(e.value)
    assert state.generated == 0  # neither probes nor load were sent


def test_probes_that_change_over_the_load_are_reported(tmp_path, monkeypatch, fake):
    pk, dense = fake(drift_after_flushes=1)[0], fake()[0]
    rc, data = _main(tmp_path, monkeypatch, {"pariskv": pk, "dense": dense}, "--dense-reference")
    assert data["probe_identical_before_after"] is False
    assert data["probe_identical_to_dense"] is False
    assert data["probes"]["pariskv_before"] == data["probes"]["dense"]
    assert rc == 0  # reported, not one of the failure conditions


# --------------------------------------------------------------------------- pool fill


@pytest.mark.parametrize(
    "free,ctx,cap,out",
    [(100_000, 2048, None, 16), (100_000, 2048, 32, 16), (5, 2048, None, 4), (4096, 2048, 8, 16),
     (352_159, 32768, 32, 16), (4097, 2048, None, 16)],
)  # fmt: skip
def test_the_fill_plan_is_the_fewest_requests_that_hold_the_free_tokens(free, ctx, cap, out):
    lens = pool_fill.fill_plan(free, ctx, cap, out)
    totals = [n + out for n in lens]
    assert all(1 <= n and t <= ctx for n, t in zip(lens, totals))
    assert max(totals) - min(totals) <= 1
    if cap is None or cap * ctx >= free:
        assert sum(totals) == free  # every free token asked for
        assert (len(lens) - 1) * ctx < free  # one request fewer could not hold them
    else:
        assert len(lens) == cap and totals == [ctx] * cap  # as full as cap requests get


def test_a_fill_plan_that_cannot_exist_is_refused():
    with pytest.raises(ValueError, match="no fill"):
        pool_fill.fill_plan(0, 2048, None, 16)
    with pytest.raises(ValueError, match="no fill"):
        pool_fill.fill_plan(1000, 16, None, 16)


def test_the_fill_runs_its_requests_at_once_and_sees_the_pool_full(fake):
    srv, state = fake(answer_delay=0.5)
    got = pool_fill.fill_pool(srv.url, 10_000, SERVED, None, timeout=10, output_len=8)
    assert got["errors"] == 0 and got["requests"] == 5
    assert got["tokens_requested"] == 10_000 == got["peak_used_tokens"]
    assert got["peak_used_fraction"] == 1.0 and state.in_use == 0


def test_a_failed_fill_request_fails_the_fill(fake):
    srv, _ = fake()
    got = pool_fill.fill_pool(srv.url, 3 * (CTX + 2), CTX + 2, None, timeout=10, output_len=1)
    # requests of CTX + 1 input tokens: the fake answers 400 (over its context)
    assert got["errors"] == got["requests"] == 3
    assert "HTTP 400" in got["error_samples"][0]
