"""Prefill over host offload: the prefix rows an extend attends are staged on the device
(the staged rows themselves: test_offload_prefill_staging_rows.py).

On the CPU, the ParisKV backend over host offload's pool runs a two-chunk prefill of two
requests whose slots are scattered through the pool. SGLang's FlashInfer
planner and extend call are torch stand-ins that behave as SGLang's ragged-plus-paged
extend does (the paged wrapper keeps the prefix slots it was planned with as
``_paged_kv_indices_buf``; the extend reads ``get_kv_buffer`` before it stores the
chunk). The oracle is float64 causal attention over each request's own K/V, independent
of the pool: staged rows at the wrong place, or a wrapper left pointing at slots while
the buffer holds rows, give a different output.
"""

import types

import pytest
import torch
from prometheus_client import CollectorRegistry
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

from sglang_pariskv.attention.backend import ParisKVAttnBackend
from sglang_pariskv.attention.deferred_codes import DeferredCodes
from sglang_pariskv.attention.observability import DecodeObserver
from sglang_pariskv.attention.offload_wiring import OffloadPrefill
from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.metrics import ParisKVMetrics
from sglang_pariskv.offload.kv_pool import HostOffloadKVPool
from tests.test_plugin_pool import cpu_pool_only, make_pool

HQ, HKV, D, MAX_CTX = 4, 2, 16, 256


# -- the backend's extend over host offload ---------------------------------------------
def plan_extend_stand_in(self, fb):
    """SGLang's FlashInfer extend planning (ragged + paged): the paged wrapper's indices
    are every request's prefix slots, which FlashInfer's plan keeps as
    ``_paged_kv_indices_buf``."""
    rtt = self.req_to_token_pool.req_to_token
    idx, indptr = [], [0]
    for r, p in zip(fb.req_pool_indices.tolist(), fb.extend_prefix_lens_cpu):
        idx.append(rtt[r, :p])
        indptr.append(indptr[-1] + p)
    wrapper = types.SimpleNamespace(
        _paged_kv_indices_buf=torch.cat(idx).to(torch.int32), kv_indptr=indptr
    )
    self.forward_metadata = types.SimpleNamespace(
        prefill_wrappers=[wrapper], use_ragged=True, extend_no_prefix=not any(indptr)
    )


def extend_stand_in(self, q, k, v, layer, fb, save_kv_cache=True):
    """SGLang's FlashInfer extend: the pool's K/V buffers (read before the chunk is stored)
    at the paged wrapper's indices, then the chunk's own K/V, causal; then the store."""
    w = self.forward_metadata.prefill_wrappers[0]
    kc, vc = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
    out, start = [], 0
    for i, n in enumerate(fb.extend_seq_lens_cpu):
        rows = w._paged_kv_indices_buf[w.kv_indptr[i] : w.kv_indptr[i + 1]].long()
        kk = torch.cat([kc[rows], k[start : start + n]]).double()
        vv = torch.cat([vc[rows], v[start : start + n]]).double()
        out.append(causal_attention(q[start : start + n].view(n, HQ, D).double(), kk, vv))
        start += n
    self.token_to_kv_pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
    return torch.cat(out).reshape(start, HQ * D).to(q.dtype)


