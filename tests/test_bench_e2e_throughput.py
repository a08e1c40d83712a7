"""``bench_e2e.py throughput``'s bookkeeping, without engines: which engine stats prove
each mode ran as it should, and the byte floor of short (dense) requests."""

import functools
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_e2e  # noqa: E402
import engine_runs  # noqa: E402
import step_floor  # noqa: E402
import throughput  # noqa: E402
import throughput_results  # noqa: E402

CFG = {"topk": 2048, "sink": 64, "local": 256, "dense_threshold": 8192}


@pytest.mark.parametrize(
    ("input_len", "output_len", "stats", "ok"),
    [
        (131072, 256, {"sparse_request_steps": 512, "dense_request_steps": 0}, True),
        (131072, 256, {"sparse_request_steps": 0, "dense_request_steps": 512}, False),
        (
            4096,
            256,
            {"sparse_request_steps": 0, "dense_request_steps": 512, "sparse_steps": 0},
            True,
        ),
        (4096, 256, {"sparse_request_steps": 3, "dense_request_steps": 509}, False),
        (4096, 256, {}, False),  # the stats file never showed ParisKV
        (8000, 256, {"sparse_request_steps": 60, "dense_request_steps": 200}, True),
        (8000, 256, {"sparse_request_steps": 0, "dense_request_steps": 260}, False),
    ],
)
def test_each_engine_must_have_decoded_as_its_mode_says(input_len, output_len, stats, ok):
    if ok:
        throughput.check_engines_ran(input_len, output_len, CFG, {}, stats)
    else:
        with pytest.raises(RuntimeError, match="did not run as expected"):
            throughput.check_engines_ran(input_len, output_len, CFG, {}, stats)


def test_steps_below_min_sparse_tokens_must_have_decoded_densely():
    """32K requests under the default min_sparse_tokens (65536): one per step attends
    densely, two per step retrieve; with min_sparse_tokens 0 one retrieves."""
    dense = {"sparse_request_steps": 0, "dense_request_steps": 512}
    sparse = {"sparse_request_steps": 512, "dense_request_steps": 0}
    throughput.check_engines_ran(32768, 256, CFG, {}, dense, max_batch=1)
    throughput.check_engines_ran(32768, 256, CFG, {}, sparse, max_batch=2)
    throughput.check_engines_ran(32768, 256, {**CFG, "min_sparse_tokens": 0}, {}, sparse)
    for stats, batch in ((sparse, 1), (dense, 2)):
        with pytest.raises(RuntimeError, match="did not run as expected"):
            throughput.check_engines_ran(32768, 256, CFG, {}, stats, max_batch=batch)


def test_a_dense_engine_with_pariskv_stats_is_refused():
    with pytest.raises(RuntimeError, match="dense stats"):
        throughput.check_engines_ran(
            131072, 256, CFG, {"decode_steps": 1}, {"sparse_request_steps": 1}
        )


def test_short_requests_have_the_dense_floor_and_long_ones_a_smaller_one():
    shape = step_floor.LLAMA_8B
    for n in (1024, 8192):
        assert step_floor.step_bytes(shape, n, 1, CFG) == step_floor.step_bytes(shape, n, 1, None)
    long_dense = step_floor.step_bytes(shape, 131072, 1, None)["per_request"]
    long_sparse = step_floor.step_bytes(shape, 131072, 1, CFG)["per_request"]
    kv_row = 2 * 2 * shape["head_dim"] * shape["num_key_value_heads"] * shape["num_hidden_layers"]
    assert long_dense == 131072 * kv_row
    assert 2336 * kv_row < long_sparse < long_dense / 10  # attended rows + codes read


def test_a_step_below_min_sparse_tokens_has_the_dense_floor():
    shape, cfg = step_floor.LLAMA_8B, {**CFG, "min_sparse_tokens": 65536}
    dense = step_floor.step_bytes(shape, 32768, 1, None)
    assert step_floor.step_bytes(shape, 32768, 1, cfg) == dense  # 32K < 64K: dense step
    assert step_floor.step_bytes(shape, 32768, 2, cfg)["per_request"] < dense["per_request"]


