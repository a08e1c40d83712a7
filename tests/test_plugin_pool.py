"""The KV pool with ParisKV codes, with real SGLang pools, allocator and radix cache."""

import types
from array import array

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from sglang_pariskv import plugin
from sglang_pariskv.codec import encode_keys
from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.index.code_pool import code_bytes_per_token
from sglang_pariskv.index.kv_pool import ParisKVTokenToKVPool
from sglang_pariskv.pool_sizing import add_code_bytes
from sglang_pariskv.server_flags import ParisKVConfigError

H, D, LAYERS = 2, 16, 2

#: SGLang's pool stores into CPU tensors with its CUDA-only ``store_cache`` op whenever a
#: GPU is present, so tests that store into a CPU pool run on GPU-less hosts only (CI; the
#: gpu tests cover the CUDA pools).
cpu_pool_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="stores into a CPU pool: needs a GPU-less host"
)


def make_pool(
    size=256, heads=H, head_dim=D, layers=LAYERS, dtype=torch.bfloat16, cls=None, device="cpu"
):
    """A ParisKV KV pool, on the CPU unless ``device`` (shared by the pool, TP and
    backend-decode tests); ``cls`` picks another pool class (host offload's)."""
    pool = (cls or ParisKVTokenToKVPool)(
        size=size,
        page_size=1,
        dtype=dtype,
        head_num=heads,
        head_dim=head_dim,
        layer_num=layers,
        device=device,
        enable_memory_saver=False,
        enable_alt_stream=False,
    )
    if device == "cpu":
        pool.use_native_move_kv_cache = True  # the Triton move kernel needs a GPU
    return pool


def layer(i):
    return types.SimpleNamespace(layer_id=i)


def key_of(prefix: tuple[int, ...], layer_id: int) -> torch.Tensor:
    """The key a model would write for the last token of ``prefix``: a deterministic
    function of the whole prefix, as in a real transformer."""
    gen = torch.Generator().manual_seed(hash((prefix, layer_id)) % 2**31)
    return torch.randn(H, D, generator=gen).to(torch.bfloat16)


def assert_codes_match_kv(pool, slots):
    for li in range(LAYERS):
        want = encode_keys(pool.k_buffer[li][slots])
        for got, w in zip(pool.pariskv.layers[li], want):
            assert torch.equal(got[slots], w)


@pytest.mark.parametrize("offload", [False, True])
def test_every_kv_write_move_and_restore_keeps_codes_coherent(offload):
    from sglang_pariskv.offload.kv_pool import HostOffloadKVPool

    pool = make_pool(cls=HostOffloadKVPool if offload else None)
    loc = torch.tensor([3, 4, 9, 10, 11])
    for li in range(LAYERS):
        k = torch.randn(5, H, D).to(torch.bfloat16)
        pool.set_kv_buffer(layer(li), loc, k, k.clone())
    assert_codes_match_kv(pool, loc)
    pool.move_kv_cache(torch.tensor([20, 21]), torch.tensor([3, 4]))
    assert_codes_match_kv(pool, torch.tensor([20, 21, 9]))
    saved = pool.get_cpu_copy(torch.tensor([9, 10]))
    pool.set_kv_buffer(
        layer(0),
        torch.tensor([9, 10]),
        torch.zeros(2, H, D).bfloat16(),
        torch.zeros(2, H, D).bfloat16(),
    )
    pool.load_cpu_copy(saved, torch.tensor([9, 10]))
    assert_codes_match_kv(pool, loc)


def test_unsupported_pool_modes_are_refused():
    with pytest.raises(ParisKVConfigError, match="POST_CAPTURE"):
        ParisKVTokenToKVPool(
            size=8,
            page_size=1,
            dtype=torch.bfloat16,
            head_num=H,
            head_dim=D,
            layer_num=1,
            device="cpu",
            enable_memory_saver=False,
            post_capture_active=True,
        )


