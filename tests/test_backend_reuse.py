"""ParisKVAttnBackend with retrieval reuse, on the CPU, against a float64 oracle that runs
the codec's reuse rule (codec/reuse.py) per request: decode over steps, a request taking
over a slot through a real extend, counters in Prometheus and the stats snapshot.

Real and stand-in pieces as in test_backend_decode (whose fixture this module uses: the GPU
pool and host offload with a hot cache)."""

import dataclasses
import types

import pytest
import torch
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

from sglang_pariskv.attention.offload_wiring import OffloadDecode
from sglang_pariskv.attention.reuse import RetrievalReuse
from sglang_pariskv.codec import sparse_attention
from sglang_pariskv.codec.reuse import KeptSelection, retrieve_with_reuse
from sglang_pariskv.kernels import DecodeWorkspace
from tests.test_backend_decode import (  # noqa: F401
    CFG,
    HKV,
    HQ,
    MAX_CTX,
    D,
    TorchHeadAsBatch,
    decode_batch,
    extend_batch,
    extend_stand_in,
    setup,
)

RCFG = dataclasses.replace(CFG, reuse_threshold=0.9, reuse_max_age=4)
LAYER = types.SimpleNamespace(layer_id=0, is_cross_attention=False)


def with_reuse(b, pool, cfg=RCFG):
    """The fixture's backend, rebuilt for ``cfg`` (workspace, sparse call, kept state)."""
    ws = DecodeWorkspace(
        cfg, HQ, HKV, D, max_batch=4, max_context=MAX_CTX, device="cpu",
        chunk=64, scan_block=16, scan_tiles=4,
    )  # fmt: skip
    b.__dict__.update(config=cfg, ws=ws, eager_sparse=TorchHeadAsBatch(ws))
    b.reuse = RetrievalReuse.build(cfg, 4, 1, HKV, D, ws.kept_width, torch.device("cpu"))
    b.observer.extra_snapshot = b._extra_snapshot  # what the backend's constructor wires
    if b.offload is not None:
        small = dataclasses.replace(cfg, offload="host", host_pool_gb=1.0, hot_cache_lines=32)
        b.offload = OffloadDecode(pool, small, ws)
    return b


class Oracle:
    """Float64 decode of each request with its own kept selection (a new request starts
    with none, whatever slot it gets)."""

    def __init__(self, pool, rtp):
        self.pool, self.rtp, self.kept = pool, rtp, {}

    def start(self, req_id):
        self.kept[req_id] = KeptSelection.empty(1, HKV, D, RCFG.reuse_kept)

    def __call__(self, req_ids, rpi, seq, q):
        out, fresh = [], []
        for j, (rid, slot) in enumerate(zip(req_ids, rpi)):
            slots = self.rtp.req_to_token[slot, : seq[j]].long()
            codes = self.pool.pariskv.layers[0].index(slots[None])
            sel, self.kept[rid], got = retrieve_with_reuse(
                q[j : j + 1].double(), codes, torch.tensor([seq[j]]), RCFG, self.kept[rid]
            )
            kk = self.pool.get_key_buffer(0)[slots][None].double()
            vv = self.pool.get_value_buffer(0)[slots][None].double()
            out.append(sparse_attention(q[j : j + 1].double(), kk, vv, sel.positions, sel.valid))
            fresh.append(bool(got.any()))
        return torch.cat(out), fresh


class Driver:
    """Extends (through the backend's planning and forward_extend) and decode steps of one
    layer."""

    def __init__(self, b, pool, rtp, seed):
        self.b, self.pool, self.rtp = b, pool, rtp
        self.gen = torch.Generator().manual_seed(seed)
        self.next_slot = 1

    def extend(self, rpi, slots):
        n = len(slots)
        fb = extend_batch(self.rtp, [rpi], [n], slots)
        k = torch.randn(n, HKV, D, generator=self.gen)
        v = torch.randn(n, HKV, D, generator=self.gen)
        self.b.init_forward_metadata(fb)  # plans the extend (and resets the slot's state)
        self.b.forward_extend(torch.zeros(n, HQ * D), k, v, LAYER, fb)

    def decode(self, rpi, seq, locs, q):
        fb = decode_batch(self.rtp, rpi, seq, locs)
        k = torch.randn(len(rpi), HKV, D, generator=self.gen)
        self.b.init_forward_metadata(fb)
        out = self.b.forward_decode(q.reshape(len(rpi), -1), k, k.clone(), LAYER, fb)
        return out.view(-1, HQ, D).double()