def test_pariskv_options_reach_the_pariskv_engine_config(monkeypatch):
    """``throughput --min-sparse-tokens / --calibration / --host-pool-gb`` go into the
    ParisKV engine's config (the dense engine gets none); without them the plugin's
    defaults apply."""
    seen = []

    def fake_run(inputs, batches, output_len, cfg, **kw):
        seen.append(cfg)
        return None  # "the other mode is still missing": main returns before printing

    monkeypatch.setattr(bench_e2e, "run_throughput", fake_run)
    argv = ["throughput", "--inputs", "131072", "--batches", "1"]
    assert bench_e2e.main([*argv, "--min-sparse-tokens", "0"]) == 0
    assert bench_e2e.main(argv) == 0
    assert seen[0]["min_sparse_tokens"] == 0
    assert "min_sparse_tokens" not in seen[1]
    assert bench_e2e.main([*argv, "--calibration", "cal.json"]) == 0
    assert seen[2]["calibration"] == str(Path("cal.json").resolve())
    assert "calibration" not in seen[1]
    assert bench_e2e.main([*argv, "--host-pool-gb", "100"]) == 0
    assert seen[3]["offload"] == "host" and seen[3]["host_pool_gb"] == 100.0
    assert "offload" not in seen[1]


def _row(b):
    return {"batch": b, "ms_per_token": 10.0 + b, "tok_s": 100.0 * b}


def test_an_engine_run_cut_short_resumes_with_the_batches_it_lacks(tmp_path):
    """Rows saved as measured survive a run killed mid-way; the same call again measures
    only the missing batches and sums both runs' counters; another setup is refused."""
    saved, key = tmp_path / "throughput_pariskv_131072.json", {"config": {"topk": (1, 2)}}
    asked = []

    def measure(todo, on_partial, cut_after=None):
        asked.append(list(todo))
        rows = []
        for b in todo:
            rows.append(_row(b))
            part = {"rows": list(rows), "capacity_tokens": 900, "stats": {"decode_steps": 5}}
            on_partial(part)
            if b == cut_after:
                raise RuntimeError("time limit")
        return part

    with pytest.raises(RuntimeError, match="time limit"):
        throughput._resume_engine(saved, key, True, [1, 2, 4],
                                 lambda t, on: measure(t, on, cut_after=2))  # fmt: skip
    got = throughput._resume_engine(saved, key, True, [1, 2, 4], measure)
    assert asked == [[1, 2, 4], [4]]
    assert [r["batch"] for r in got["rows"]] == [1, 2, 4]
    assert got["rows"] == [_row(1), _row(2), _row(4)]
    assert got["stats"] == {"decode_steps": 10} and got["capacity_tokens"] == 900
    assert throughput._resume_engine(saved, key, False, [1, 2, 4], measure) == got
    assert throughput._resume_engine(saved, key, True, [1, 2, 4], measure) == got
    assert asked == [[1, 2, 4], [4]]  # nothing left to measure
    with pytest.raises(SystemExit, match="another setup"):
        throughput._resume_engine(saved, {"config": None}, True, [1], measure)
    assert throughput._resume_engine(tmp_path / "none.json", key, False, [1], measure) is None


def _two_partials_then_result(out_q):
    out_q.put({"partial": {"rows": [1]}})
    out_q.put({"partial": {"rows": [1, 2]}})
    out_q.put({"rows": [1, 2], "done": True})


def _fails_with_a_thread_left(out_q):
    import threading

    threading.Thread(target=threading.Event().wait).start()  # never ends, not a daemon
    raise ValueError("engine start failed")


def _queue_before_last_argument(out_q, flag=False):
    out_q.put({"flag": flag})


def test_run_isolated_hands_partial_results_over_before_the_result():
    seen = []
    res = engine_runs._run_isolated(_two_partials_then_result, on_partial=seen.append)
    assert seen == [{"rows": [1]}, {"rows": [1, 2]}]
    assert res == {"rows": [1, 2], "done": True}


def test_run_isolated_reports_a_worker_that_raises_and_leaves_threads_running():
    """An engine leaves non-daemon threads behind: the failure still reaches the caller,
    and the child process ends instead of keeping the caller waiting."""
    with pytest.raises(RuntimeError, match="engine start failed"):
        engine_runs._run_isolated(_fails_with_a_thread_left)


def test_run_isolated_refuses_a_worker_whose_queue_is_not_its_last_argument():
    with pytest.raises(RuntimeError, match="multiple values for argument 'out_q'"):
        engine_runs._run_isolated(_queue_before_last_argument, True)


