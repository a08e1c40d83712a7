"""bench_prefill_staging.py end to end on the CPU at toy sizes: every mode timed, the
staged pipeline's attention equal to the inline gather's, and the results file and its
plot written."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_the_bench_times_every_mode_and_checks_staged_against_inline(tmp_path):
    import bench_prefill_staging as bench

    out = tmp_path / "prefill_staging.json"
    argv = ["--prefix", "300", "--chunk", "16", "--layers", "3", "--reps", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    rep = json.loads(out.read_text())
    assert list(rep["cases"]) == ["300"] and rep["chunk"] == 16 and rep["layers"] == 3
    case = rep["cases"]["300"]
    assert all(case[m] > 0 for m in bench.MODES)
    assert case["staged_matches_inline"] is True
    assert out.with_suffix(".png").stat().st_size > 0


def test_hidden_fraction_is_one_when_the_copy_vanishes_and_zero_when_it_adds_up():
    import bench_prefill_staging as bench

    assert bench.hidden_fraction({"gather": 2.0, "attention": 5.0, "staged": 5.0}) == 1.0
    assert bench.hidden_fraction({"gather": 2.0, "attention": 5.0, "staged": 7.0}) == 0.0


@pytest.mark.parametrize("argv", [["--layers", "1"], ["--prefix", "0"], ["--reps", "0"]])
def test_bad_sizes_are_refused(argv):
    import bench_prefill_staging as bench

    with pytest.raises(SystemExit, match="must be"):
        bench.main(argv)
