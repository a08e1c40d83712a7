"""bench_passkey_budget's summary against counts made by hand from the rows."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_passkey_budget as bench  # noqa: E402


def row(dense, sparse, same, tokens=1000):
    return {"prompt_tokens": tokens, "correct": {"dense": dense, "100": sparse},
            "identical": {"100": same}}  # fmt: skip


def test_summary_counts_accuracy_agreement_and_identical_answers():
    rows = [row(True, True, True), row(True, False, False), row(False, False, False),
            row(False, True, False, tokens=3000)]  # fmt: skip
    (s,) = bench.summarise(rows, [100], sink=32, local=68)
    assert s["trials"] == 4
    assert s["dense_acc"] == 0.5 and s["pariskv_acc"] == 0.5
    assert s["agreement"] == 2 / 4  # rows 0 and 2 score as dense does
    assert s["identical_answers"] == 1 / 4
    assert s["budget_fraction"] == 200 / 1500  # (32 + 68 + 100) / mean prompt length
