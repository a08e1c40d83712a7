"""The trace reader of benchmarks/profile_decode.py, on a chrome trace like torch's."""

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from profile_decode import kernel_times_us  # noqa: E402


def test_kernel_times_sum_gpu_events_by_name(tmp_path):
    events = [
        {"ph": "X", "cat": "kernel", "name": "scan", "dur": 10.0},
        {"ph": "X", "cat": "kernel", "name": "scan", "dur": 5.5},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "dur": 2.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "dur": 99.0},  # host: ignored
        {"ph": "i", "cat": "kernel", "name": "marker"},
    ]
    a = tmp_path / "a.trace.json.gz"
    with gzip.open(a, "wt") as f:
        json.dump({"traceEvents": events}, f)
    b = tmp_path / "b.trace.json"
    b.write_text(json.dumps([{"ph": "X", "cat": "kernel", "name": "topk", "dur": 1.0}]))
    got = kernel_times_us([a, b])
    assert got == {"scan": 15.5, "Memcpy HtoD": 2.0, "topk": 1.0}


def test_busy_merges_overlaps_and_span_counts_gaps(tmp_path):
    from profile_decode import busy_and_span_us

    events = [  # [0, 10) and [5, 12) overlap -> 12 busy; [20, 25) after an idle gap of 8
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 0.0, "dur": 10.0},
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 5.0, "dur": 7.0},
        {"ph": "X", "cat": "gpu_memset", "name": "c", "ts": 20.0, "dur": 5.0},
        {"ph": "X", "cat": "cpu_op", "name": "host", "ts": 100.0, "dur": 50.0},
    ]
    f = tmp_path / "t.trace.json"
    f.write_text(json.dumps(events))
    assert busy_and_span_us([f, f]) == (34.0, 50.0)


def test_categories_of_kernel_names():
    from profile_decode import category

    assert category("void (anonymous namespace)::scan_kernel<16>(unsigned char const*)") == (
        "pariskv"
    )
    assert category("_count_kernel") == "pariskv"
    assert category("flashinfer::BatchDecodeWithPagedKVCacheKernel<...>") == "attention"
    assert category("nvjet_tst_128x64_64x4_1x2_h_bz_TNT") == "gemm"
    assert category("void at::native::elementwise_kernel<128, 2>") == "other"


def test_graph_kernels_are_those_correlated_to_graph_launches(tmp_path):
    from profile_decode import graph_kernel_times_us

    def rt(name, corr):
        return {"ph": "X", "cat": "cuda_runtime", "name": name, "args": {"correlation": corr}}

    def k(name, corr, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "dur": dur, "args": {"correlation": corr}}

    events = [
        rt("cudaLaunchKernel", 1),  # the eager extend step: left out
        k("prefill", 1, 100.0),
        rt("cudaGraphLaunch", 2),  # two decode steps: a forward graph and a small one each
        k("scan", 2, 10.0),
        k("topk", 2, 4.0),
        rt("cudaGraphLaunch", 5),
        k("sample", 5, 1.0),
        rt("cudaGraphLaunch_v10000", 3),
        k("scan", 3, 12.0),
        k("topk", 3, 6.0),
        rt("cudaGraphLaunch", 6),
        k("sample", 6, 1.5),
        rt("cudaGraphLaunch", 4),  # a launch with no kernel in the window: not a step
    ]
    f = tmp_path / "t.trace.json"
    f.write_text(json.dumps({"traceEvents": events}))
    total, steps = graph_kernel_times_us([f])
    assert steps == 2  # the small graphs (under half the largest launch) are not steps
    assert total == {"scan": 22.0, "topk": 10.0, "sample": 2.5}
