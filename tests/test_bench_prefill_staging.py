"""bench_prefill_staging.py end to end on the CPU at toy sizes: every mode timed, the
staged pipeline's attention equal to the UVA gather's, the copy path each slot layout
takes, and the results file and its plot written."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.parametrize("layout,in_runs", [("scattered", False), ("contiguous", True)])
def test_the_bench_times_every_mode_and_checks_staged_against_inline(tmp_path, layout, in_runs):
    import bench_prefill_staging as bench

    out = tmp_path / "prefill_staging.json"
    argv = ["--prefix", "600", "--chunk", "16", "--layers", "3", "--reps", "1",
            "--layout", layout, "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    rep = json.loads(out.read_text())
    assert list(rep["cases"]) == ["600"] and rep["layout"] == layout and rep["layers"] == 3
    case = rep["cases"]["600"]
    assert all(case[m] > 0 for m in bench.MODES)
    # one run of 600 slots is copied run by run; 600 random slots are gathered
    assert case["copied_in_runs"] is in_runs
    assert case["staged_matches_inline"] is True
    assert out.with_suffix(".png").stat().st_size > 0


def test_hidden_fraction_is_one_when_the_copy_vanishes_and_zero_when_it_adds_up():
    import bench_prefill_staging as bench

    assert bench.hidden_fraction({"copy": 2.0, "attention": 5.0, "staged": 5.0}) == 1.0
    assert bench.hidden_fraction({"copy": 2.0, "attention": 5.0, "staged": 7.0}) == 0.0


@pytest.mark.parametrize("argv", [["--layers", "1"], ["--prefix", "0"], ["--reps", "0"]])
def test_bad_sizes_are_refused(argv):
    import bench_prefill_staging as bench

    with pytest.raises(SystemExit, match="must be"):
        bench.main(argv)
