"""The reader of benchmarks/bench_retrieval_in_step.py: kernel times grouped by stage."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_retrieval_in_step import stage_means_us  # noqa: E402


def test_stage_means_group_kernels_by_name_and_drop_the_rest():
    events = [
        ("void (anonymous namespace)::select_rerank_kernel<16>(...)", 30.0),
        ("void (anonymous namespace)::select_rerank_kernel<16>(...)", 40.0),
        ("void (anonymous namespace)::scan_kernel<16, true>(...)", 20.0),
        ("void (anonymous namespace)::scan_kernel<16, false>(...)", 24.0),
        ("(anonymous namespace)::topk_kernel<16, false>(...)", 15.0),
        ("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT", 500.0),  # the matmul: no stage
        ("_count_kernel", 3.0),
    ]
    got = stage_means_us(events)
    assert got == {"write_rerank": 35.0, "scan": 22.0, "topk": 15.0, "count": 3.0}


@pytest.mark.gpu
def test_collision_a_step_ahead_attends_to_the_inline_steps_indices():
    """With a query that does not move, the lagged pipeline (collision stage on a side
    stream for the next step) must give the inline pipeline's indices; both step modes
    and the weights floor are timed."""
    import torch
    from bench_retrieval_in_step import run

    modes = ("step", "lagged_step", "lagged_late_step", "weights")
    got = run(16384, 2, 3, 8.0, torch.device("cuda"), modes)
    for mode in ("lagged_step", "lagged_late_step"):
        assert got[mode]["indices_match_step"] is True
        assert {"scan", "count", "write_rerank", "topk"} <= got[mode].keys()
    assert all(got[m]["step_ms"] > 0 for m in got)
