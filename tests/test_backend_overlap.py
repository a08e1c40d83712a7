"""Decode overlap: each layer's retrieval runs on a second stream, forked from the forward
stream right after the layer's KV write, while SGLang's dense decode call runs."""

import types

import pytest
import torch

from sglang_pariskv.attention.backend import ParisKVAttnBackend, overlap_from_env
from sglang_pariskv.index.kv_pool import ParisKVTokenToKVPool
from sglang_pariskv.server_flags import ParisKVConfigError


def _backend(**kw):
    b = object.__new__(ParisKVAttnBackend)
    b.__dict__.update({"_retrieval_stream": "stream", "_sparse": "sparse call", "fetcher": None})
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
    b = _backend()
    b.fetcher = "host offload"  # its fetch and copy streams keep the serial order
    assert b._fork_stream(layer, k, True) is None
    assert _backend()._fork_stream(layer, None, True) is None  # no KV written
    assert _backend()._fork_stream(layer, k, False) is None
    cross = types.SimpleNamespace(is_cross_attention=True)
    assert _backend()._fork_stream(cross, k, True) is None


def test_overlap_flag(monkeypatch):
    monkeypatch.delenv("SGLANG_PARISKV_OVERLAP", raising=False)
    assert overlap_from_env()
    monkeypatch.setenv("SGLANG_PARISKV_OVERLAP", "0")
    assert not overlap_from_env()
    monkeypatch.setenv("SGLANG_PARISKV_OVERLAP", "yes")
    with pytest.raises(ParisKVConfigError, match="SGLANG_PARISKV_OVERLAP"):
        overlap_from_env()


@pytest.mark.gpu
@pytest.mark.parametrize("fork", [True, False])
def test_retrieval_stream_sees_the_layers_kv_and_codes(cuda_device, fork):
    """With the fork, work queued on the retrieval stream after the write reads the new
    K and its codes even though the forward stream is still busy before the write;
    without it (the control) the same reads run first and see the old values."""
    pool = ParisKVTokenToKVPool(
        size=4096, page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=64, layer_num=1,
        device="cuda", enable_memory_saver=False, enable_alt_stream=False,
    )  # fmt: skip
    side = torch.cuda.Stream()
    layer = types.SimpleNamespace(layer_id=0)
    loc = torch.arange(100, 164, device=cuda_device)
    k = torch.randn(64, 2, 64, device=cuda_device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    signs = pool.pariskv.layers[0].signs
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # the forward stream is busy: the write lands late
    if fork:
        pool.fork_after_write = side
    pool.set_kv_buffer(layer, loc, k, v)
    assert pool.fork_after_write is None  # one write, one fork
    with torch.cuda.stream(side):
        got_k = pool.get_key_buffer(0)[loc].clone()
        got_signs = signs[loc].clone()
    torch.cuda.synchronize()
    assert bool(signs[loc].any())  # the codes were written (random keys: some sign set)
    assert torch.equal(got_k, k) == fork
    assert torch.equal(got_signs, signs[loc]) == fork