def test_measure_engine_gives_the_worker_each_argument_under_its_own_name(monkeypatch):
    """The arguments _measure_engine passes line up with _throughput_worker's parameters
    (the queue last, by keyword, as _run_isolated passes it)."""
    import inspect

    calls = []
    monkeypatch.setattr(
        throughput, "_run_isolated", lambda target, *a, **kw: calls.append((target, a))
    )
    throughput._measure_engine("dir", {"topk": 8}, 4096, 4, 256, {"e": 1}, 3, True, [1, 2], None)
    ((target, args),) = calls
    bound = inspect.signature(target).bind(*args, out_q="queue").arguments
    assert bound == {
        "model_dir": "dir",
        "pariskv": {"topk": 8},
        "input_len": 4096,
        "batches": [1, 2],
        "max_running": 4,
        "output_len": 256,
        "engine_kwargs": {"e": 1},
        "ttft_repeats": 3,
        "grow_prompts": True,
        "out_q": "queue",
    }


def test_cases_cover_every_batch_either_engine_ran_and_the_best_of_each_is_compared(
    tmp_path, monkeypatch
):
    """Dense's best batch may not fit ParisKV and ParisKV's may not be run densely: the
    cases hold the union, and max_throughput compares each engine at its own best. A
    dense engine on another backend saves under its own name and gets that backend."""
    rows = {None: [(1, 100.0), (2, 180.0), (6, 212.8)], "pkv": [(1, 130.0), (2, 250.0), (5, 457.6)]}
    asked = []

    def fake_measure(model_dir, mcfg, n, max_running, output_len, engine, reps, grow, todo,
                     on_partial):  # fmt: skip
        asked.append((mcfg is None, engine, max_running, list(todo)))
        mine = rows[None if mcfg is None else "pkv"]
        got = [{"batch": b, "tok_s": t, "ms_per_token": 1000 * b / t, "prefill_s": 1.0}
               for b, t in mine if b in todo]  # fmt: skip
        stats = {} if mcfg is None else {"sparse_request_steps": 9}
        return {"rows": got, "capacity_tokens": 10**6, "stats": stats}

    monkeypatch.setattr(throughput, "_measure_engine", fake_measure)
    monkeypatch.setattr(throughput, "hbm_bandwidth_gbs", lambda: 4000.0)
    runs = tmp_path / "runs"
    res = throughput.run_throughput([131072], [1, 2, 5, 6], 256, CFG, runs_dir=runs,
                                   dense_backend="fa3")  # fmt: skip
    assert asked[0] == (True, {"attention_backend": "fa3"}, 6, [1, 2, 5, 6])
    assert asked[1] == (False, {}, 6, [1, 2, 5, 6])
    assert (runs / "throughput_dense-fa3_131072.json").exists()
    assert (runs / "throughput_pariskv_131072.json").exists()
    assert [c["batch"] for c in res["cases"]] == [1, 2, 5, 6]
    by_b = {c["batch"]: c for c in res["cases"]}
    assert by_b[5]["dense_error"] == "not run" and by_b[6]["pariskv_error"] == "not run"
    assert by_b[2]["speedup"] == pytest.approx(250.0 / 180.0)
    assert res["dense_backend"] == "fa3"
    (best,) = res["max_throughput"]
    assert best == {
        "input_len": 131072,
        "dense_backend": "fa3",
        "dense_best_batch": 6,
        "dense_best_tok_s": 212.8,
        "pariskv_best_batch": 5,
        "pariskv_best_tok_s": 457.6,
        "ratio": pytest.approx(457.6 / 212.8),
        "dense_best_by_backend": {"fa3": {"batch": 6, "tok_s": 212.8}},
    }


def _fake_dense_only(monkeypatch, stats):
    """run_throughput's engines replaced: the dense one gives two batches with ``stats``;
    the ParisKV one must not be started."""

    def fake_measure(model_dir, mcfg, n, max_running, output_len, engine, reps, grow, todo,
                     on_partial):  # fmt: skip
        assert mcfg is None, "a dense-only run started the ParisKV engine"
        rows = [{"batch": b, "tok_s": 100.0 * b, "ms_per_token": 10.0, "prefill_s": 1.0}
                for b in todo]  # fmt: skip
        return {"rows": rows, "capacity_tokens": 842009, "stats": stats}

    monkeypatch.setattr(throughput, "_measure_engine", fake_measure)
    monkeypatch.setattr(throughput, "hbm_bandwidth_gbs", lambda: 4000.0)


