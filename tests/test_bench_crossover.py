"""bench_crossover's summary and crossover of a throughput run (CPU: engines need a GPU)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_crossover as bench  # noqa: E402


def _case(n, b, dense, pkv):
    return {"input_len": n, "batch": b, "dense_ms_per_token": dense, "pariskv_ms_per_token": pkv}


def _rows(*speedups_at):
    return [{"tokens_per_step": t, "batch": 1, "speedup": s} for t, s in speedups_at]


def test_rows_are_sorted_by_tokens_per_step_and_unrun_cases_left_out():
    rows = bench.summarize(
        [_case(32768, 2, 9.4, 9.15), _case(32768, 1, 7.26, 8.59), _case(131072, 4, 20.0, None)]
    )
    assert [(r["tokens_per_step"], r["batch"]) for r in rows] == [(32768, 1), (65536, 2)]
    assert rows[0]["speedup"] == pytest.approx(7.26 / 8.59)


@pytest.mark.parametrize(
    "points,want",
    [
        ([(32768, 0.85), (65536, 1.03), (131072, 1.30)], 32768 + 32768 * 0.15 / 0.18),
        ([(16384, 1.1), (32768, 1.2)], 16384),  # wins everywhere: the smallest size
        ([(16384, 0.7), (32768, 0.9)], None),  # loses everywhere: no crossover in range
        # a win below a later loss does not count: after the crossover every size wins
        ([(16384, 1.01), (32768, 0.95), (65536, 1.15)], 32768 + 32768 * 0.05 / 0.2),
        ([], None),
    ],
)
def test_the_crossover_is_where_the_speedup_reaches_one_for_good(points, want):
    got = bench.crossover(_rows(*points))
    assert got == (pytest.approx(want) if want is not None else None)


def test_inputs_at_or_below_the_dense_threshold_are_refused():
    with pytest.raises(SystemExit, match="above the dense threshold"):
        bench.main(["--inputs", "4096"])


def test_a_measured_run_writes_the_crossover_and_the_default(tmp_path, monkeypatch):
    from sglang_pariskv.config import DEFAULT_MIN_SPARSE_TOKENS

    cases = [_case(32768, 1, 7.26, 8.59), _case(65536, 1, 9.0, 8.7), _case(98304, 1, 10.5, 9.0)]
    seen = {}

    def fake_run(inputs, batches, output_len, cfg, **kw):
        seen.update(cfg=cfg, inputs=inputs, grow=kw["grow_prompts"])
        return {"model": "m", "cases": cases}

    monkeypatch.setattr(bench, "run_throughput", fake_run)
    monkeypatch.setattr(bench, "_device_info", lambda: {"device": "test"})
    out = tmp_path / "c.json"
    bench.main(["--inputs", "32768", "65536", "98304", "--out", str(out), "--grow-prompts"])
    assert seen["grow"] is True
    bench.main(["--inputs", "32768", "65536", "98304", "--out", str(out)])
    assert seen["grow"] is False
    data = json.loads(out.read_text())
    assert seen["cfg"]["min_sparse_tokens"] == 0  # ParisKV retrieves at every size
    assert data["default_min_sparse_tokens"] == DEFAULT_MIN_SPARSE_TOKENS
    want = 32768 + 32768 * (1 - 7.26 / 8.59) / (9.0 / 8.7 - 7.26 / 8.59)
    assert data["crossover_tokens"] == pytest.approx(want)
    assert [r["tokens_per_step"] for r in data["cases"]] == [32768, 65536, 98304]
