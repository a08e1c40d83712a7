"""The backend's measured GPU allocations against the plan (``attention.memory_check``):
the meter's arithmetic on a scripted allocator, the log line, and which allocations a
CUDA-graph capture counts (ParisKV's wrappers and SGLang's second plan of a batch size,
not the first, which plain SGLang makes too)."""

import logging
import types

import pytest
import torch
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

from sglang_pariskv.attention.memory_check import AllocationMeter, BackendMemory
from tests.test_backend_decode import HKV, HQ, D, TorchHeadAsBatch, setup  # noqa: F401

MIB = 2**20


class Allocator:
    """A scripted allocator: ``live`` bytes, as ``torch.cuda.memory_allocated`` reports."""

    def __init__(self):
        self.live = 0

    def __call__(self) -> int:
        return self.live


def test_windows_count_net_bytes_by_owner_and_exclusions_come_off():
    mem = Allocator()
    meter = AllocationMeter(torch.device("cpu"), measure=mem)
    assert meter.enabled and meter.total == 0
    mem.live = 1000  # allocated before any window: not counted
    with meter.track("backend"):
        mem.live += 300
        mem.live -= 100  # a temporary freed inside the window
    with meter.track("backend"):  # a rebuild: the old buffer freed, a larger one made
        mem.live += 500 - 200
    with meter.track("graphs"):
        mem.live += 64
        with meter.exclude("graphs"):  # what plain SGLang allocates too
            mem.live += 8
        mem.live += 16
    assert meter.by_owner == {"backend": 500, "graphs": 80}
    assert meter.total == 580


def test_the_meter_is_off_without_cuda():
    meter = AllocationMeter(torch.device("cpu"))
    assert not meter.enabled
    with meter.track("backend"), meter.exclude("backend"):
        torch.empty(1 << 20)
    assert meter.by_owner == {} and meter.total == 0


def test_the_log_line_is_written_when_the_total_changes(caplog):
    mem = Allocator()
    memory = BackendMemory(AllocationMeter(torch.device("cpu"), measure=mem), {"backend": 3 * MIB})
    with memory.meter.track("backend"):
        mem.live += 2 * MIB
    memory.add_tensors("calibration", torch.zeros(MIB // 4), None)  # 1 MiB of float32
    caplog.set_level(logging.INFO, logger="sglang_pariskv")
    memory.report()
    memory.report()  # unchanged: no second line
    lines = [r.getMessage() for r in caplog.records if "backend memory" in r.getMessage()]
    assert lines == [
        "ParisKV backend memory: 3.0 MiB allocated on the GPU, 3.0 MiB planned "
        "(allocated backend 2.0, calibration 1.0; planned backend 3.0)"
    ]
    with memory.meter.track("graphs"):
        mem.live += MIB
    memory.report()
    lines = [r.getMessage() for r in caplog.records if "backend memory" in r.getMessage()]
    assert len(lines) == 2 and lines[1].startswith("ParisKV backend memory: 4.0 MiB allocated")


def test_a_capture_counts_pariskvs_wrappers_and_sglangs_second_plan(setup, monkeypatch):  # noqa: F811
    """Two step graphs per batch size: SGLang plans its wrappers at both captures; plain
    SGLang would have made the first set, so only the second is ParisKV's cost, with the
    sparse call's own buffers (made once per size). Replays count nothing."""
    b, pool, rtp = setup
    mem = Allocator()
    sglang_plan, sparse_call = 8 * MIB, 3 * MIB

    def sglang_out_graph(self, fb, in_capture=False):
        mem.live += sglang_plan if in_capture else 0

    def sparse_for(graph_batch=None):
        mem.live += sparse_call
        return TorchHeadAsBatch(b.ws)

    monkeypatch.setattr(FlashInferAttnBackend, "init_forward_metadata_out_graph", sglang_out_graph)
    monkeypatch.setattr(b, "_sparse_call", sparse_for)
    b.memory = BackendMemory(AllocationMeter(torch.device("cpu"), measure=mem), {})
    n = 200  # above the dense threshold: a sparse plan
    for r in (1, 2):
        rtp.req_to_token[r, :n] = torch.arange(1, n + 1, dtype=torch.int32) + r * n
    for bs in (1, 2):
        fb = types.SimpleNamespace(
            forward_mode=types.SimpleNamespace(is_decode=lambda: True, is_extend=lambda: False),
            batch_size=bs, seq_lens=torch.full((bs,), n), seq_lens_cpu=torch.full((bs,), n),
            seq_lens_sum=n * bs, req_pool_indices=torch.arange(1, bs + 1),
            out_cache_loc=torch.arange(bs),
        )  # fmt: skip
        for step in ("sparse", "dense"):
            b.decode_cuda_graph_metadata = {bs: object()}
            with b.graphs.capturing(step):
                b.init_forward_metadata_out_graph(fb, in_capture=True)
    assert b.memory.meter.by_owner == {"graphs": 2 * (sparse_call + sglang_plan)}
    before = dict(b.memory.meter.by_owner)
    b.init_forward_metadata_out_graph(fb, in_capture=False)  # a replay's plan
    assert b.memory.meter.by_owner == before


@pytest.mark.gpu
def test_the_cuda_meter_sees_a_tensor_made_in_its_window(cuda_device):
    meter = AllocationMeter(torch.device(cuda_device))
    with meter.track("backend"):
        keep = torch.empty(4 * MIB, dtype=torch.uint8, device=cuda_device)
        torch.empty(MIB, dtype=torch.uint8, device=cuda_device)  # freed at once
    assert meter.by_owner["backend"] == keep.numel()


@pytest.mark.parametrize("offload", [False, True])
def test_the_backend_logs_the_plan_the_pool_sizing_reserved(monkeypatch, offload):
    """``planned_bytes`` (what the backend logs as planned) adds up to exactly the bytes
    the cell-size hook took out of the pool, prefill staging and hot cache included with
    offload."""
    import sglang.srt.runtime_context as runtime_context
    from sglang.srt.model_executor import pool_configurator

    from sglang_pariskv.attention.memory_check import planned_bytes
    from sglang_pariskv.config import ParisKVConfig
    from sglang_pariskv.pool_sizing import cell_size_hook
    from tests.test_offload_kv_pool import kvc

    parallel = types.SimpleNamespace(attn_tp_size=1)
    monkeypatch.setattr(pool_configurator, "get_parallel", lambda: parallel)
    monkeypatch.setattr(runtime_context, "get_parallel", lambda: parallel)
    cfg = ParisKVConfig(offload="host", host_pool_gb=8.0) if offload else ParisKVConfig()
    layers, heads, head_dim = 28, 4, 128
    kv_cell = 2 * heads * head_dim * layers * 2  # bf16
    configurator = types.SimpleNamespace()
    cell_size_hook(cfg)(kv_cell, configurator, kvc(max_reqs=16), layers)
    runner = kvc(max_reqs=16)
    pool = types.SimpleNamespace(
        dtype=torch.bfloat16, head_num=heads, head_dim=head_dim, layer_num=layers
    )
    planned = planned_bytes(runner, cfg, pool)
    assert set(planned) == ({"backend", "prefill_staging", "hot_cache"} if offload else {"backend"})
    assert sum(planned.values()) == configurator._pariskv_reserved_gib * 2**30
