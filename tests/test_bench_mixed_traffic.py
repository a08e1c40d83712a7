"""bench_mixed_traffic on the CPU: the workload generator, the statistics, and the client
against an in-process server that streams like SGLang's ``/v1/completions`` with known delays."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_mixed_traffic as bench  # noqa: E402
import mixed_runs  # noqa: E402
import mixed_workload  # noqa: E402
import traffic_stats  # noqa: E402

from tests.fake_completions import fake_completions

# --------------------------------------------------------------------------- workload


def _wl(n=400, rate=2.0, frac=0.1, seed=0, short=(1024, 4096), long=(65536, 131072)):
    return mixed_workload.make_workload(n, rate, frac, short, long, seed)


def test_workload_is_a_function_of_its_seed():
    assert _wl(seed=3) == _wl(seed=3)
    a, b = _wl(seed=3), _wl(seed=4)
    assert [r.input_len for r in a] != [r.input_len for r in b]
    assert [r.cls for r in a] != [r.cls for r in b]


@pytest.mark.parametrize("n,frac", [(60, 0.1), (400, 0.1), (7, 0.5), (50, 0.0), (20, 1.0)])
def test_class_counts_and_input_ranges(n, frac):
    reqs = _wl(n=n, frac=frac, seed=n)
    assert [r.index for r in reqs] == list(range(n))
    assert sum(r.cls == "long" for r in reqs) == round(n * frac)
    for r in reqs:
        lo, hi = (1024, 4096) if r.cls == "short" else (65536, 131072)
        assert lo <= r.input_len <= hi


def test_input_lengths_reach_both_ends_of_the_range():
    reqs = _wl(n=2000, frac=0.5, short=(10, 13), long=(100, 102))
    for cls, want in (("short", {10, 11, 12, 13}), ("long", {100, 101, 102})):
        assert {r.input_len for r in reqs if r.cls == cls} == want


@pytest.mark.parametrize("rate", [0.5, 2.0, 10.0])
def test_arrivals_are_poisson_at_the_rate(rate):
    reqs = _wl(n=20000, rate=rate, seed=1)
    t = np.array([r.arrival_s for r in reqs])
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)  # exponential: CV 1
    # Poisson counts: in windows of 10 mean gaps, variance ~ mean ~ 10
    counts = np.bincount((t // (10 / rate)).astype(int))[:-1]
    assert counts.mean() == pytest.approx(10, rel=0.05)
    assert counts.var() == pytest.approx(10, rel=0.2)


def test_every_rate_replays_the_same_requests_compressed():
    slow, fast = _wl(rate=0.5, seed=2), _wl(rate=2.0, seed=2)
    assert [(r.cls, r.input_len) for r in slow] == [(r.cls, r.input_len) for r in fast]
    assert [r.arrival_s for r in fast] == pytest.approx([r.arrival_s / 4 for r in slow])


def test_bad_workloads_are_refused():
    with pytest.raises(ValueError):
        _wl(rate=0)
    with pytest.raises(ValueError):
        _wl(frac=1.5)
    with pytest.raises(ValueError):
        _wl(short=(10, 5))


def test_prompt_ids():
    reqs = _wl(n=3, short=(50, 60), long=(50, 60))
    a = mixed_workload.prompt_ids(0, reqs[0])
    assert a == mixed_workload.prompt_ids(0, reqs[0]) and len(a) == reqs[0].input_len
    assert all(mixed_workload.TOKEN_ID_RANGE[0] <= x < mixed_workload.TOKEN_ID_RANGE[1] for x in a)
    assert a[:50] != mixed_workload.prompt_ids(0, reqs[1])[:50]  # no shared prefix between requests
    assert a != mixed_workload.prompt_ids(1, reqs[0])


# --------------------------------------------------------------------------- statistics


def test_percentile_matches_numpy_and_hand_values():
    assert traffic_stats.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert traffic_stats.percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert (
        traffic_stats.percentile([4, 1, 3, 2], 0) == 1
        and traffic_stats.percentile([4, 1, 3, 2], 100) == 4
    )
    assert traffic_stats.percentile([7.0], 99) == 7.0
    assert traffic_stats.percentile([], 50) is None
    rng = np.random.default_rng(0)
    for n in (2, 5, 33, 100):
        xs = rng.exponential(size=n).tolist()
        for q in (1, 50, 90, 99):
            assert traffic_stats.percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def _rec(cls, start, first, last, tokens, error=None, input_len=100):
    return {"index": 0, "cls": cls, "input_len": input_len, "start_s": start,
            "first_s": first, "last_s": last, "tokens": tokens, "error": error}  # fmt: skip


def test_tpot_excludes_the_first_token():
    assert traffic_stats.tpot_s(_rec("short", 0.0, 0.5, 2.5, 11)) == pytest.approx(0.2)
    assert traffic_stats.tpot_s(_rec("short", 0.0, 0.5, 0.5, 1)) is None


def test_class_stats_by_hand():
    recs = [
        _rec("short", 0.0, 0.1, 1.1, 11, input_len=1000),  # TTFT 100 ms, TPOT 100 ms
        _rec("short", 1.0, 1.3, 2.3, 21, input_len=3000),  # TTFT 300 ms, TPOT 50 ms
        _rec("short", 2.0, 2.2, 2.6, 5, input_len=2000),  # TTFT 200 ms, TPOT 100 ms
        _rec("long", 0.5, 2.5, 4.5, 11, input_len=70000),  # TTFT 2000 ms, TPOT 200 ms
    ]
    s = traffic_stats.class_stats(recs, "short", wall_s=4.0)
    assert s["requests"] == 3 and s["errors"] == 0
    assert s["input_tokens_mean"] == pytest.approx(2000)
    assert s["ttft_p50_ms"] == pytest.approx(200)
    assert s["ttft_p99_ms"] == pytest.approx(200 + 0.98 * 100)
    assert s["tpot_p50_ms"] == pytest.approx(100)
    assert s["tpot_p99_ms"] == pytest.approx(100)
    assert s["output_tokens"] == 37 and s["output_tok_s"] == pytest.approx(37 / 4.0)
    lng = traffic_stats.class_stats(recs, "long", wall_s=4.0)
    assert lng["ttft_p50_ms"] == pytest.approx(2000) and lng["tpot_p50_ms"] == pytest.approx(200)
    assert lng["output_tok_s"] == pytest.approx(11 / 4.0)
    bad = traffic_stats.class_stats([*recs, _rec("long", 0, None, None, 0, error="x")], "long", 4.0)
    assert bad["errors"] == 1 and bad["requests"] == 2 and bad["output_tokens"] == 11


# --------------------------------------------------------------------------- the client

#: The fake server's delays: a prompt longer than LONG_AT tokens is "long".
LONG_AT = 100
DELAYS = {"short": (0.06, 0.010), "long": (0.20, 0.025)}  # (TTFT, time per token) in s
OUT = 8


def _fake_server(log: list, fail: dict | None = None):
    """SGLang's streamed ``/v1/completions`` (:func:`fake_completions`): a prompt longer
    than LONG_AT tokens answers with the long class's delays; ``fail`` maps a prompt's
    first token id to a failure."""
    fail = fail or {}

    def plan(req):
        ids = req["prompt"]
        return DELAYS["long" if len(ids) > LONG_AT else "short"], fail.get(ids[0])

    return fake_completions(log, plan)


def _small_workload(n=12, rate=10.0, seed=5):
    return mixed_workload.make_workload(n, rate, 0.25, (10, 30), (150, 250), seed)


def test_client_times_follow_the_stream():
    log: list = []
    srv = _fake_server(log)
    reqs = _small_workload()
    try:
        t0 = time.perf_counter()
        got = mixed_runs.run_rate(srv.url, reqs, OUT, seed=5, max_seconds=60, request_timeout=30)
    finally:
        srv.close()
    assert got["sent"] == len(reqs) == len(got["records"]) == len(log)
    # what was sent: every request's own prompt, exactly OUT tokens, streamed
    by_first = {e["req"]["prompt"][0]: e for e in log}
    for r in reqs:
        e = by_first[mixed_workload.prompt_ids(5, r)[0]]
        assert e["req"]["prompt"] == mixed_workload.prompt_ids(5, r)
        assert e["req"]["stream"] is True
        assert e["req"]["max_tokens"] == OUT and e["req"]["ignore_eos"] is True
        # open loop: each request left at its Poisson arrival time
        assert e["received"] - t0 == pytest.approx(r.arrival_s, abs=0.05)
    for rec, r in zip(got["records"], reqs):
        assert rec["index"] == r.index and rec["error"] is None and rec["tokens"] == OUT
        assert rec["start_s"] == pytest.approx(r.arrival_s, abs=0.05)
        ttft, itl = DELAYS[r.cls]
        assert ttft <= rec["first_s"] - rec["start_s"] < ttft + 0.05
        # The client stamps tokens as it reads them: a first token read late (a loaded
        # machine) shortens the measured span, so the lower bound has a little slack too.
        assert itl - 0.002 <= traffic_stats.tpot_s(rec) < itl + 0.01
    # the wall time covers the last arrival and its request
    last = reqs[-1]
    assert got["wall_s"] >= last.arrival_s + DELAYS[last.cls][0] + (OUT - 1) * DELAYS[last.cls][1]
    for cls in mixed_workload.CLASSES:
        s = traffic_stats.class_stats(got["records"], cls, got["wall_s"])
        ttft, itl = DELAYS[cls]
        assert s["requests"] == sum(r.cls == cls for r in reqs) and s["errors"] == 0
        assert ttft * 1000 <= s["ttft_p50_ms"] <= s["ttft_p99_ms"] < ttft * 1000 + 50
        assert itl * 1000 <= s["tpot_p50_ms"] <= s["tpot_p99_ms"] < itl * 1000 + 10
        assert s["output_tok_s"] == pytest.approx(s["requests"] * OUT / got["wall_s"])


def test_max_seconds_stops_sending():
    log: list = []
    srv = _fake_server(log)
    reqs = _small_workload(n=30, rate=10.0)
    cut = 1.0
    try:
        got = mixed_runs.run_rate(srv.url, reqs, OUT, seed=5, max_seconds=cut, request_timeout=30)
    finally:
        srv.close()
    want = sum(r.arrival_s <= cut for r in reqs)
    assert 0 < want < len(reqs)
    assert got["sent"] == len(log) == len(got["records"]) == want


@pytest.mark.parametrize(
    "how,match",
    [
        ("error_chunk", "server error.*out of memory"),
        ("http_500", "HTTP 500"),
        ("short", f"{OUT - 1} output tokens, expected {OUT}"),
        ("hang", "TimeoutError|timed out"),
    ],
)
def test_a_failed_request_fails_the_run_and_stops_sending(how, match):
    reqs = _small_workload(n=20, rate=10.0)
    bad = reqs[1]
    log: list = []
    srv = _fake_server(log, fail={mixed_workload.prompt_ids(5, bad)[0]: how})
    try:
        with pytest.raises(RuntimeError, match=match) as err:
            mixed_runs.run_rate(srv.url, reqs, OUT, seed=5, max_seconds=60, request_timeout=0.5)
    finally:
        srv.close()
    assert f"request {bad.index} ({bad.cls}" in str(err.value)
    assert len(log) < len(reqs)  # the rest of the rate was not sent


def test_client_talks_to_loopback_only():
    req = _small_workload(n=1)[0]
    with pytest.raises(ValueError, match="127.0.0.1"):
        mixed_runs.run_rate("http://localhost:30000", [req], OUT, 0, 1.0, 1.0)


# --------------------------------------------------------------------------- results


def _measure(url: str, args, stats: dict, rates: list[float], on_rate=None, cut=None) -> dict:
    """What run_server returns, measured against the fake server (``cut``: the rate after
    which the run is killed, as a device call's time limit would)."""
    result = {"server_command": "fake", "server_info": {}, "rates": {}, "stats": {}}
    for rate in rates:
        reqs = mixed_workload.make_workload(args.requests, rate, args.long_fraction,
                                            args.short_input, args.long_input,
                                            args.seed)  # fmt: skip
        got = mixed_runs.run_rate(url, reqs, args.output_len, args.seed, args.max_seconds,
                                  args.request_timeout)  # fmt: skip
        result["rates"][str(rate)] = got
        if on_rate is not None:
            on_rate(result | {"stats": stats})
        if rate == cut:
            raise KeyboardInterrupt("time limit")
    return result | {"stats": stats}


def _split_runs(monkeypatch, tmp_path, run_server, requests: int):
    """bench.main's servers replaced by ``run_server``; the results path and the options
    of a two-rate workload with a runs dir."""
    monkeypatch.setattr(bench, "run_server", run_server)
    monkeypatch.setattr(bench.signal, "signal", lambda *a: None)
    monkeypatch.setattr(bench, "_device_info", lambda: {"device": "fake GPU"})  # imports sglang
    out = tmp_path / "mixed.json"
    common = ["--rates", "20", "40", "--requests", str(requests), "--long-fraction", "0.25",
              "--short-input", "10-30", "--long-input", "150-250", "--output-len", str(OUT),
              "--runs-dir", str(tmp_path / "runs"), "--log-dir", str(tmp_path / "logs"),
              "--out", str(out), "--model-path", "fake-model"]  # fmt: skip
    return out, common


def test_two_invocations_make_one_comparison(tmp_path, monkeypatch):
    """--modes dense then --modes pariskv with one --runs-dir: one results file with
    both servers' numbers per rate and class, and its PNG; a changed workload refuses."""
    srv = _fake_server([])
    stats = {"dense": {}, "pariskv": {"sparse_request_steps": 40, "dense_request_steps": 90}}
    out, common = _split_runs(
        monkeypatch,
        tmp_path,
        lambda mode, args, m, f, d, rates, on_rate: _measure(srv.url, args, stats[mode], rates),
        requests=8,
    )
    try:
        assert bench.main([*common, "--modes", "dense"]) == 0
        assert not out.exists()
        assert bench.main([*common, "--modes", "pariskv"]) == 0
        with pytest.raises(SystemExit, match="another workload"):
            bench.main([*common, "--seed", "1", "--modes", "pariskv"])
    finally:
        srv.close()
    data = json.loads(out.read_text())
    assert data["device"] == "fake GPU" and data["model"] == "fake-model"
    assert list(data["rates"]) == ["20.0", "40.0"]
    assert data["pariskv_stats"] == stats["pariskv"]
    for per in data["rates"].values():
        for mode in traffic_stats.MODES:
            total = 0.0
            for cls in mixed_workload.CLASSES:
                s = per[cls][mode]
                assert s["errors"] == 0 and s["requests"] == {"short": 6, "long": 2}[cls]
                assert DELAYS[cls][1] * 1000 <= s["tpot_p50_ms"] < DELAYS[cls][1] * 1000 + 10
                total += s["output_tok_s"]
            assert per["total_output_tok_s"][mode] == pytest.approx(total)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_cut_short_resumes_at_the_rate_it_did_not_finish(tmp_path, monkeypatch):
    """A server run killed after its first rate keeps that rate in --runs-dir; the same
    command again runs only the missing rate and sums both runs' counters."""
    srv = _fake_server([])
    stats = {"dense": {}, "pariskv": {"sparse_request_steps": 40, "dense_request_steps": 90}}
    ran = []

    def fake_run_server(mode, args, m, f, d, rates, on_rate):
        ran.append((mode, list(rates)))
        cut = 20.0 if len(ran) == 1 else None
        return _measure(srv.url, args, stats[mode], rates, on_rate, cut)

    out, common = _split_runs(monkeypatch, tmp_path, fake_run_server, requests=4)
    try:
        with pytest.raises(KeyboardInterrupt):
            bench.main([*common, "--modes", "pariskv"])
        saved = json.loads((tmp_path / "runs" / "mixed_pariskv.json").read_text())
        assert list(saved["rates"]) == ["20.0"]
        assert bench.main([*common, "--modes", "pariskv"]) == 0
        assert bench.main([*common, "--modes", "dense"]) == 0
    finally:
        srv.close()
    assert ran == [("pariskv", [20.0, 40.0]), ("pariskv", [40.0]), ("dense", [20.0, 40.0])]
    data = json.loads(out.read_text())
    assert list(data["rates"]) == ["20.0", "40.0"]
    assert data["pariskv_stats"] == {"sparse_request_steps": 80, "dense_request_steps": 180}
    for per in data["rates"].values():
        assert per["sent"] == {"dense": 4, "pariskv": 4}


@pytest.mark.parametrize(
    "stats,sent_long,match",
    [
        ({"dense": {}, "pariskv": {"dense_request_steps": 9}}, 3, "no sparse decode steps"),
        ({"dense": {"sparse_request_steps": 1}, "pariskv": {"sparse_request_steps": 9}}, 3,
         "dense server ran ParisKV"),
        ({"dense": {}, "pariskv": {}}, 0, "wrote no stats files"),
    ],
)  # fmt: skip
def test_results_refused_unless_pariskv_ran_on_its_server_only(stats, sent_long, match):
    with pytest.raises(RuntimeError, match=match):
        bench.check_pariskv_ran(stats, sent_long)
    # what passes: sparse steps with long documents sent; dense steps alone without any
    bench.check_pariskv_ran({"dense": {}, "pariskv": {"sparse_request_steps": 1}}, 3)
    bench.check_pariskv_ran({"dense": {}, "pariskv": {"dense_request_steps": 5}}, 0)