@cpu_pool_only
def test_a_pool_for_the_rerank_by_keys_stores_the_signs_only(monkeypatch):
    """--pariskv-rerank keys: the code pool keeps the sign ids (what the collision scan
    reads) for every write, and no 3-bit records; a sixth of the code bytes at any D."""
    monkeypatch.setattr(ParisKVTokenToKVPool, "pariskv_config", ParisKVConfig(rerank="keys"))
    pool = make_pool()
    loc = torch.tensor([3, 4, 9])
    for li in range(LAYERS):
        k = torch.randn(3, H, D).to(torch.bfloat16)
        pool.set_kv_buffer(layer(li), loc, k, k.clone())
        assert torch.equal(pool.pariskv.layers[li].signs[loc], encode_keys(k).signs)
        assert pool.pariskv.layers[li].mags.numel() == pool.pariskv.layers[li].weights.numel() == 0
    signs = sum(layer.signs.nbytes for layer in pool.pariskv.layers)
    assert pool.pariskv.nbytes() == signs == (pool.size + 1) * H * (D // 8) * LAYERS
    pool.move_kv_cache(torch.tensor([20]), torch.tensor([3]))
    assert torch.equal(pool.pariskv.layers[0].signs[20], pool.pariskv.layers[0].signs[3])


def test_code_bytes_are_counted_in_the_cell_size(monkeypatch):
    from sglang.srt.model_executor import pool_configurator

    monkeypatch.setattr(
        pool_configurator, "get_parallel", lambda: types.SimpleNamespace(attn_tp_size=1)
    )
    mc = types.SimpleNamespace(
        get_num_kv_heads=lambda tp: 8 // tp, get_num_attention_heads=lambda tp: 32 // tp,
        head_dim=128, context_len=8192,
    )  # fmt: skip
    kvc = types.SimpleNamespace(model_config=mc, use_mla_backend=False)
    kv_cell = 8 * (128 + 128) * 32 * 2  # Llama-3.1-8B: 8 KV heads, D 128, 32 layers, bf16
    total = add_code_bytes(kv_cell, None, kvc, 32)
    assert total - kv_cell == code_bytes_per_token(8, 128, 32) == 8 * 96 * 32
    by_keys = add_code_bytes(kv_cell, None, kvc, 32, ParisKVConfig(rerank="keys"))
    assert by_keys - kv_cell == code_bytes_per_token(8, 128, 32, records=False) == 8 * 16 * 32
    assert (total - kv_cell) / kv_cell == pytest.approx(0.1875)


def matched_slots(cache, match) -> torch.Tensor:
    """The KV slots of a radix match: a field of the result in SGLang 0.5.17; in 0.5.23
    the result holds the length and the slots are read off the tree path."""
    if hasattr(match, "device_indices"):
        return match.device_indices
    return cache.path_device_indices(match.last_device_node)[: match.device_prefix_len]


@settings(max_examples=25, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.integers(0, 3),
            st.lists(st.integers(0, 3), min_size=1, max_size=12),
            st.integers(0, 40),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_radix_prefix_hits_return_slots_whose_codes_belong_to_the_prefix(ops):
    """Random requests share prefixes through the radix cache, evictions free slots and
    later writers reuse them; every matched slot's codes must be those of its prefix."""
    size = 64
    pool = make_pool(size)
    alloc = TokenToKVPoolAllocator(size, torch.bfloat16, "cpu", pool, need_sort=False)
    req_pool = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
    cache = RadixCache(
        CacheInitParams(
            disable=False, req_to_token_pool=req_pool, token_to_kv_pool_allocator=alloc, page_size=1
        )
    )
    for stem, tail, evict in ops:
        tokens = tuple([stem, stem + 1] + tail)
        match = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
        hit = matched_slots(cache, match)
        for i, slot in enumerate(hit.tolist()):
            for li in range(LAYERS):
                want = encode_keys(key_of(tokens[: i + 1], li)[None])
                got = pool.pariskv.layers[li].index(torch.tensor([slot]))
                assert all(torch.equal(g, w) for g, w in zip(got, want))
        need = len(tokens) - len(hit)
        if need == 0:
            continue
        cache.inc_lock_ref(match.last_device_node)  # a running request pins its prefix
        if alloc.available_size() < need:
            cache.evict(EvictParams(num_tokens=need))
        new = alloc.alloc(need)
        if new is None:
            cache.dec_lock_ref(match.last_device_node)
            continue
        for li in range(LAYERS):
            k = torch.stack([key_of(tokens[: len(hit) + j + 1], li) for j in range(need)])
            pool.set_kv_buffer(layer(li), new, k, k.clone())
        slots = torch.cat([hit, new])
        res = cache.insert(InsertParams(key=RadixKey(array("q", tokens)), value=slots))
        alloc.free(slots[len(hit) : res.prefix_len])  # duplicates of cached tokens
        cache.dec_lock_ref(match.last_device_node)
        if evict:
            cache.evict(EvictParams(num_tokens=evict))


def test_fused_rope_kv_stores_are_routed_through_the_pool(monkeypatch):
    """Models that store K/V inside their fused RoPE kernel would bypass set_kv_buffer
    (no codes): every loaded model module's helper is replaced by one that says no."""
    import sys

    import sglang.srt.models.utils as mutils

    fake = types.ModuleType("sglang.srt.models.fake_moe")
    fake.enable_fused_set_kv_buffer = mutils.enable_fused_set_kv_buffer
    monkeypatch.setitem(sys.modules, "sglang.srt.models.fake_moe", fake)
    monkeypatch.setattr(mutils, "enable_fused_set_kv_buffer", mutils.enable_fused_set_kv_buffer)
    patched = plugin.disable_fused_kv_store()
    assert {"sglang.srt.models.fake_moe", "sglang.srt.models.utils"} <= set(patched)
    assert fake.enable_fused_set_kv_buffer(object()) is False
    assert mutils.enable_fused_set_kv_buffer(object()) is False
    assert "sglang.srt.models.fake_moe" not in plugin.disable_fused_kv_store()  # idempotent
