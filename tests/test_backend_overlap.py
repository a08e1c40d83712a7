"""Decode overlap: a sparse layer stores its K/V, then forks a second stream for its
retrieval, while SGLang's dense decode call (told the KV is stored) runs."""

import types

import pytest
import torch
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

from sglang_pariskv.attention.backend import ParisKVAttnBackend
from sglang_pariskv.attention.deferred_codes import DeferredCodes
from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.index.kv_pool import ParisKVTokenToKVPool


def _backend(**kw):
    b = object.__new__(ParisKVAttnBackend)
    b.__dict__.update({"_retrieval_stream": "stream", "_sparse": "sparse call"})
    b.__dict__.update(kw)
    return b


def test_fork_only_for_a_sparse_step_that_writes_this_layers_kv():
    layer = types.SimpleNamespace(is_cross_attention=False)
    k = torch.zeros(1)
    assert _backend()._fork_stream(layer, k, True) == "stream"
    assert _backend(_retrieval_stream=None)._fork_stream(layer, k, True) is None  # off
    b = _backend()
    b._sparse = None  # an all-dense step: nothing to overlap
    assert b._fork_stream(layer, k, True) is None
    assert _backend()._fork_stream(layer, None, True) is None  # no KV written
    assert _backend()._fork_stream(layer, k, False) is None
    cross = types.SimpleNamespace(is_cross_attention=True)
    assert _backend()._fork_stream(cross, k, True) is None


@pytest.mark.gpu
@pytest.mark.parametrize("sparse", [True, False])
def test_retrieval_stream_sees_the_layers_kv_and_codes(cuda_device, monkeypatch, sparse):
    """On a sparse step the backend stores the K/V before the dense call and forks the
    retrieval stream behind the store: work queued there reads the new K and its codes
    although the forward stream is still busy. The dense call is told not to store again.
    On an all-dense step (the control) nothing forks and the dense call stores."""
    pool = ParisKVTokenToKVPool(
        size=4096, page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=64, layer_num=1,
        device="cuda", enable_memory_saver=False, enable_alt_stream=False,
    )  # fmt: skip
    side = torch.cuda.Stream()
    b = _backend(_retrieval_stream=side, _sparse="sparse call" if sparse else None)
    b.token_to_kv_pool = pool
    b.deferred = DeferredCodes(pool, ParisKVConfig(), offloaded=True)  # writes per layer
    layer = types.SimpleNamespace(layer_id=0, is_cross_attention=False, k_scale=None, v_scale=None)
    loc = torch.arange(100, 164, device=cuda_device)
    k = torch.randn(64, 2, 64, device=cuda_device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    signs = pool.pariskv.layers[0].signs
    seen = {}

    def dense_call(self, q, k_, v_, layer_, fb, save_kv_cache=True):
        seen["dense_stores"] = save_kv_cache
        if save_kv_cache:
            pool.set_kv_buffer(layer_, fb.out_cache_loc, k_, v_)
        return torch.zeros(64, 1, device=cuda_device)

    def retrieval(self, q, k_, layer_, fb, save_kv_cache):
        seen["k"] = pool.get_key_buffer(0)[loc].clone()
        seen["signs"] = signs[loc].clone()

    monkeypatch.setattr(FlashInferAttnBackend, "forward_decode", dense_call)
    monkeypatch.setattr(ParisKVAttnBackend, "_sparse_decode", retrieval)
    fb = types.SimpleNamespace(out_cache_loc=loc, batch_size=64)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # the forward stream is busy: the write lands late
    b.forward_decode(torch.zeros(64, 1, device=cuda_device), k, v, layer, fb)
    torch.cuda.synchronize()
    assert seen["dense_stores"] is not sparse  # stored once, by whoever went first
    assert torch.equal(pool.get_key_buffer(0)[loc], k) and bool(signs[loc].any())
    if sparse:
        assert torch.equal(seen["k"], k) and torch.equal(seen["signs"], signs[loc])
