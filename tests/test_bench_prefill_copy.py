"""bench_prefill_copy on the CPU at a toy shape: every mode runs through the real pools,
the copy-stream mode hands each layer's store to the copy stream (and only it does), and
what the pools hold after a chunk is the K/V the last chunk produced."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_prefill_copy as bench  # noqa: E402

TOY = {**bench.SHAPE, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 8,
       "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip


def test_modes_run_and_only_the_copy_stream_mode_defers(monkeypatch):
    monkeypatch.setattr(bench, "SHAPE", TOY)
    case = bench.run_case(tokens=32, layers=3, iters=2, dev=torch.device("cpu"))
    assert case["kv_mib_per_layer"] == 32 * 2 * 16 * 4 / 2**20
    for mode in bench.MODES:
        r = case[mode]
        assert 0 < r["forward_ms"] <= r["drained_ms"] + 1e-6
        want = 3 * 3 if mode == "host_side_stream" else 0  # layers x (iters + warm-up)
        assert r["copy_stream_stores"] == want, mode
    assert case["host_side_stream_over_gpu_pool"] > 0


def test_side_stream_pool_holds_the_last_chunks_kv_after_drain(monkeypatch):
    monkeypatch.setattr(bench, "SHAPE", TOY)
    dev = torch.device("cpu")
    pool = bench.make_pool("host_side_stream", 33, 2, dev)
    pool.host.data.zero_()
    lay = bench.Layer(32, dev)
    loc = torch.arange(1, 33)
    kvs = []
    for li in range(2):
        k, v = lay.run()
        kvs.append((k, v))
        pool.defer_writes = True
        pool.set_kv_buffer(type("L", (), {"layer_id": li})(), loc, k, v)
        pool.defer_writes = False
    assert not pool.host.data[:, :, 1:].any()  # both stores still with the copy stream
    pool.drain_writes()
    for li, (k, v) in enumerate(kvs):
        hk, hv = pool.host.read(li, loc)
        assert torch.equal(hk, k) and torch.equal(hv, v)
