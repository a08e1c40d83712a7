"""Host offload's KV pool with real SGLang objects: K/V land in the host pool, SGLang's
readers see them, every writer drops stale hot-cache rows, and capacity is set by the
host pool (the GPU is charged for the codes only)."""

import types

import pytest
import torch
from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig

from sglang_pariskv import pool_sizing
from sglang_pariskv.config import ParisKVConfig, ParisKVConfigError
from sglang_pariskv.index.code_pool import code_bytes_per_token
from sglang_pariskv.offload.hot_cache import HotCache
from sglang_pariskv.offload.kv_pool import HostOffloadKVPool
from sglang_pariskv.pool_sizing import cap_to_host_pool, cell_size_hook, reserve_planned_memory
from tests.hot_cache_oracle import insert, lookup
from tests.test_offload_host_pool import read
from tests.test_plugin_pool import LAYERS, D, H, layer, make_pool


def offload_pool(size=256):
    pool = make_pool(size, cls=HostOffloadKVPool)
    pool.hot_cache = HotCache(LAYERS, 64, H, 2 * D, 128, torch.bfloat16, "cpu")
    return pool


def cached_rows(cache, layer_id):
    return set(cache.tags[layer_id][cache.tags[layer_id] >= 0].tolist())


def fill_cache(pool, slots):
    """Tag the rows of ``slots`` (all heads, all layers) as cached."""
    rows = (slots[:, None] * H + torch.arange(H)).reshape(-1)
    for li in range(LAYERS):
        lk = lookup(pool.hot_cache, li, rows, torch.ones_like(rows, dtype=torch.bool))
        insert(pool.hot_cache, li, lk)
    return set(rows.tolist())


def test_kv_lives_in_the_host_pool_and_sglang_reads_it():
    pool = offload_pool()
    loc = torch.tensor([3, 4, 9])
    k, v = torch.randn(3, H, D).bfloat16(), torch.randn(3, H, D).bfloat16()
    pool.set_kv_buffer(layer(1), loc, k, v)
    got_k, got_v = read(pool.host, 1, loc)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    kb, vb = pool.get_kv_buffer(1)  # what FlashInfer is handed
    assert kb.data_ptr() == pool.host.data[1, 0].data_ptr()
    assert torch.equal(kb[loc], k) and torch.equal(vb[loc], v)
    assert pool.host.num_slots == 256 + 1  # SGLang's size + the padding page


def test_every_writer_drops_the_written_slots_from_the_hot_cache():
    pool = offload_pool()
    rows = fill_cache(pool, torch.arange(10, 20))
    assert cached_rows(pool.hot_cache, 0) == rows == cached_rows(pool.hot_cache, 1)
    # a write to layer 0 of slots 12, 13: only layer 0's rows of those slots go
    kv = torch.zeros(2, H, D).bfloat16()
    pool.set_kv_buffer(layer(0), torch.tensor([12, 13]), kv, kv)
    gone = {s * H + h for s in (12, 13) for h in range(H)}
    assert cached_rows(pool.hot_cache, 0) == rows - gone
    assert cached_rows(pool.hot_cache, 1) == rows
    # a move into slots 15, 16 (every layer), then a restore into slot 19
    pool.move_kv_cache(torch.tensor([15, 16]), torch.tensor([1, 2]))
    gone |= {s * H + h for s in (15, 16) for h in range(H)}
    assert cached_rows(pool.hot_cache, 1) == rows - {s * H + h for s in (15, 16) for h in range(H)}
    saved = pool.get_cpu_copy(torch.tensor([19]))
    pool.load_cpu_copy(saved, torch.tensor([19]))
    gone |= {19 * H + h for h in range(H)}
    assert cached_rows(pool.hot_cache, 0) == rows - gone


def test_without_a_hot_cache_writes_still_work():
    pool = make_pool(cls=HostOffloadKVPool)
    assert pool.hot_cache is None
    kv = torch.ones(1, H, D).bfloat16()
    pool.set_kv_buffer(layer(0), torch.tensor([7]), kv, kv)
    assert torch.equal(read(pool.host, 0, torch.tensor([7]))[0], kv)


def kvc(heads=4, head_dim=128, max_reqs=None):
    mc = types.SimpleNamespace(
        get_num_kv_heads=lambda tp: heads // tp, get_num_attention_heads=lambda tp: 28 // tp,
        head_dim=head_dim, context_len=32768,
    )  # fmt: skip
    args = types.SimpleNamespace(max_running_requests=max_reqs)
    return types.SimpleNamespace(model_config=mc, use_mla_backend=False, server_args=args)


