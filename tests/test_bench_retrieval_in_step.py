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


def _run_file(path, device, batch, step_ms, rerank=None):
    import json

    modes = {m: {"step_ms": v} for m, v in step_ms.items()}
    rep = {"device": device, "versions": {}, "N": 131072, "batch": batch, "layers": 32}
    if rerank is not None:
        rep["rerank"] = rerank
    path.write_text(json.dumps(rep | {"weight_mb_per_layer": 436.0, "modes": modes}))
    return path


def test_combine_subtracts_each_runs_weights_step_per_batch(tmp_path):
    from bench_retrieval_in_step import combine

    a = _run_file(tmp_path / "a.json", "H", 1, {"step": 10.5, "lagged_step": 10.25, "weights": 8.5})
    b = _run_file(
        tmp_path / "b.json", "H", 8, {"step": 12.0, "lagged_late_step": 11.0, "weights": 6.0}
    )
    got = combine([a, b], "abc1234")
    assert got["added_ms"] == {
        "1": {"step": 2.0, "lagged_step": 1.75},
        "8": {"step": 6.0, "lagged_late_step": 5.0},
    }
    assert got["git_commit"] == "abc1234" and [r["batch"] for r in got["runs"]] == [1, 8]


def test_combine_keeps_both_reranks_of_one_batch_apart(tmp_path):
    from bench_retrieval_in_step import combine

    a = _run_file(tmp_path / "a.json", "H", 5, {"step": 11.0, "weights": 6.0}, "code")
    b = _run_file(tmp_path / "b.json", "H", 5, {"step": 10.5, "weights": 6.0}, "keys")
    assert combine([a, b])["added_ms"] == {"5": {"step": 5.0}, "5 (keys)": {"step": 4.5}}


def test_combine_refuses_mixed_devices_and_runs_without_the_weights_floor(tmp_path):
    from bench_retrieval_in_step import combine

    a = _run_file(tmp_path / "a.json", "H200", 1, {"step": 2.0, "weights": 1.0})
    b = _run_file(tmp_path / "b.json", "H100", 5, {"step": 2.0, "weights": 1.0})
    c = _run_file(tmp_path / "c.json", "H200", 5, {"step": 2.0})
    with pytest.raises(SystemExit, match="several devices"):
        combine([a, b])
    with pytest.raises(SystemExit, match="no 'weights' mode"):
        combine([a, c])


def test_combine_cli_writes_the_file_and_its_png(tmp_path):
    pytest.importorskip("matplotlib")
    import json

    from bench_retrieval_in_step import main

    a = _run_file(tmp_path / "a.json", "H", 1, {"step": 3.0, "lagged_step": 2.5, "weights": 1.0})
    out = tmp_path / "combined.json"
    assert main(["--combine", str(a), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["added_ms"] == {"1": {"step": 2.0, "lagged_step": 1.5}}
    assert out.with_suffix(".png").stat().st_size > 0
    with pytest.raises(SystemExit, match="must not be one of"):
        main(["--combine", str(a), "--out", str(a)])