def test_a_dense_run_of_another_backend_is_a_result_without_pariskv_rows(monkeypatch):
    """fa3's dense rows alone are the columns it adds to a table: a result with
    ParisKV's figures None; FlashInfer's dense rows alone wait for ParisKV's."""
    _fake_dense_only(monkeypatch, {})
    run = functools.partial(throughput.run_throughput, [131072], [1, 6], 256, CFG,
                            modes=("dense",))  # fmt: skip
    assert run(dense_backend="flashinfer") is None
    res = run(dense_backend="fa3")
    assert [(c["batch"], c["dense_tok_s"], c["pariskv_tok_s"]) for c in res["cases"]] == [
        (1, 100.0, None),
        (6, 600.0, None),
    ]
    assert all(c["pariskv_error"] == "not run" and "speedup" not in c for c in res["cases"])
    assert res["engines"] == {"131072": {"dense_capacity_tokens": 842009}}
    assert res["max_throughput"] == []
    _fake_dense_only(monkeypatch, {"sparse_request_steps": 3})
    with pytest.raises(RuntimeError, match="dense engine ran ParisKV"):
        run(dense_backend="fa3")


def test_a_dense_only_run_joins_a_table_of_its_device_or_is_refused(tmp_path, monkeypatch):
    """bench_e2e writes fa3's rows alone only as columns of a FlashInfer table of the same
    device and setup; with none it exits 2 and leaves the results file as it was."""
    results = tmp_path / "e2e.json"
    monkeypatch.setattr(bench_e2e, "RESULTS", results)
    monkeypatch.setattr(bench_e2e, "plot", lambda: None)
    info = {"device": "H200", "git_commit": "f" * 40}
    monkeypatch.setattr(bench_e2e, "_device_info", lambda: info)
    _fake_dense_only(monkeypatch, {})
    argv = ["throughput", "--inputs", "131072", "--batches", "1", "6", "--modes", "dense",
            "--dense-backend", "fa3"]  # fmt: skip
    other = _table([(131072, 1, 111.2, 121.5, {"device": "H100"})])
    results.write_text(json.dumps({"throughput": other}))
    assert bench_e2e.main(argv) == 2
    assert json.loads(results.read_text()) == {"throughput": other}
    table = _table([(131072, 1, 111.2, 121.5, {"device": "H200"}),
                    (131072, 5, None, 457.6, {"device": "H200"})])  # fmt: skip
    results.write_text(json.dumps({"throughput": table}))
    assert bench_e2e.main(argv) == 0
    got = json.loads(results.read_text())["throughput"]
    rows = {c["batch"]: c for c in got["cases"]}
    assert rows[1]["dense_fa3_tok_s"] == 100.0 and rows[1]["pariskv_tok_s"] == 121.5
    assert rows[6]["dense_fa3_tok_s"] == 600.0 and rows[6]["dense_fa3_git_commit"] == "fffffff"
    (best,) = got["max_throughput"]
    assert best["dense_backend"] == "fa3" and best["ratio"] == pytest.approx(457.6 / 600.0)


def test_the_dense_backend_option_reaches_run_throughput(monkeypatch):
    seen = []
    monkeypatch.setattr(bench_e2e, "run_throughput", lambda *a, **kw: seen.append(kw))
    argv = ["throughput", "--inputs", "131072", "--batches", "1"]
    assert bench_e2e.main([*argv, "--dense-backend", "fa3"]) == 0
    assert bench_e2e.main(argv) == 0
    assert [kw["dense_backend"] for kw in seen] == ["fa3", "flashinfer"]
    with pytest.raises(SystemExit):
        bench_e2e.main([*argv, "--dense-backend", "triton"])


def test_host_offload_rows_have_no_byte_floor(monkeypatch):
    """With --pariskv-offload host the ParisKV rows read host memory: no HBM byte floor for
    them; the dense rows keep theirs."""

    def fake_measure(model_dir, mcfg, n, max_running, output_len, engine, reps, grow, todo,
                     on_partial):  # fmt: skip
        stats = {} if mcfg is None else {"sparse_request_steps": 9}
        return {"rows": [_row(b) | {"prefill_s": 1.0} for b in todo], "capacity_tokens": 10**7,
                "stats": stats}  # fmt: skip

    monkeypatch.setattr(throughput, "_measure_engine", fake_measure)
    monkeypatch.setattr(throughput, "hbm_bandwidth_gbs", lambda: 4000.0)
    cfg = {**CFG, "offload": "host", "host_pool_gb": 100.0}
    res = throughput.run_throughput([131072], [4], 256, cfg)
    (case,) = res["cases"]
    assert "pariskv_floor_ms" not in case and "pariskv_over_floor" not in case
    assert case["dense_floor_ms"] > 0 and case["speedup"] == pytest.approx(1.0)


