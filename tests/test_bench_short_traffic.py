"""bench_short_traffic's summary of a throughput run (CPU: the engines need a GPU)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_short_traffic as bench  # noqa: E402


def test_ratios_are_pariskv_over_dense_and_missing_rows_stay_missing():
    run = {
        "cases": [
            {"input_len": 4096, "batch": 1, "dense_ms_per_token": 4.0,
             "pariskv_ms_per_token": 4.12, "dense_ttft_ms": 200.0, "pariskv_ttft_ms": 190.0},
            {"input_len": 4096, "batch": 64, "dense_ms_per_token": 9.0,
             "pariskv_ms_per_token": None, "dense_ttft_ms": 900.0, "pariskv_ttft_ms": None},
        ]
    }  # fmt: skip
    one, big = bench.summarize(run)
    assert one["ms_per_token_ratio"] == pytest.approx(1.03)
    assert one["ttft_ms_ratio"] == pytest.approx(0.95)
    assert big["ms_per_token_ratio"] is None and big["ttft_ms_ratio"] is None


def test_inputs_above_the_dense_threshold_are_refused():
    with pytest.raises(SystemExit, match="dense threshold"):
        bench.main(["--inputs", "16384"])