def causal_attention(q, k, v):
    """q [n, Hq, D] are the last n positions of k, v [m, Hkv, D]; float64."""
    n, m = q.shape[0], k.shape[0]
    kh = k.repeat_interleave(HQ // HKV, 1)
    vh = v.repeat_interleave(HQ // HKV, 1)
    s = torch.einsum("nhd,mhd->hnm", q, kh) * D**-0.5
    future = torch.arange(m)[None, :] > (torch.arange(n)[:, None] + m - n)
    w = torch.softmax(s.masked_fill(future, float("-inf")), -1)
    return torch.einsum("hnm,mhd->nhd", w, vh)


@pytest.fixture
def backend(monkeypatch):
    monkeypatch.setattr(FlashInferAttnBackend, "init_forward_metadata", plan_extend_stand_in)
    monkeypatch.setattr(FlashInferAttnBackend, "forward_extend", extend_stand_in)
    cfg = ParisKVConfig(
        topk=16, sink=4, local=8, dense_threshold=64, offload="host", host_pool_gb=1.0
    )
    pool = make_pool(
        2048, heads=HKV, head_dim=D, layers=2, dtype=torch.float32, cls=HostOffloadKVPool
    )
    rtp = ReqToTokenPool(size=4, max_context_len=MAX_CTX, device="cpu", enable_memory_saver=False)
    b = object.__new__(ParisKVAttnBackend)  # host-side state only: the stand-ins above
    b.__dict__.update(
        config=cfg, token_to_kv_pool=pool, req_to_token_pool=rtp, page_size=1, _sparse=None,
        deferred=DeferredCodes(pool, cfg, offloaded=True),
        observer=DecodeObserver(num_layers=2, tp_rank=0),
        prefill=OffloadPrefill(pool, MAX_CTX, "cpu"),
    )  # fmt: skip
    return b, pool, rtp


def extend_batch(rtp, rpi, prefix, new, loc):
    """An extend of ``new[j]`` tokens after ``prefix[j]`` cached ones for request
    ``rpi[j]``, writing slots ``loc`` (recorded in ``req_to_token``)."""
    start = 0
    for r, p, n in zip(rpi, prefix, new):
        rtp.req_to_token[r, p : p + n] = loc[start : start + n].to(torch.int32)
        start += n
    mode = types.SimpleNamespace(is_decode=lambda: False, is_extend=lambda: True)
    return types.SimpleNamespace(
        forward_mode=mode, batch_size=len(rpi), req_pool_indices=torch.tensor(rpi),
        out_cache_loc=loc, extend_prefix_lens_cpu=list(prefix), extend_seq_lens_cpu=list(new),
    )  # fmt: skip


@cpu_pool_only
def test_a_chunked_prefill_attends_the_staged_prefix_as_dense_attention_would(backend):
    b, pool, rtp = backend
    reg = CollectorRegistry()
    b.observer.metrics = ParisKVMetrics({"tp_rank": "0"}, registry=reg)
    gen = torch.Generator().manual_seed(1)
    rpi, chunks = [2, 0], [(30, 50), (25, 40)]  # per request: first chunk, second chunk
    total = [a + c for a, c in chunks]
    free = torch.randperm(2047, generator=gen)[: sum(total)] + 1  # scattered slots
    layers = [types.SimpleNamespace(layer_id=i, is_cross_attention=False) for i in (0, 1)]
    kv = {(r, i): [torch.randn(n, HKV, D, generator=gen) for _ in "kv"]
          for r, n in zip(rpi, total) for i in (0, 1)}  # fmt: skip
    q = {r: torch.randn(n, HQ, D, generator=gen) for r, n in zip(rpi, total)}
    taken = 0
    for c in (0, 1):
        prefix = [0, 0] if c == 0 else [a for a, _ in chunks]
        new = [ch[c] for ch in chunks]
        loc = free[taken : taken + sum(new)]
        taken += sum(new)
        fb = extend_batch(rtp, rpi, prefix, new, loc)
        b.init_forward_metadata(fb)
        assert b.prefill.staging.active == (c == 1)
        for layer in layers:
            mine = list(zip(rpi, prefix, new))
            qs = torch.cat([q[r][p : p + n] for r, p, n in mine])
            ks, vs = (
                torch.cat([kv[r, layer.layer_id][j][p : p + n] for r, p, n in mine]) for j in (0, 1)
            )
            got = b.forward_extend(qs.reshape(len(qs), -1), ks, vs, layer, fb)
            start = 0
            for r, p, n in zip(rpi, prefix, new):
                kk, vv = (x[: p + n].double() for x in kv[r, layer.layer_id])
                want = causal_attention(q[r][p : p + n].double(), kk, vv)
                torch.testing.assert_close(
                    got[start : start + n].view(n, HQ, D).double(), want, atol=1e-5, rtol=1e-5
                )
                start += n
    # the second chunk's prefix came from staging (what operators read: the stats
    # file's snapshot and the Prometheus counters); the writes still reached host memory
    want = {"prefill_staged_extends": 1, "prefill_staged_rows": 55, "prefill_direct_extends": 0}
    assert b.prefill.snapshot() == want
    for name, value in want.items():
        sample = reg.get_sample_value(f"sglang:pariskv_{name}_total", {"tp_rank": "0"})
        assert (sample or 0) == value, name
    for r, n in zip(rpi, total):
        slots = rtp.req_to_token[r, :n].long()
        torch.testing.assert_close(pool.host.data[1, 0][slots], kv[r, 1][0], rtol=0, atol=0)
    # outside an extend's attention the pool hands out its host buffers, as before
    assert pool.get_kv_buffer(0)[0].data_ptr() == pool.host.data[0, 0].data_ptr()
    with b.prefill.reads(0):
        assert pool.get_kv_buffer(0)[0].data_ptr() == b.prefill.staging.kv[0][0].data_ptr()
    # the next batch's plan replaces the staging: a decode step stages nothing
    b.prefill.plan(types.SimpleNamespace(forward_mode=types.SimpleNamespace(
        is_extend=lambda: False), extend_prefix_lens_cpu=None), None, 1)  # fmt: skip
    with b.prefill.reads(0):
        assert pool.get_kv_buffer(0)[0].data_ptr() == pool.host.data[0, 0].data_ptr()


@cpu_pool_only
def test_an_extend_that_cannot_be_staged_reads_host_memory_and_says_why(caplog):
    pool = make_pool(256, heads=HKV, head_dim=D, layers=1, cls=HostOffloadKVPool)
    prefill = OffloadPrefill(pool, 64, "cpu")
    rtp = ReqToTokenPool(size=2, max_context_len=MAX_CTX, device="cpu", enable_memory_saver=False)
    fb = extend_batch(rtp, [0], [10], [5], torch.arange(1, 6))
    wrapper = types.SimpleNamespace(_paged_kv_indices_buf=torch.arange(20, 35, dtype=torch.int32))
    paged_only = types.SimpleNamespace(
        prefill_wrappers=[wrapper], use_ragged=False, extend_no_prefix=False
    )
    with caplog.at_level("WARNING", logger="sglang_pariskv"):
        for _ in range(2):
            delta = prefill.plan(fb, paged_only, 1)
            assert delta["prefill_direct_extends"] == 1 and not prefill.staging.active
        assert prefill.plan(fb, None, 1)["prefill_direct_extends"] == 1
    # the wrapper keeps its slots (FlashInfer reads host memory at them); one line per reason
    assert wrapper._paged_kv_indices_buf.tolist() == list(range(20, 35))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "without the ragged wrapper" in lines[0] and "prefill CUDA graph" in lines[1]
    # a prefix longer than the buffer
    long = extend_batch(rtp, [1], [70], [1], torch.arange(100, 101))
    ragged = types.SimpleNamespace(prefill_wrappers=[wrapper], use_ragged=True,
                                   extend_no_prefix=False)  # fmt: skip
    wrapper._paged_kv_indices_buf = torch.arange(70, dtype=torch.int32)
    with caplog.at_level("WARNING", logger="sglang_pariskv"):
        assert prefill.plan(long, ragged, 1)["prefill_direct_extends"] == 1
    assert "70 prefix tokens, more than the 64 rows" in caplog.records[-1].getMessage()
