"""The backend's GPU memory plan against what its constructors really allocate (on the
CPU, same shapes), and the pool sizing hook that keeps the plan out of SGLang's pool."""

import dataclasses
import types

import pytest
import torch
from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig

from sglang_pariskv import pool_sizing
from sglang_pariskv.attention.memory_plan import (
    FLASHINFER_INT_WORKSPACE_BYTES,
    plan_backend_memory,
    tensor_bytes,
)
from sglang_pariskv.attention.sparse_decode import WORKSPACE_BYTES
from sglang_pariskv.config import ParisKVConfig, ParisKVConfigError
from sglang_pariskv.kernels.workspace import DecodeWorkspace


@pytest.mark.parametrize(
    "hq, hkv, d, layers, batch, ctx",
    [(8, 2, 64, 3, 8, 4096), (32, 8, 128, 2, 4, 20000), (14, 2, 64, 1, 2, 1000)],
)
def test_the_plan_is_what_the_backend_allocates(hq, hkv, d, layers, batch, ctx):
    cfg = ParisKVConfig(topk=256, sink=16, local=64, dense_threshold=512)
    plan = plan_backend_memory(
        cfg, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, num_layers=layers,
        max_batch=batch, max_context=ctx, graph_batch_sizes=5,
    )  # fmt: skip
    ws = DecodeWorkspace(cfg, hq, hkv, d, max_batch=batch, max_context=ctx, device="cpu")
    query_copy = batch * hq * d * 2  # the bf16 query copy the first CUDA run adds
    assert plan.workspace == tensor_bytes(ws) + query_copy
    assert plan.workspace >= batch * hkv * ctx  # the scores alone: one byte per position
    assert plan.flashinfer == WORKSPACE_BYTES + 11 * FLASHINFER_INT_WORKSPACE_BYTES
    assert plan.total == tensor_bytes(ws) + query_copy + plan.flashinfer


def test_tensor_bytes_counts_each_tensor_once_through_containers():
    t = torch.zeros(10, dtype=torch.int32)
    obj = types.SimpleNamespace(a=t, b=[t, torch.zeros(3)], c={"x": (torch.zeros(2, 2),)})
    assert tensor_bytes(obj) == 40 + 12 + 16


def _kvc(max_reqs=16, context=8192):
    mc = types.SimpleNamespace(
        get_num_kv_heads=lambda tp: 8 // tp, get_num_attention_heads=lambda tp: 32 // tp,
        head_dim=128, context_len=context,
    )  # fmt: skip
    return types.SimpleNamespace(
        model_config=mc, use_mla_backend=False,
        server_args=types.SimpleNamespace(
            max_running_requests=max_reqs,
            cuda_graph_config=types.SimpleNamespace(  # as resolved: decode graphs 1..max_reqs
                decode=types.SimpleNamespace(backend="full", bs=list(range(1, max_reqs + 1)))
            ),
        ),
    )  # fmt: skip


def test_the_pool_gives_up_exactly_the_planned_bytes(monkeypatch):
    from sglang.srt.model_executor import pool_configurator

    monkeypatch.setattr(
        pool_configurator, "get_parallel", lambda: types.SimpleNamespace(attn_tp_size=1)
    )
    conf = types.SimpleNamespace()
    kv_cell = 8 * 256 * 32 * 2
    cost = pool_sizing.cell_size_hook(ParisKVConfig())(kv_cell, conf, _kvc(), 32)
    plan = plan_backend_memory(
        ParisKVConfig(), num_q_heads=32, num_kv_heads=8, head_dim=128, num_layers=32,
        max_batch=16, max_context=8192, graph_batch_sizes=16,
    )  # fmt: skip
    assert conf._pariskv_reserved_tokens == -(-plan.total // cost)
    budget = 40 * 2**30
    sized = MemoryPoolConfig(max_total_num_tokens=budget // cost)
    got = pool_sizing.reserve_planned_memory(sized, conf, budget, 1)
    assert got.max_total_num_tokens == budget // cost - conf._pariskv_reserved_tokens
    # what SGLang then holds plus the plan fits the budget it was given
    assert got.max_total_num_tokens * cost + plan.total <= budget
    paged = pool_sizing.reserve_planned_memory(sized, conf, budget, 64)
    assert paged.max_total_num_tokens % 64 == 0
    assert paged.max_total_num_tokens <= got.max_total_num_tokens


def test_a_budget_the_plan_fills_is_refused_naming_the_fix():
    conf = types.SimpleNamespace(_pariskv_reserved_tokens=5000, _pariskv_reserved_gib=1.5)
    with pytest.raises(ParisKVConfigError, match="--max-running-requests"):
        pool_sizing.reserve_planned_memory(MemoryPoolConfig(max_total_num_tokens=4000), conf, 1, 1)


def test_dense_layers_plan_their_full_length_plan_buffers():
    """--pariskv-dense-layers adds what ``FullContextDecode`` allocates: its indptr, the
    CUDA-graph ``kv_indices`` buffer (graph batch x context) and an int workspace for its
    eager wrapper and each captured batch size; nothing without dense layers."""
    from sglang_pariskv.attention.dense_layers import FullContextDecode

    kw = dict(num_q_heads=8, num_kv_heads=2, head_dim=64, num_layers=4, max_batch=8,
              max_context=4096, graph_batch_sizes=5, max_graph_batch=6)  # fmt: skip
    plain = plan_backend_memory(ParisKVConfig(), **kw)
    dense = plan_backend_memory(ParisKVConfig(dense_layers=(0, 1)), **kw)
    assert plain.dense_layers == 0
    full = FullContextDecode(
        types.SimpleNamespace(kv_indptr=[torch.zeros(9, dtype=torch.int32)]), (0, 1)
    )
    full.init_graph_state(6, 4096)
    buffers = tensor_bytes([full.indptr, full._graph_indices])
    assert dense.dense_layers == buffers + 6 * FLASHINFER_INT_WORKSPACE_BYTES
    assert dense.total == plain.total + dense.dense_layers


@pytest.mark.parametrize("with_scales", [True, False])
def test_the_calibration_tables_of_the_code_pool_are_planned(tmp_path, with_scales):
    """The code pool's fp32 centres (and scales) of this rank's heads: planned as the pool
    allocates them (built on the CPU, same shapes)."""
    from sglang_pariskv.calibration import load_calibration, save_calibration
    from sglang_pariskv.index.code_pool import CodePool

    layers, hkv, d = 3, 2, 64
    path = tmp_path / "cal.json"
    scales = torch.ones(layers, hkv, d) * 2 if with_scales else None
    save_calibration(path, torch.zeros(layers, hkv, d), [], scales=scales)
    sizes = dict(num_q_heads=8, num_kv_heads=hkv, head_dim=d, num_layers=layers,
                 max_batch=8, max_context=4096, graph_batch_sizes=5)  # fmt: skip
    cfg = ParisKVConfig(topk=256, sink=16, local=64, dense_threshold=512)
    plain = plan_backend_memory(cfg, **sizes)
    planned = plan_backend_memory(dataclasses.replace(cfg, calibration=str(path)), **sizes)
    cal = load_calibration(path)
    pool = CodePool(4, hkv, d, layers, "cpu", centres=cal.centres, scales=cal.scales)
    allocated = sum(
        t.numel() * t.element_size() for t in (pool.centres, pool.scales) if t is not None
    )
    assert plain.calibration == 0 and planned.calibration == allocated
    assert (
        planned.total - plain.total == allocated == (2 if with_scales else 1) * layers * hkv * d * 4
    )
