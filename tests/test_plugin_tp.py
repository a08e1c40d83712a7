"""Tensor parallelism: each rank's ParisKV state is the tp=1 state restricted to its heads.

SGLang shards attention by KV head: with ``--tp-size 2`` and 4 KV heads, rank r builds its
KV pool with heads [2r, 2r + 2) and receives exactly those heads' keys. ParisKV's codes
and retrieval are per KV head (the rotation is shared by all heads), so rank
r's state and retrieved positions must equal the tp=1 ones for its heads, which is why
no collective is needed. Checked here with real SGLang pools (CPU) for two ranks' shapes,
plus the flags and the per-rank memory accounting.
"""

import types

import pytest
import torch
from sglang.srt.server_args import ServerArgs

from sglang_pariskv import plugin
from sglang_pariskv.codec.pipeline import retrieve
from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.index.code_pool import code_bytes_per_token
from sglang_pariskv.index.kv_pool import ParisKVTokenToKVPool
from sglang_pariskv.pool_sizing import add_code_bytes
from tests.test_plugin_pool import make_pool as make_cpu_pool

HKV, GROUP, D, LAYERS, TP = 4, 2, 32, 2, 2
CFG = ParisKVConfig(topk=24, sink=4, local=8, dense_threshold=64)


def make_pool(heads: int, size: int = 512) -> ParisKVTokenToKVPool:
    return make_cpu_pool(size, heads=heads, head_dim=D, layers=LAYERS)


def shard(x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
    per = x.shape[dim] // TP
    return x.narrow(dim, rank * per, per)


@pytest.fixture(scope="module")
def written():
    """tp=1 pool and both ranks' pools after the same KV writes of two requests."""
    gen = torch.Generator().manual_seed(0)
    lens = [300, 180]
    slots = [torch.arange(1, 301), torch.arange(301, 481)]
    full = make_pool(HKV)
    ranks = [make_pool(HKV // TP) for _ in range(TP)]
    keys = {}
    for li in range(LAYERS):
        k = torch.randn(480, HKV, D, generator=gen).to(torch.bfloat16)
        keys[li] = k
        loc = torch.cat(slots)
        layer = types.SimpleNamespace(layer_id=li)
        full.set_kv_buffer(layer, loc, k, k)
        for r, pool in enumerate(ranks):
            kr = shard(k, r).contiguous()  # what SGLang's k_proj shard produces on rank r
            pool.set_kv_buffer(layer, loc, kr, kr)
    return full, ranks, slots, lens, keys


def test_each_rank_holds_the_codes_of_its_heads(written):
    full, ranks, slots, _, _ = written
    loc = torch.cat(slots)
    for li in range(LAYERS):
        for r, pool in enumerate(ranks):
            for got, want in zip(pool.pariskv.layers[li], full.pariskv.layers[li]):
                assert torch.equal(got[loc], shard(want[loc], r))


def test_each_rank_retrieves_the_tp1_positions_of_its_heads(written):
    """The query heads of KV head h are [h*G, (h+1)*G) on tp=1 and the same local block on
    the rank owning h: per-rank retrieval over local heads reproduces the global one."""
    full, ranks, slots, lens, _ = written
    q = torch.randn(2, HKV * GROUP, D, generator=torch.Generator().manual_seed(1))
    n = max(lens)
    idx = torch.zeros(2, n, dtype=torch.int64)
    for i, s in enumerate(slots):
        idx[i, : len(s)] = s
    seq = torch.tensor(lens)
    want = retrieve(q, full.pariskv.layers[1].index(idx), seq, CFG)
    assert not want.dense.any()  # both requests retrieve (above the dense threshold)
    for r, pool in enumerate(ranks):
        got = retrieve(shard(q, r), pool.pariskv.layers[1].index(idx), seq, CFG)
        assert torch.equal(got.valid, shard(want.valid, r))
        assert torch.equal(got.positions, shard(want.positions, r))


@pytest.mark.parametrize("tp, heads", [(1, 8), (2, 4), (4, 2), (8, 1), (16, 1)])
def test_code_bytes_are_counted_per_rank(monkeypatch, tp, heads):
    """Each rank's cell size counts the codes of the KV heads it holds (replicated when
    tp > KV heads, as SGLang replicates the KV heads themselves)."""
    from sglang.srt.model_executor import pool_configurator

    monkeypatch.setattr(
        pool_configurator, "get_parallel", lambda: types.SimpleNamespace(attn_tp_size=tp)
    )
    mc = types.SimpleNamespace(
        get_num_kv_heads=lambda t: max(8 // t, 1), get_num_attention_heads=lambda t: 32 // t,
        head_dim=128, context_len=8192,
    )  # fmt: skip
    kvc = types.SimpleNamespace(model_config=mc, use_mla_backend=False)
    assert add_code_bytes(0, None, kvc, 32) == code_bytes_per_token(heads, 128, 32)


def test_tensor_parallel_flags_are_accepted():
    parser = __import__("argparse").ArgumentParser()
    ServerArgs.add_cli_args(parser)
    plugin._after_add_cli_args(None, parser)
    args = parser.parse_args(["--model-path", "m", "--enable-pariskv", "--tp-size", "2"])
    from tests.test_plugin_flags import resolve

    out = plugin._around_from_cli_args(resolve, ServerArgs, args)
    assert out.tp_size == 2 and plugin.config_from_env() is not None


def test_backend_takes_query_heads_per_rank_from_the_attention_layers(monkeypatch):
    """The backend's per-rank head count comes from the model's RadixAttention layers, as
    SGLang sharded them (ModelRunner has no tp_size attribute to read it from: the first
    TP=2 run took the full count and failed in graph capture)."""
    from sglang.srt.layers.radix_attention import RadixAttention

    from sglang_pariskv.attention import backend
    from sglang_pariskv.server_flags import ParisKVConfigError

    def runner(*num_heads, tp_rank=None):
        layers = torch.nn.ModuleList(
            RadixAttention(h, 64, 0.125, 3, layer_id=i) for i, h in enumerate(num_heads)
        )
        mc = types.SimpleNamespace(get_num_attention_heads=lambda tp: 18 // tp)
        ps = types.SimpleNamespace(tp_rank=tp_rank) if tp_rank is not None else None
        return types.SimpleNamespace(model=layers, model_config=mc, ps=ps)

    assert backend.query_heads_per_rank(runner(9, 9, 9)) == 9  # 18 heads over TP=2
    assert backend.tp_rank(runner(9, tp_rank=1)) == 1
    with pytest.raises(ParisKVConfigError, match="different query head counts"):
        backend.query_heads_per_rank(runner(9, 18))
    # No attention layers found: SGLang's attention-TP size divides the model's heads.
    import sglang.srt.runtime_context as rc

    monkeypatch.setattr(rc, "get_parallel", lambda: types.SimpleNamespace(attn_tp_size=2))
    assert backend.query_heads_per_rank(runner()) == 9
