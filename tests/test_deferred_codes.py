"""Deferred code writes of a dense decode step, on real SGLang KV pools (CPU): nothing is
encoded while the layers store their keys, and after the last layer every layer's codes
are those the per-layer writes of an undeferred pool give."""

import types

import pytest
import torch

from sglang_pariskv.attention.deferred_codes import DeferredCodes
from sglang_pariskv.config import ParisKVConfig
from tests.test_plugin_pool import H, cpu_pool_only, make_pool

D, LAYERS = 64, 3


def _store_step(pool, deferred, loc, keys, values, check_early: bool = True):
    """One decode step's layers as the backend runs them: store, then ``after_layer``;
    returns whether any code was written before the last layer (``check_early``: look;
    not inside a CUDA-graph capture, where reading back would synchronize)."""
    early = False
    for layer in range(LAYERS):
        pool.set_kv_buffer(types.SimpleNamespace(layer_id=layer), loc, keys[layer], values[layer])
        if check_early and layer < LAYERS - 1:
            early |= any(bool(c.signs[loc].any()) for c in pool.pariskv.layers)
        deferred.after_layer(layer, loc)
    return early


def _both_ways(device) -> dict:
    """The same decode step stored with and without deferral: {defer: pool}."""
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(LAYERS, 5, H, D, generator=gen).to(torch.bfloat16).to(device)
    values = torch.randn(LAYERS, 5, H, D, generator=gen).to(torch.bfloat16).to(device)
    loc = torch.tensor([3, 9, 4, 17, 30], device=device)
    pools = {}
    for defer in (True, False):
        pool = make_pool(64, head_dim=D, layers=LAYERS, device=device)
        deferred = DeferredCodes(pool, ParisKVConfig(), offloaded=False)
        deferred.plan(decode_step=defer)
        early = _store_step(pool, deferred, loc, keys, values)
        assert early is not defer  # per-layer writes land at once, deferred ones do not
        pools[defer] = pool
    assert pools[True].pariskv.layers[2].signs[loc].any()
    return pools


def _same_codes(pools: dict) -> None:
    for got, want in zip(pools[True].pariskv.layers, pools[False].pariskv.layers):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@cpu_pool_only
def test_a_deferred_step_writes_every_layers_codes_after_the_last_layer():
    """CPU: the codec encodes each layer's stored keys at the end."""
    _same_codes(_both_ways("cpu"))


@pytest.mark.gpu
def test_the_one_launch_encode_gives_the_per_layer_kernels_codes(cuda_device):
    """CUDA: one launch of the all-layers kernel against the per-layer kernel's writes."""
    _same_codes(_both_ways(cuda_device))


@pytest.mark.gpu
def test_a_captured_deferred_step_encodes_the_keys_of_each_replay(cuda_device):
    """The address tables are made before capture; each replay encodes that replay's keys."""
    pool = make_pool(64, head_dim=D, layers=LAYERS, device=cuda_device)
    deferred = DeferredCodes(pool, ParisKVConfig(), offloaded=False)
    loc = torch.tensor([3, 9], device=cuda_device)
    keys = torch.zeros(LAYERS, 2, H, D, dtype=torch.bfloat16, device=cuda_device)
    deferred.plan(decode_step=True)
    _store_step(pool, deferred, loc, keys, keys)  # warm-up (Triton compiles outside capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _store_step(pool, deferred, loc, keys, keys, check_early=False)
    for seed in (1, 2):
        keys.copy_(torch.randn(keys.shape, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        ref = make_pool(64, head_dim=D, layers=LAYERS, device=cuda_device)
        for layer in range(LAYERS):  # per-layer writes of the same keys
            ref.set_kv_buffer(types.SimpleNamespace(layer_id=layer), loc, keys[layer], keys[layer])
        for got, want in zip(pool.pariskv.layers, ref.pariskv.layers):
            for a, b in zip(got, want):
                assert torch.equal(a[loc], b[loc])


@cpu_pool_only
def test_the_next_extend_writes_per_layer_again():
    pool = make_pool(64, head_dim=D, layers=LAYERS)
    deferred = DeferredCodes(pool, ParisKVConfig(), offloaded=False)
    deferred.plan(decode_step=True)
    deferred.plan(decode_step=False)  # init_forward_metadata of an extend
    k = torch.randn(2, H, D).to(torch.bfloat16)
    pool.set_kv_buffer(types.SimpleNamespace(layer_id=0), torch.tensor([5, 6]), k, k)
    assert pool.pariskv.layers[0].signs[torch.tensor([5, 6])].any()
