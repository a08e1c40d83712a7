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