class _ClockedEngine:
    """An engine whose calls advance a fake clock: the first long prefill costs 10 s more
    (a one-time cost), every other prefill 1 s, decoding 1 ms per token and request."""

    def __init__(self, clock: list[float]):
        self.clock, self.long_prefills = clock, 0

    def get_server_info(self):
        return {"max_total_num_tokens": 10**6}

    def generate(self, input_ids, sampling_params):
        n = sampling_params["max_new_tokens"]
        if n == 1 and len(input_ids[0]) > 64:
            self.clock[0] += 1.0 + 10.0 * (self.long_prefills == 0)
            self.long_prefills += 1
        else:
            self.clock[0] += 0.001 * n * len(input_ids)
        return [{"output_ids": [0] * n} for _ in input_ids]

    def shutdown(self):
        pass


@pytest.mark.parametrize(("repeats", "ttft"), [(1, 11.0), (3, 1.0)])
def test_time_to_first_token_is_the_median_of_the_repeats(monkeypatch, repeats, ttft):
    """A one-time cost in the first long prefill is the whole TTFT with one prefill, and
    none of it with the median of three; decode time per step is unaffected."""
    import queue

    clock = [0.0]
    monkeypatch.setattr(throughput, "_engine", lambda *a, **kw: _ClockedEngine(clock))
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(throughput, "_read_stats", lambda d: {})
    q = queue.Queue()
    throughput._throughput_worker("m", None, 4096, [1, 2], 2, 256, {}, repeats, False, q)
    while "partial" in (res := q.get()):
        pass
    r1, r2 = res["rows"]
    assert r1["prefill_s"] == pytest.approx(ttft) and len(r1["prefill_s_each"]) == repeats
    assert r2["prefill_s"] == pytest.approx(1.0)  # the one-time cost is paid by then
    assert r1["ms_per_token"] == pytest.approx(1.0) and r2["ms_per_token"] == pytest.approx(2.0)


def test_grown_prompts_are_prefilled_once_and_decode_the_batch_asked(monkeypatch):
    """With grow_prompts each batch decodes its own number of prompts, the earlier batches'
    among them, and only the new ones are prefilled: batches 1, 2, 4 prefill 1 + 1 + 2
    prompts (7 without growing); only the first batch reports a time to first token."""
    import queue

    clock, prefilled, decoded = [0.0], [], []

    class Recording(_ClockedEngine):
        def generate(self, input_ids, sampling_params):
            if sampling_params["max_new_tokens"] == 1 and len(input_ids[0]) > 64:
                prefilled.extend(map(tuple, input_ids))
            elif len(input_ids[0]) > 64:
                decoded.append([tuple(p) for p in input_ids])
            return super().generate(input_ids, sampling_params)

    monkeypatch.setattr(throughput, "_engine", lambda *a, **kw: Recording(clock))
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(throughput, "_read_stats", lambda d: {})
    for grow, want_prefills in ((True, 4), (False, 7)):
        prefilled.clear(), decoded.clear()
        q = queue.Queue()
        throughput._throughput_worker("m", None, 4096, [1, 2, 4], 4, 256, {}, 1, grow, q)
        while "partial" in (res := q.get()):
            pass
        assert len(prefilled) == len(set(prefilled)) == want_prefills
        assert [len(d) for d in decoded] == [1, 1, 2, 2, 4, 4]  # short and long generation
        assert all(set(d) <= set(prefilled) for d in decoded)  # every decode is a radix hit
        if grow:
            assert decoded[2][:1] == decoded[0] and decoded[4][:2] == decoded[2]
        rows = res["rows"]
        assert [r["ms_per_token"] for r in rows] == pytest.approx([1.0, 2.0, 4.0])
        assert ["prefill_s" in r for r in rows] == [True, not grow, not grow]


def _table(rows, config=None, bw=3000.0):
    cases = [
        {"input_len": n, "batch": b, "dense_tok_s": d, "pariskv_tok_s": p, **extra}
        for n, b, d, p, extra in rows
    ]
    return {"config": config or CFG, "output_len": 256, "dense_backend": "flashinfer",
            "hbm_copy_gbs": bw, "engines": {str(n): {"n": n} for n, *_ in rows},
            "cases": cases}  # fmt: skip


