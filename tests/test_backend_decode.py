"""ParisKVAttnBackend's decode layer against a float64 torch oracle, on the CPU.

Real pieces: SGLang's ReqToTokenPool, ParisKV's KV pool (codes written with every KV
write), the backend's host planning, the retrieval workspace (Triton interpreter) and
the dense/sparse row selection. Stand-ins, because they are FlashInfer GPU kernels: SGLang's
dense decode call (a torch dense attention that also stores the step's KV, as FlashInfer's
backend does) and the head-as-batch FlashInfer call (a torch attention over the
workspace's ``kv_indices``). The oracle is independent of both: ``codec.retrieve`` over
the request's codes, then float64 attention over the positions it selects (all positions
for requests at or below the dense threshold).
"""

import dataclasses
import types

import pytest
import torch
from sglang.srt.layers.attention.flashinfer_backend import (
    FlashInferAttnBackend,
)
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

from sglang_pariskv.attention.backend import ParisKVAttnBackend
from sglang_pariskv.attention.deferred_codes import DeferredCodes
from sglang_pariskv.attention.observability import DecodeObserver
from sglang_pariskv.attention.offload_wiring import OffloadDecode
from sglang_pariskv.attention.step_graphs import StepGraphs
from sglang_pariskv.codec import encode_keys, retrieve, sparse_attention
from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.index.kv_pool import ParisKVTokenToKVPool
from sglang_pariskv.kernels import DecodeWorkspace
from sglang_pariskv.offload.kv_pool import HostOffloadKVPool
from tests.test_plugin_pool import cpu_pool_only, make_pool

pytestmark = cpu_pool_only

HQ, HKV, D, MAX_CTX = 4, 2, 16, 512
CFG = ParisKVConfig(topk=16, sink=4, local=8, dense_threshold=64, min_sparse_tokens=0)
SCALE = D**-0.5


class TorchHeadAsBatch:
    """Stand-in for HeadAsBatchDecode: row r*Hkv + h attends its query group over
    ``kv_indices`` = slot * Hkv + h, exactly the layout FlashInfer is given."""

    def __init__(self, ws):
        self.ws = ws

    def plan(self, seq_lens_cpu, sm_scale=None, logits_soft_cap=0.0):
        self.rows = self.ws.plan(seq_lens_cpu).numel() - 1
        self.scale = sm_scale

    def entries(self):
        return self.rows * self.ws.max_row

    def run_staged(self, q, staging_kv):
        """Host offload: the indices are rows of the hot cache's [rows, 2, 1, 1, D]."""
        kv = staging_kv.view(-1, 2, staging_kv.shape[-1])
        return self.run(q, kv[:, 0], kv[:, 1])

    def run(self, q, k_pool, v_pool):
        r, hq, d = q.shape
        g = hq // HKV
        ip, idx = self.ws.kv_indptr, self.ws.kv_indices
        kf, vf = k_pool.reshape(-1, d).float(), v_pool.reshape(-1, d).float()
        out = torch.zeros(r, hq, d)
        for row in range(r * HKV):
            i, h = divmod(row, HKV)
            sel = idx[ip[row] : ip[row + 1]].long()
            qq = q[i, h * g : (h + 1) * g].float()
            w = torch.softmax(qq @ kf[sel].T * self.scale, -1)
            out[i, h * g : (h + 1) * g] = w @ vf[sel]
        return out