def test_offload_charges_the_gpu_for_codes_and_caps_tokens_at_the_host_pool(monkeypatch):
    from sglang.srt.model_executor import pool_configurator

    monkeypatch.setattr(
        pool_configurator, "get_parallel", lambda: types.SimpleNamespace(attn_tp_size=1)
    )
    cfg = ParisKVConfig(offload="host", host_pool_gb=56.0)
    kv_cell = 4 * 2 * 128 * 28 * 2  # Qwen2.5-7B-1M shape: 57344 B/token
    configurator = types.SimpleNamespace()
    cell = cell_size_hook(cfg)(kv_cell, configurator, kvc(), 28)
    assert cell == code_bytes_per_token(4, 128, 28)  # the K/V bytes are not on the GPU
    slots = 56 * 2**30 // kv_cell
    assert configurator._pariskv_host_slots == slots == 1048576
    # the default hot cache (65536 lines x 28 layers of K+V rows of one head, bf16, plus an
    # int64 tag each, and overflow rows for one step of 256 requests x 4 heads x
    # (2048 + 64 + 256) entries) and the backend's buffers are allocated after SGLang sizes
    # its pools: their bytes come off the GPU's codes budget, in tokens of codes
    hot_bytes = 28 * 65536 * (2 * 128 * 2 + 8) + 256 * 4 * (2048 + 64 + 256) * 2 * 128 * 2
    backend = pool_sizing.backend_bytes(cfg, kvc(), 28, 1)
    assert backend > 0
    # prefill staging: two layers' K and V rows (bf16) for the whole 32K context (the
    # layer read and the next, copied meanwhile), plus an int32 row number each
    staging = 32768 * (2 * 2 * 4 * 128 * 2 + 4)
    reserved = -(-(hot_bytes + backend + staging) // cell)
    assert configurator._pariskv_reserved_tokens == reserved
    # SGLang sized the pool from the GPU budget / codes: more than the host holds
    big = MemoryPoolConfig(max_total_num_tokens=3_000_000)
    capped = reserve_planned_memory(big, configurator, 10**12, 1)
    assert capped.max_total_num_tokens == slots
    assert cap_to_host_pool(big, configurator, 10**12, 1).max_total_num_tokens == slots
    assert reserve_planned_memory(big, types.SimpleNamespace(), 10**12, 1) is big
    few = types.SimpleNamespace()  # --max-running-requests 8: fewer overflow rows
    cell_size_hook(cfg)(kv_cell, few, kvc(max_reqs=8), 28)
    few_bytes = 28 * 65536 * (2 * 128 * 2 + 8) + 8 * 4 * (2048 + 64 + 256) * 2 * 128 * 2
    few_backend = pool_sizing.backend_bytes(cfg, kvc(max_reqs=8), 28, 1)
    assert few_backend < backend
    assert few._pariskv_reserved_tokens == -(-(few_bytes + few_backend + staging) // cell)
    # a GPU-bound pool (fewer codes fit than the host holds) gives up the planned tokens
    gpu_bound = MemoryPoolConfig(max_total_num_tokens=reserved + 600_001)
    got = reserve_planned_memory(gpu_bound, configurator, 10**9, 1)
    assert got.max_total_num_tokens == 600_001
    paged = reserve_planned_memory(gpu_bound, configurator, 10**9, 64)
    assert paged.max_total_num_tokens == 600_001 // 64 * 64
    # no hot cache: only the backend's buffers and the prefill staging are set aside
    direct = types.SimpleNamespace()
    cfg0 = ParisKVConfig(offload="host", host_pool_gb=56.0, hot_cache_lines=0)
    cell_size_hook(cfg0)(kv_cell, direct, kvc(), 28)
    assert direct._pariskv_reserved_tokens == -(-(backend + staging) // cell)
    # without offload the codes are added to the K/V cell as before
    assert cell_size_hook(ParisKVConfig())(kv_cell, None, kvc(), 28) == kv_cell + cell


def test_a_hot_cache_that_leaves_no_room_for_codes_is_refused():
    conf = types.SimpleNamespace(
        _pariskv_host_slots=10**6, _pariskv_reserved_tokens=5000, _pariskv_reserved_gib=0.9
    )
    with pytest.raises(ParisKVConfigError, match="--pariskv-hot-cache-lines"):
        reserve_planned_memory(MemoryPoolConfig(max_total_num_tokens=4000), conf, 1, 1)
    # room for 10 tokens of codes, less than a page of 16: the cache is named, not the pool
    with pytest.raises(ParisKVConfigError, match="--pariskv-hot-cache-lines"):
        reserve_planned_memory(MemoryPoolConfig(max_total_num_tokens=5010), conf, 1, 16)


def test_a_host_pool_smaller_than_a_page_is_refused():
    conf = types.SimpleNamespace(_pariskv_host_slots=10)
    with pytest.raises(ParisKVConfigError, match="--pariskv-host-pool-gb"):
        reserve_planned_memory(MemoryPoolConfig(max_total_num_tokens=64), conf, 1, 16)
