"""The ctypes launcher of kernels/cuda_ops.py, with a stand-in library (no GPU needed):
arguments reach ``pariskv_<name>`` with the current stream last, and a missing build or a
nonzero return code raises."""

import types

import pytest
import torch

from sglang_pariskv.kernels import cuda_ops


def fake_library(calls, rc):
    class Lib:
        def __getattr__(self, symbol):
            def entry(*args):
                calls.append((symbol, args))
                return rc

            return entry

    return Lib()


@pytest.fixture
def stream(monkeypatch):
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=77)
    )


def test_topk_arguments_reach_its_entry_point_with_the_stream_last(monkeypatch, stream):
    calls = []
    monkeypatch.setattr(cuda_ops, "_library", lambda name: fake_library(calls, 0))
    est, cand = torch.zeros(2, 3, 40), torch.zeros(2, 3, 40, dtype=torch.int32)
    counts, out = torch.zeros(2, dtype=torch.int64), torch.zeros(2, 3, 16, dtype=torch.int32)
    cuda_ops.topk_cuda(est, cand, counts, out, cluster=4)
    ptrs = (est.data_ptr(), cand.data_ptr(), counts.data_ptr(), out.data_ptr())
    assert calls == [("pariskv_topk", (*ptrs, 40, 16, 2, 3, 4, 77))]


def test_nonzero_code_and_missing_build_raise(monkeypatch, stream):
    monkeypatch.setattr(cuda_ops, "_library", lambda name: fake_library([], 3))
    with pytest.raises(RuntimeError, match="pariskv_topk failed with code 3"):
        cuda_ops._launch("topk", torch.device("cpu"), 1, 2)
    monkeypatch.setattr(cuda_ops, "_library", lambda name: None)
    with pytest.raises(RuntimeError, match="the CUDA top-k is unavailable"):
        cuda_ops._launch("topk", torch.device("cpu"), 1, 2)


def test_every_kernel_has_a_csrc_source():
    assert {p.stem for p in cuda_ops.CSRC.glob("*.cu")} == set(cuda_ops._KERNELS)


def test_query_copy_pointer_reaches_the_kernel_and_a_wrong_buffer_fails(monkeypatch, stream):
    from sglang_pariskv.codec.query import PreparedQuery

    calls = []
    monkeypatch.setattr(cuda_ops, "_library", lambda name: fake_library(calls, 0))
    r, hq, h, d = 2, 8, 2, 64
    q = torch.zeros(r, hq, d, dtype=torch.bfloat16)
    out = PreparedQuery(torch.zeros(r, h, d // 8, 8), torch.zeros(r, h))
    table = torch.zeros(r, h, d // 8, 256, dtype=torch.int8)
    args = (q, torch.zeros(d, d), out, table, torch.zeros(r, h, 256, dtype=torch.int32))
    copy = torch.empty_like(q)
    scale = torch.ones(h, d)
    cuda_ops.query_table_cuda(*args, query_copy=copy)
    cuda_ops.query_table_cuda(*args)
    cuda_ops.query_table_cuda(*args, scale=scale)
    (_, with_copy), (_, without), (_, scaled) = calls
    # csrc/query_table.cu: (q, stride, stride, dtype, scale, rot, blocks, norm, table,
    # shist, q_copy at 10, R, H, B, G, NBP, stream)
    assert with_copy[10] == copy.data_ptr() and without[10] == 0
    assert with_copy[:10] == without[:10] and with_copy[11:] == without[11:]
    assert scaled[4] == scale.data_ptr() and without[4] == 0 and scaled[5] == without[5]
    assert without[8] == table.data_ptr() and without[11:16] == (r, h, d // 8, hq // h, 256)
    assert len(without) == len(cuda_ops._KERNELS["query_table"][1])  # the stream included
    with pytest.raises(ValueError, match="query_copy must be contiguous"):
        cuda_ops.query_table_cuda(*args, query_copy=torch.empty(r, hq, d))  # fp32
    with pytest.raises(ValueError, match="scale must be a contiguous float32"):
        cuda_ops.query_table_cuda(*args, scale=torch.ones(h, d, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"rotation must be a contiguous \[{d}, {d}\] matrix"):
        cuda_ops.query_table_cuda(q, torch.zeros(d, d).t(), *args[2:])
    with pytest.raises(ValueError, match="rotation must be a contiguous"):
        cuda_ops.query_table_cuda(q, torch.zeros(d, d + 8)[:, :d], *args[2:])


def test_scan_arguments_match_the_entry_points_signature(monkeypatch, stream):
    """One argument per declared ctypes type (csrc/collision_scan.cu's signature), the run
    length last before the stream."""
    calls = []
    monkeypatch.setattr(cuda_ops, "_library", lambda name: fake_library(calls, 0))
    r, h, b, nmax = 2, 3, 8, 64
    i32, i64 = dict(dtype=torch.int32), dict(dtype=torch.int64)
    cuda_ops.collision_scan_cuda(
        torch.zeros(10, h, b, dtype=torch.uint8), torch.zeros(4, nmax, **i32),
        torch.zeros(r, **i32), torch.zeros(r, **i64), torch.zeros(r, **i64),
        torch.zeros(r, h, b, 256, dtype=torch.int8), torch.zeros(r, h, nmax, dtype=torch.uint8),
        torch.zeros(r, h, 256, **i32), 4, tokens_per_block=512,
    )  # fmt: skip
    ((symbol, args),) = calls
    assert symbol == "pariskv_collision_scan"
    assert len(args) == len(cuda_ops._KERNELS["collision_scan"][1])
    assert args[-6:] == (r, h, b, 256, 512, 77)  # R, H, B, bins, run length, stream


@pytest.mark.skipif(cuda_ops._nvcc() is None, reason="no nvcc on this machine")
@pytest.mark.parametrize("name", sorted(cuda_ops._KERNELS))
def test_each_kernel_builds_for_a_hopper_gpu_and_exports_its_entry_point(name, tmp_path):
    """The build the plugin runs on first use, for sm_90 (H100 / H200), on a machine that
    has nvcc but no GPU: the library loads and exports ``pariskv_<name>``."""
    import ctypes
    import subprocess

    out = tmp_path / f"libpariskv_{name}.so"
    cmd = cuda_ops.nvcc_command(cuda_ops._nvcc(), cuda_ops.CSRC / f"{name}.cu", "90", out)
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    assert getattr(ctypes.CDLL(str(out)), f"pariskv_{name}") is not None