def dense_decode_stand_in(self, q, k, v, layer, fb, save_kv_cache=True):
    """SGLang's FlashInfer decode: store the step's KV, attend every request densely."""
    pool = self.token_to_kv_pool
    if save_kv_cache:
        pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
    rtt = self.req_to_token_pool.req_to_token
    out = []
    for i in range(fb.batch_size):
        slots = rtt[fb.req_pool_indices[i], : int(fb.seq_lens[i])].long()
        kk = pool.get_key_buffer(0)[slots].float()  # [n, Hkv, D]
        vv = pool.get_value_buffer(0)[slots].float()
        qq = q.view(-1, HQ, D)[i].float()
        kh = kk.repeat_interleave(HQ // HKV, 1)
        vh = vv.repeat_interleave(HQ // HKV, 1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", qq, kh) * SCALE, -1)
        out.append(torch.einsum("hn,nhd->hd", w, vh).reshape(-1))
    return torch.stack(out).to(q.dtype)


def extend_stand_in(self, q, k, v, layer, fb, save_kv_cache=True):
    """SGLang's FlashInfer extend: store the new tokens' KV (output unused here)."""
    self.token_to_kv_pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
    return torch.zeros(q.shape[0], HQ * D)


def extend_batch(rtp, rpi, seq, loc) -> types.SimpleNamespace:
    """The forward batch of an extend of fresh prompts: request ``rpi[j]`` takes the next
    ``seq[j]`` slots of ``loc``, which ``req_to_token`` records."""
    start = 0
    for r, n in zip(rpi, seq):
        rtp.req_to_token[r, :n] = loc[start : start + n].to(torch.int32)
        start += n
    return types.SimpleNamespace(
        forward_mode=types.SimpleNamespace(is_decode=lambda: False, is_extend=lambda: True),
        batch_size=len(rpi), seq_lens=torch.tensor(seq), seq_lens_cpu=torch.tensor(seq),
        req_pool_indices=torch.tensor(rpi), out_cache_loc=loc,
        extend_seq_lens_cpu=list(seq), extend_prefix_lens_cpu=[0] * len(rpi),
    )  # fmt: skip


def decode_batch(rtp, rpi, seq, locs) -> types.SimpleNamespace:
    """The forward batch of a decode step: request ``rpi[j]``, ``seq[j]`` tokens long with
    its new one, writes slot ``locs[j]``, which ``req_to_token`` records."""
    for r, n, loc in zip(rpi, seq, locs):
        rtp.req_to_token[r, n - 1] = int(loc)
    return types.SimpleNamespace(
        forward_mode=types.SimpleNamespace(is_decode=lambda: True, is_extend=lambda: False),
        batch_size=len(rpi), seq_lens=torch.tensor(seq), seq_lens_cpu=torch.tensor(seq),
        seq_lens_sum=sum(seq), req_pool_indices=torch.tensor(rpi),
        out_cache_loc=torch.as_tensor(locs),
    )  # fmt: skip


@pytest.fixture(params=["gpu_pool", "host_offload"])
def setup(monkeypatch, request):
    """The backend over SGLang's pool, or over host offload's pool with a hot cache (the
    dense stand-in then reads the host pool, the sparse call the staged rows)."""
    return make_backend(monkeypatch, CFG, offload=request.param == "host_offload")


def make_backend(monkeypatch, cfg: ParisKVConfig, offload: bool = False):
    """(backend, pool, req_to_token pool) for ``cfg``, the pool's codes laid out for it."""
    monkeypatch.setattr(FlashInferAttnBackend, "forward_decode", dense_decode_stand_in)
    monkeypatch.setattr(FlashInferAttnBackend, "init_forward_metadata", lambda self, fb: None)
    monkeypatch.setattr(ParisKVTokenToKVPool, "pariskv_config", cfg)
    pool = make_pool(
        2048, heads=HKV, head_dim=D, layers=1, dtype=torch.float32,
        cls=HostOffloadKVPool if offload else None,
    )  # fmt: skip
    rtp = ReqToTokenPool(size=4, max_context_len=MAX_CTX, device="cpu", enable_memory_saver=False)
    b = object.__new__(ParisKVAttnBackend)  # no FlashInfer workspace: CPU stand-ins above
    ws = DecodeWorkspace(
        cfg, HQ, HKV, D, max_batch=4, max_context=MAX_CTX, device="cpu",
        chunk=64, scan_block=16, scan_tiles=4,
    )  # fmt: skip
    b.__dict__.update(
        config=cfg, token_to_kv_pool=pool, req_to_token_pool=rtp, codes=pool.pariskv,
        hkv=HKV, d=D, hq=HQ, tp_rank=0, ws=ws, eager_sparse=TorchHeadAsBatch(ws),
        graph_sparse={}, _sparse=None, _rpi32=None, scale=(SCALE, 0.0),
        _dense_dev=torch.zeros(4, dtype=torch.bool), offload=None, _retrieval_stream=None,
        graphs=StepGraphs(), deferred=DeferredCodes(pool, cfg, offloaded=offload),
    )  # fmt: skip
    b.observer = DecodeObserver(num_layers=1, tp_rank=0, extra_snapshot=b._offload_snapshot)
    if offload:
        # 32 lines for ~2x(28 + 2) rows per step: hits, conflicts and overflow all occur
        small = dataclasses.replace(cfg, offload="host", host_pool_gb=1.0, hot_cache_lines=32)
        b.offload = OffloadDecode(pool, small, ws)
    return b, pool, rtp


def oracle(pool, rtp, rpi, seq, q, cfg: ParisKVConfig = CFG):
    """Float64: retrieve over the requests' own codes (with the pool's calibration scales
    on the query side; with ``cfg.rerank == "keys"`` ranking by the pool's keys), attend
    the selected positions."""
    out = []
    scale = pool.pariskv.calibration(0)[1]
    for i in range(len(rpi)):
        slots = rtp.req_to_token[rpi[i], : seq[i]].long()
        codes = pool.pariskv.layers[0].index(slots[None])
        kk = pool.get_key_buffer(0)[slots][None].double()
        vv = pool.get_value_buffer(0)[slots][None].double()
        sel = retrieve(q[i : i + 1].double(), codes, torch.tensor([seq[i]]), cfg, scale=scale,
                       keys=kk)  # fmt: skip
        out.append(sparse_attention(q[i : i + 1].double(), kk, vv, sel.positions, sel.valid))
    return torch.cat(out)


def prefill_random(pool, rtp, layer, rpi, seq, gen) -> int:
    """A "prefill": request ``rpi[j]`` gets ``seq[j]`` random K/V rows (and their codes) at
    consecutive slots from 1. Returns the next free slot."""
    next_slot = 1
    for i, n in zip(rpi, seq):
        slots = torch.arange(next_slot, next_slot + n)
        next_slot += n
        rtp.req_to_token[i, :n] = slots.to(torch.int32)
        pool.set_kv_buffer(layer, slots, torch.randn(n, HKV, D, generator=gen),
                           torch.randn(n, HKV, D, generator=gen))  # fmt: skip
    return next_slot


def decode_steps(b, rtp, layer, rpi, seq, next_slot, gen, steps):
    """``steps`` decode steps of requests ``rpi`` (``seq`` tokens before the first), each
    with random q/k/v and new slots from ``next_slot``, through the backend. Yields (the
    forward batch, its sequence lengths, q [R, Hq, D], k [R, Hkv, D], output [R, Hq, D])."""
    for _ in range(steps):
        seq = [n + 1 for n in seq]
        loc = torch.arange(next_slot, next_slot + len(rpi))
        next_slot += len(rpi)
        fb = decode_batch(rtp, rpi, seq, loc)
        q = torch.randn(len(rpi), HQ, D, generator=gen)
        k = torch.randn(len(rpi), HKV, D, generator=gen)
        v = torch.randn(len(rpi), HKV, D, generator=gen)
        b.init_forward_metadata(fb)
        got = b.forward_decode(q.reshape(len(rpi), -1), k, v, layer, fb).view(-1, HQ, D)
        yield fb, seq, q, k, got


@pytest.mark.parametrize("calibrated", [False, True])
def test_mixed_batch_decode_matches_the_oracle_over_steps(setup, calibrated):
    """Also with a calibration file's key centres and channel scales in the pool: the
    backend hands the layer's scales to retrieval's query side."""
    b, pool, rtp = setup
    gen = torch.Generator().manual_seed(0)
    if calibrated:
        pool.pariskv.centres = torch.randn(1, HKV, D, generator=gen)
        pool.pariskv.scales = torch.rand(1, HKV, D, generator=gen) * 4 + 0.2
    rpi, seq = [3, 1], [300, 40]  # one sparse request (300 > 64), one dense (40)
    layer = types.SimpleNamespace(layer_id=0, is_cross_attention=False)
    next_slot = prefill_random(pool, rtp, layer, rpi, seq, gen)
    for step in decode_steps(b, rtp, layer, rpi, seq, next_slot, gen, 3):
        fb, lens, q, _k, got = step  # fb: the last step's batch is planned again below
        want = oracle(pool, rtp, rpi, lens, q)
        assert b._dense_dev[:2].tolist() == [False, True]
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    assert b.observer.stats.sparse_steps == 3
    assert b.observer.stats.totals.sparse_request_steps == 3
    if b.offload is not None:  # the offloaded run went through the cache and reused rows
        st = b.offload.fetcher.cache.stats()
        assert st["hits"] > 0 and st["misses"] > 0 and st["rows_fetched"] > 0
        # what operators see: the reader's totals in the snapshot and the metrics
        from prometheus_client import CollectorRegistry

        from sglang_pariskv.metrics import ParisKVMetrics

        reg = CollectorRegistry()
        b.observer.metrics = ParisKVMetrics({"tp_rank": "0"}, registry=reg)
        b.init_forward_metadata(fb)  # the next batch's planning polls the counters
        snap = b.snapshot()
        assert snap["hot_cache_hits"] == st["hits"] and snap["hot_cache_misses"] == st["misses"]
        assert snap["offload_host_pool_gib"] > 0
        got = reg.get_sample_value("sglang:pariskv_hot_cache_hits_total", {"tp_rank": "0"})
        assert got == st["hits"]


@pytest.mark.parametrize("calibrated", [False, True])
def test_the_rerank_by_keys_ranks_by_the_layers_stored_keys(monkeypatch, calibrated):
    """--pariskv-rerank keys: over a pool holding sign signatures only, the backend hands
    retrieval the layer's K buffer, and a mixed batch matches the oracle that ranks the
    candidates by those keys, step after step (each step's new keys and signatures
    written by the backend). Ranking by the 3-bit code instead selects other keys here,
    so the test tells the two apart. With a calibration, its scales shape the collision
    stage's query and the rerank still ranks by the raw keys, as attention weighs them."""
    cfg = dataclasses.replace(CFG, rerank="keys")
    b, pool, rtp = make_backend(monkeypatch, cfg)
    assert pool.pariskv.layers[0].mags.numel() == 0  # no records to rank by
    gen = torch.Generator().manual_seed(5)
    if calibrated:
        pool.pariskv.centres = torch.randn(1, HKV, D, generator=gen)
        pool.pariskv.scales = torch.rand(1, HKV, D, generator=gen) * 4 + 0.2
    rpi, seq = [3, 1], [300, 40]
    layer = types.SimpleNamespace(layer_id=0, is_cross_attention=False)
    next_slot = prefill_random(pool, rtp, layer, rpi, seq, gen)
    differs = 0
    for fb, lens, q, k, got in decode_steps(b, rtp, layer, rpi, seq, next_slot, gen, 3):
        got = got.double()
        torch.testing.assert_close(got, oracle(pool, rtp, rpi, lens, q, cfg), atol=2e-5,
                                   rtol=1e-5)  # fmt: skip
        centre, scale = pool.pariskv.calibration(0)
        want = encode_keys(k, centre=centre, scale=scale).signs
        assert torch.equal(pool.pariskv.layers[0].signs[fb.out_cache_loc], want)
        slots = rtp.req_to_token[rpi[0], : lens[0]].long()
        kk = pool.get_key_buffer(0)[slots][None].double()
        by_code = retrieve(q[:1].double(), encode_keys(kk), torch.tensor(lens[:1]), CFG)
        by_code = sparse_attention(q[:1].double(), kk, pool.get_value_buffer(0)[slots][None]
                                   .double(), by_code.positions, by_code.valid)  # fmt: skip
        differs += not torch.allclose(got[:1], by_code, atol=2e-5, rtol=1e-5)
    assert differs > 0
    assert b.observer.stats.totals.sparse_request_steps == 3


def test_step_tensors_are_made_inside_every_captured_run(setup, monkeypatch):
    """SGLang's decode graph capture plans once (``init_forward_metadata_out_graph``), then
    runs the forward twice (warm-up, then the recorded run), each preceded by
    ``init_forward_metadata_in_graph``. A tensor the layers read must be produced inside
    the recorded run, else every replay reads the warm-up's stale copy (on a GPU that
    collapsed passkey retrieval under CUDA graphs)."""
    b, pool, rtp = setup
    monkeypatch.setattr(
        FlashInferAttnBackend, "init_forward_metadata_out_graph", lambda self, fb, c=False: None
    )
    layer = types.SimpleNamespace(layer_id=0, is_cross_attention=False)
    gen = torch.Generator().manual_seed(1)
    n = 200
    rtp.req_to_token[2, :n] = torch.arange(1, n + 1, dtype=torch.int32)
    pool.set_kv_buffer(layer, torch.arange(1, n + 1), torch.randn(n, HKV, D, generator=gen),
                       torch.randn(n, HKV, D, generator=gen))  # fmt: skip
    b.graph_sparse[1] = TorchHeadAsBatch(b.ws)
    fb = types.SimpleNamespace(
        forward_mode=types.SimpleNamespace(is_decode=lambda: True, is_extend=lambda: False),
        batch_size=1, seq_lens=torch.tensor([n]), seq_lens_cpu=torch.tensor([n]),
        seq_lens_sum=n, req_pool_indices=torch.tensor([2]), out_cache_loc=torch.tensor([n]),
    )  # fmt: skip
    q = torch.randn(1, HQ * D, generator=gen)
    kv = torch.randn(1, HKV, D, generator=gen)
    b.init_forward_metadata_out_graph(fb, in_capture=True)
    with pytest.raises(RuntimeError, match="step tensors"):
        b.forward_decode(q, kv, kv, layer, fb, save_kv_cache=False)
    read = []
    for _run in ("warm-up", "recorded"):
        b.init_forward_metadata_in_graph(fb)
        read.append(b._rpi32)
        b.forward_decode(q, kv, kv, layer, fb, save_kv_cache=False)
        assert b._rpi32 is read[-1]  # every layer of the run reads the run's own tensor
    assert read[1] is not read[0]
    assert read[1].dtype == torch.int32 and read[1].tolist() == [2]


def test_slots_reused_by_a_new_request_are_never_served_stale(setup):
    """Request A decodes (its rows enter the hot cache with offload), finishes, and its
    slots go to request B, whose prefill writes new K/V there; B's decode must attend B's
    K/V (the oracle reads the pool). Then A's slots are reused once more, mid-run, by C
    while B keeps decoding. Both runs (GPU pool, host offload) must match the oracle."""
    b, pool, rtp = setup
    gen = torch.Generator().manual_seed(7)
    layer = types.SimpleNamespace(layer_id=0, is_cross_attention=False)

    def prefill(req, slots):
        rtp.req_to_token[req, : len(slots)] = slots.to(torch.int32)
        n = len(slots)
        pool.set_kv_buffer(layer, slots, torch.randn(n, HKV, D, generator=gen),
                           torch.randn(n, HKV, D, generator=gen))  # fmt: skip

    def decode(reqs, seqs, locs):
        fb = decode_batch(rtp, reqs, seqs, locs)
        q = torch.randn(len(reqs), HQ, D, generator=gen)
        k = torch.randn(len(reqs), HKV, D, generator=gen)
        b.init_forward_metadata(fb)
        got = b.forward_decode(q.reshape(len(reqs), -1), k, k.clone(), layer, fb)
        want = oracle(pool, rtp, reqs, seqs, q)
        torch.testing.assert_close(got.view(-1, HQ, D).double(), want, atol=2e-5, rtol=1e-5)

    a_slots = torch.randperm(600, generator=gen)[:300] + 1  # scattered, as an allocator
    prefill(0, a_slots)
    for t in range(3):
        decode([0], [301 + t], [700 + t])
    # A finishes; B gets A's slots (new K/V) and decodes with them
    prefill(1, a_slots)
    decode([1], [301], [800])
    decode([1], [302], [801])
    # C's prefill rewrites half of those slots while B still maps them (an allocator
    # would not do this; it is the harshest case for a cache): the backend must serve
    # what the pool now holds, as B's oracle (which reads the pool) does, never an
    # older cached copy.
    prefill(2, a_slots[:150])
    decode([1, 2], [303, 151], [802, 900])
    if b.offload is not None:  # cached rows were reused, and stayed right
        assert b.offload.fetcher.cache.stats()["hits"] > 0


def test_a_request_crossing_the_dense_limit_retrieves_over_all_its_keys(setup, monkeypatch):
    """Extend goes through the backend, then the short request decodes densely, crosses
    the dense limit (64) and retrieves: every step matches the oracle, whose retrieval
    scores all of the request's keys (those its dense steps wrote included)."""
    b, pool, rtp = setup
    monkeypatch.setattr(FlashInferAttnBackend, "forward_extend", extend_stand_in)
    gen = torch.Generator().manual_seed(11)
    layer = types.SimpleNamespace(layer_id=0, is_cross_attention=False)
    rpi, seq = [2, 0], [62, 100]
    fb = extend_batch(rtp, rpi, seq, torch.arange(1, 163))
    b.init_forward_metadata(fb)
    kv = torch.randn(162, HKV, D, generator=gen)
    b.forward_extend(torch.zeros(162, HQ * D), kv, kv.flip(0), layer, fb)
    next_slot = 163
    for _step in range(6):  # request 2: 63, 64 dense; 65 crosses; 66, 67, 68 sparse
        seq = [n + 1 for n in seq]
        fb = decode_batch(rtp, rpi, seq, torch.arange(next_slot, next_slot + 2))
        next_slot += 2
        q = torch.randn(2, HQ, D, generator=gen)
        k = torch.randn(2, HKV, D, generator=gen)
        b.init_forward_metadata(fb)
        got = b.forward_decode(q.reshape(2, -1), k, -k, layer, fb).view(-1, HQ, D)
        assert b._dense_dev[:2].tolist() == [seq[0] <= 64, False]
        torch.testing.assert_close(got.double(), oracle(pool, rtp, rpi, seq, q), atol=2e-5,
                                   rtol=1e-5)  # fmt: skip


def dense_oracle(pool, rtp, rpi, seq, q):
    """Float64 attention of every request over its whole context."""
    out = []
    for i in range(len(rpi)):
        slots = rtp.req_to_token[rpi[i], : seq[i]].long()
        kk = pool.get_key_buffer(0)[slots].double().repeat_interleave(HQ // HKV, 1)
        vv = pool.get_value_buffer(0)[slots].double().repeat_interleave(HQ // HKV, 1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[i].double(), kk) * SCALE, -1)
        out.append(torch.einsum("hn,nhd->hd", w, vv))
    return torch.stack(out)


def test_a_dense_layer_attends_every_row_over_its_whole_context(setup, monkeypatch):
    """--pariskv-dense-layers: on a step that retrieves, a dense layer runs SGLang's decode
    with the full-length plan (the plan the stand-in sees), every row's output is dense
    attention (float64 oracle), its codes still follow, and retrieval does not run."""
    from sglang_pariskv.attention.dense_layers import FullContextDecode

    b, pool, rtp = setup
    if b.offload is not None:
        pytest.skip("same routing with host offload")
    full = object.__new__(FullContextDecode)
    full.layers, full.active, full.backend = frozenset({0}), None, b
    planned, seen = [], []
    monkeypatch.setattr(
        FullContextDecode,
        "plan",
        lambda self, fb, graph_bs=None, in_capture=False: (
            planned.append(fb.seq_lens_sum),
            setattr(self, "active", ("full plan", fb.seq_lens_sum)),
        ),
    )

    def recording_stand_in(self, q, k, v, layer, fb, save_kv_cache=True):
        seen.append(getattr(self, "forward_metadata", None))
        return dense_decode_stand_in(self, q, k, v, layer, fb, save_kv_cache)

    monkeypatch.setattr(FlashInferAttnBackend, "forward_decode", recording_stand_in)
    monkeypatch.setattr(b.ws, "run", lambda *a, **kw: pytest.fail("retrieval ran"))
    b.full = full
    b.forward_metadata = "the 1-token plan"  # FlashInferAttnBackend's, restored after
    gen = torch.Generator().manual_seed(1)
    rpi, seq = [3, 1], [300, 40]
    layer = types.SimpleNamespace(layer_id=0, is_cross_attention=False)
    next_slot = prefill_random(pool, rtp, layer, rpi, seq, gen)
    for fb, lens, q, k, got in decode_steps(b, rtp, layer, rpi, seq, next_slot, gen, 2):
        torch.testing.assert_close(got.double(), dense_oracle(pool, rtp, rpi, lens, q),
                                   atol=2e-5, rtol=1e-5)  # fmt: skip
        assert seen[-1] == ("full plan", sum(lens)) and planned[-1] == sum(lens)
        assert b.forward_metadata == "the 1-token plan"
        assert torch.equal(pool.pariskv.layers[0].signs[fb.out_cache_loc], encode_keys(k).signs)