def test_a_run_replaces_its_rows_and_keeps_the_others_of_the_same_device_and_setup():
    h100 = {"device": "H100", "git_commit": "aaaaaaa"}
    old = _table([(32768, 1, 137.7, 116.4, h100), (131072, 1, 86.4, 106.9, h100),
                  (131072, 3, 127.4, None, h100), (131072, 2, 112.6, 193.1,
                  {"device": "H200", "git_commit": "bbbbbbb"})])  # fmt: skip
    old["hbm_copy_gbs_by_input"] = {"32768": 3022.0}
    new = _table([(131072, 1, 81.9, 106.3, {}), (131072, 2, 112.6, 193.6, {})], bw=3020.0)
    got = throughput_results.merge_throughput_results(old, new, "H100", "ccccccc")
    rows = {(c["input_len"], c["batch"]): c for c in got["cases"]}
    assert sorted(rows) == [(32768, 1), (131072, 1), (131072, 2), (131072, 3)]
    assert rows[(131072, 1)]["pariskv_tok_s"] == 106.3  # the new measurement
    assert rows[(131072, 2)]["git_commit"] == "ccccccc"  # the H200 row gave way
    assert rows[(131072, 3)]["git_commit"] == "aaaaaaa"  # kept: same device, not re-run
    assert got["hbm_copy_gbs_by_input"] == {"32768": 3022.0, "131072": 3020.0}
    assert set(got["engines"]) == {"32768", "131072"}
    best = {b["input_len"]: b for b in got["max_throughput"]}
    assert best[131072]["dense_best_batch"] == 3 and best[131072]["pariskv_best_batch"] == 2
    assert best[131072]["ratio"] == pytest.approx(193.6 / 127.4)
    assert best[131072]["device"] == "H100"


def test_a_run_on_another_dense_backend_adds_its_columns_and_the_faster_dense_is_compared():
    """fa3 dense rows into a FlashInfer table of the same device and setup: the rows keep
    FlashInfer's dense and ParisKV's figures and gain fa3's; a batch only fa3 ran becomes a
    row; the best throughput compares ParisKV with the faster backend, and says which."""
    dev = {"device": "H200", "git_commit": "aaaaaaa"}
    old = _table([(131072, 1, 111.2, 121.5, dev), (131072, 2, 156.1, 223.7, dev),
                  (131072, 5, None, 457.6, dev)])  # fmt: skip
    fa3 = _table([(131072, 1, 115.0, 121.0, {}), (131072, 2, 150.0, 224.0, {}),
                  (131072, 6, 230.0, None, {})])  # fmt: skip
    fa3["dense_backend"] = "fa3"
    got = throughput_results.merge_throughput_results(old, fa3, "H200", "bbbbbbb")
    rows = {c["batch"]: c for c in got["cases"]}
    assert sorted(rows) == [1, 2, 5, 6] and got["dense_backend"] == "flashinfer"
    assert rows[1]["dense_tok_s"] == 111.2 and rows[1]["dense_fa3_tok_s"] == 115.0
    assert rows[1]["pariskv_tok_s"] == 121.5  # the table's own ParisKV row
    assert rows[1]["dense_fa3_git_commit"] == "bbbbbbb" and rows[1]["git_commit"] == "aaaaaaa"
    assert rows[6]["dense_fa3_tok_s"] == 230.0 and rows[6].get("dense_tok_s") is None
    (best,) = got["max_throughput"]
    assert best["dense_backend"] == "fa3" and best["dense_best_batch"] == 6
    assert best["dense_best_tok_s"] == 230.0 and best["pariskv_best_tok_s"] == 457.6
    assert best["dense_best_by_backend"] == {
        "flashinfer": {"batch": 2, "tok_s": 156.1},
        "fa3": {"batch": 6, "tok_s": 230.0},
    }
    assert best["device"] == "H200"
    # a FlashInfer rerun of a row drops that row's older fa3 columns, keeps the others
    again = throughput_results.merge_throughput_results(
        got, _table([(131072, 1, 112.0, 122.0, {})]), "H200", "ccccccc"
    )
    rows = {c["batch"]: c for c in again["cases"]}
    assert "dense_fa3_tok_s" not in rows[1] and rows[2]["dense_fa3_tok_s"] == 150.0


def test_another_device_or_setup_starts_a_new_table():
    old = _table([(32768, 1, 137.7, 116.4, {"device": "H100"})])
    new = _table([(131072, 1, 81.9, 106.3, {})])
    for o, device in (
        (old, "H200"),
        (old | {"config": {**CFG, "topk": 512}}, "H100"),
        (None, "H100"),
    ):
        got = throughput_results.merge_throughput_results(o, new, device, "c")
        assert [(c["input_len"], c["batch"]) for c in got["cases"]] == [(131072, 1)]
        assert set(got["engines"]) == {"131072"}