@pytest.fixture
def reuse_setup(setup, monkeypatch):  # noqa: F811
    b, pool, rtp = setup
    monkeypatch.setattr(FlashInferAttnBackend, "forward_extend", extend_stand_in)
    return with_reuse(b, pool), pool, rtp


def test_decode_with_reuse_matches_the_oracle(reuse_setup):
    from prometheus_client import CollectorRegistry

    from sglang_pariskv.metrics import ParisKVMetrics

    b, pool, rtp = reuse_setup
    reg = CollectorRegistry()
    b.observer.metrics = ParisKVMetrics({"tp_rank": "0"}, registry=reg)
    drv, oracle = Driver(b, pool, rtp, seed=0), Oracle(pool, rtp)
    drv.extend(3, torch.arange(1, 301))  # sparse (300 > 64)
    drv.extend(1, torch.arange(301, 341))  # dense (40)
    oracle.start("a")
    oracle.start("b")
    q = torch.randn(2, HQ, D, generator=drv.gen)
    log = []
    for step in range(7):
        seq = [301 + step, 41 + step]
        if step == 2:  # request a's query turns: it retrieves again before its max age
            q[0] = torch.randn(HQ, D, generator=drv.gen)
        got = drv.decode([3, 1], seq, [400 + 2 * step, 401 + 2 * step], q)
        want, fresh = oracle(["a", "b"], [3, 1], seq, q)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        assert b.ws.reuse_fresh[:2].tolist() == [int(fresh[0]), 0]
        log.append(fresh[0])
    assert log == [True, False, True, False, False, False, True]  # max age 4
    # Counters: the device totals, read back at the next planning, reach the stats
    # snapshot and Prometheus (the dense request counts in neither).
    drv.decode([3, 1], [308, 48], [420, 421], q)
    snap = b.snapshot()
    assert snap["reuse_retrieved_request_layers"] == 3
    assert snap["reuse_reused_request_layers"] == 4
    assert snap["reuse_retrieved_fraction"] == pytest.approx(3 / 7)
    for name, want in (("retrieved", 3), ("reused", 4)):
        labels = {"tp_rank": "0"}
        got = reg.get_sample_value(f"sglang:pariskv_{name}_request_layers_total", labels)
        assert got == want


@pytest.mark.parametrize("reset", [True, False])
def test_a_request_taking_over_a_slot_retrieves_for_itself(reuse_setup, monkeypatch, reset):
    """A decodes on slot 2; B then extends on slot 2 (same KV slots, new K/V) with the
    very same query, so its first step would reuse A's selection if the extend did not
    reset the slot. Without the reset (``reset=False``) the outputs differ from B's oracle:
    the check can fail."""
    b, pool, rtp = reuse_setup
    if not reset:
        monkeypatch.setattr(RetrievalReuse, "extended", lambda self, rpi: None)
    drv, oracle = Driver(b, pool, rtp, seed=3), Oracle(pool, rtp)
    slots = torch.randperm(500, generator=drv.gen)[:300] + 1
    q = torch.randn(1, HQ, D, generator=drv.gen)
    drv.extend(2, slots)
    oracle.start("A")
    for t in range(2):
        got = drv.decode([2], [301 + t], [600 + t], q)
        torch.testing.assert_close(got, oracle(["A"], [2], [301 + t], q)[0], atol=2e-5, rtol=1e-5)
    drv.extend(2, slots)  # B: a new request on A's slot
    oracle.start("B")
    got = drv.decode([2], [302], [700], q)
    want, fresh = oracle(["B"], [2], [302], q)
    assert fresh == [True]
    if reset:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        assert b.ws.reuse_fresh[0] == 1
    else:
        assert b.ws.reuse_fresh[0] == 0  # B attended A's kept selection
        assert not torch.allclose(got, want, atol=2e-5, rtol=1e-5)
