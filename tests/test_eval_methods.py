"""Each retrieval method finds a planted answer, and the fast paths match their references."""

from __future__ import annotations

import pytest
import torch

from pariskv_tools.eval.budget import Budget
from pariskv_tools.eval.methods import (
    ExactTopK,
    ParisKV,
    ProductQuantization,
    Quest,
    SimHash,
    StreamingLLM,
)
from pariskv_tools.eval.methods.pariskv import fast_collision_scores
from pariskv_tools.eval.methods.simhash import count_collisions_naive
from pariskv_tools.eval.ranking import rank, zone_mask
from pariskv_tools.eval.trace import LayerTrace
from sglang_pariskv.codec import encode_keys, prepare_query, retrieve
from sglang_pariskv.codec.collision import centroid_table, collision_scores
from sglang_pariskv.config import ParisKVConfig

N_PROMPT, N_GEN, H, G, D = 600, 8, 2, 3, 64
PLANT = 300  # a prompt position in the zone
BUDGET = Budget(fraction=0.1, sink=8, local=32)


def planted_trace(seed: int = 0) -> LayerTrace:
    """Random keys around a shared offset, one key per head pointing along the query.

    The planted key is the exact top-1 of every step, so any sensible method must rank it
    near the top; a few generated keys follow the prompt (append-only)."""
    g = torch.Generator().manual_seed(seed)
    n = N_PROMPT + N_GEN
    offset = torch.randn(H, D, generator=g)
    keys = torch.randn(n, H, D, generator=g) + offset
    q_dir = torch.randn(H, D, generator=g)
    q_dir = q_dir / q_dir.norm(dim=-1, keepdim=True)
    keys[PLANT] = 12 * q_dir
    queries = (q_dir.repeat_interleave(G, 0) * 4)[None] + 0.1 * torch.randn(
        N_GEN, H * G, D, generator=g
    )
    values = torch.randn(n, H, D, generator=g)
    seq_lens = torch.arange(N_PROMPT + 1, n + 1)
    return LayerTrace(keys, values, queries, seq_lens, N_PROMPT)


def _ranked(method, trace, length):
    state = method.prepare(trace)
    batch = BUDGET.batch(trace.queries, trace.seq_lens)
    in_zone = zone_mask(trace.seq_lens, BUDGET.sink, BUDGET.local, trace.num_keys)
    return {n: rank(s, in_zone, length)[0] for n, s in method.scores(state, batch).items()}


@pytest.mark.parametrize(
    "method",
    [
        ExactTopK(),
        ParisKV(outputs=("full", "stage1")),
        ParisKV(name="norot", outputs=("full",), rotate=False),
        ParisKV(name="gqa_max", outputs=("full",), gqa="max"),
        Quest(page_size=16),
        SimHash(bits=10, tables=150),
        ProductQuantization(subvectors=2, centroids=64),
    ],
    ids=lambda m: m.names[0],
)
def test_method_finds_planted_key(method):
    trace = planted_trace()
    for name, ranked in _ranked(method, trace, 16).items():
        assert (ranked == PLANT).any(-1).all(), f"{name} missed the planted key"


def test_streaming_ranks_the_newest_zone_tokens_first():
    trace = planted_trace()
    ranked = _ranked(StreamingLLM(), trace, 3)["streaming"]
    newest = trace.seq_lens - BUDGET.local - 1
    assert torch.equal(ranked[:, 0, 0], newest)
    assert torch.equal(ranked[:, 1, 2], newest - 2)


def test_simhash_inverted_index_matches_naive_count():
    trace = planted_trace(1)
    method = SimHash(bits=6, tables=20)
    state = method.prepare(trace)
    from pariskv_tools.eval.methods.simhash import hash_codes
    from pariskv_tools.eval.trace import group_mean_query

    qc = hash_codes(group_mean_query(trace.queries, H), state.proj, 6)
    assert torch.equal(method.count(state, qc), count_collisions_naive(state.key_codes, qc))


def test_fast_collision_scores_match_codec():
    trace = planted_trace(2)
    codes = encode_keys(trace.keys)
    n = trace.num_keys
    q = prepare_query(trace.queries[:3], H)
    table = centroid_table(q.blocks)
    ref = collision_scores(codes.signs[None].expand(3, n, H, -1), table).transpose(1, 2)
    assert torch.equal(fast_collision_scores(codes.signs, table), ref)


@pytest.mark.parametrize(
    "topk, calibrated", [(20, False), (60, False), (200, False), (400, False), (60, True)]
)
def test_pariskv_ranking_cut_at_k_is_codec_retrieve(topk, calibrated):
    """The ranking's first k are exactly the top-k set of ``codec.retrieve`` (k below and
    above the candidate count), also with a calibration's centres and channel scales."""
    trace = planted_trace(3)
    centre = scale = None
    if calibrated:
        gen = torch.Generator().manual_seed(9)
        centre = trace.keys.mean(0)
        scale = torch.rand(H, trace.keys.shape[-1], generator=gen) * 3 + 0.2
    method = ParisKV(outputs=("full",), centres=centre, scales=scale)
    ranked = _ranked(method, trace, topk)["pariskv"]
    cfg = ParisKVConfig(topk=topk, sink=BUDGET.sink, local=BUDGET.local, dense_threshold=0)
    codes = encode_keys(trace.keys, centre=centre, scale=scale)
    s = trace.queries.shape[0]
    full = type(codes)(*(t[None].expand(s, *t.shape) for t in codes))
    ret = retrieve(trace.queries, full, trace.seq_lens, cfg, scale=scale)
    got = ret.positions[..., BUDGET.sink + BUDGET.local :]
    for st in range(s):
        for h in range(H):
            want = set(got[st, h][got[st, h] >= 0].tolist())
            assert set(ranked[st, h].tolist()) == want


def test_top_count_mask_matches_stable_sort():
    from pariskv_tools.eval.methods.pariskv import top_count_mask

    g = torch.Generator().manual_seed(5)
    scores = torch.randint(-1, 12, (4, 2, 50), generator=g)
    counts = torch.tensor([0, 7, 20, 49])
    got = top_count_mask(scores, counts)
    for s in range(4):
        for h in range(2):
            row = scores[s, h]
            valid = (row >= 0).nonzero().flatten()
            order = valid[torch.sort(row[valid], descending=True, stable=True).indices]
            want = torch.zeros(50, dtype=torch.bool)
            want[order[: counts[s]]] = True
            assert torch.equal(got[s, h], want), (s, h)


@pytest.mark.parametrize("ratio", [0.3, 1.0])
def test_rerank_by_keys_is_the_exact_order_of_the_collision_candidates(ratio):
    """rerank="keys": the first k are the k largest exact group-mean q·k among the
    candidates (the zone's top-C collision scores, earlier first on ties), checked by brute
    force in float64; with every zone key a candidate that is the exact top-k."""
    trace = planted_trace(4)
    k = 20
    method = ParisKV(ParisKVConfig(candidate_ratio=ratio), name="keys", outputs=("full",),
                     rerank="keys")  # fmt: skip
    ranked = _ranked(method, trace, k)["keys"]
    codes = encode_keys(trace.keys)
    q = prepare_query(trace.queries, H)
    coll = collision_scores(codes.signs[None].expand(len(trace.queries), *codes.signs.shape),
                            centroid_table(q.blocks))  # fmt: skip
    qm = trace.queries.double().reshape(-1, H, G, D).mean(2)
    for st, n in enumerate(trace.seq_lens.tolist()):
        zone = list(range(BUDGET.sink, n - BUDGET.local))
        batch = BUDGET.batch(trace.queries[st : st + 1], trace.seq_lens[st : st + 1])
        c = int(-(-(batch.seq_lens - batch.sink - batch.local).item() * ratio // 1))
        c = max(min(c, len(zone)), k)
        for h in range(H):
            cand = sorted(zone, key=lambda p: (-int(coll[st, p, h]), p))[:c]
            exact = {p: float(qm[st, h] @ trace.keys[p, h].double()) for p in cand}
            want = set(sorted(cand, key=lambda p: -exact[p])[:k])
            assert set(ranked[st, h].tolist()) == want, (st, h)
            if ratio == 1.0:
                top = sorted(zone, key=lambda p: -float(qm[st, h] @ trace.keys[p, h].double()))
                assert want == set(top[:k])


def test_rerank_by_keys_needs_the_group_mean_query():
    with pytest.raises(ValueError, match="rerank"):
        ParisKV(rerank="keys", gqa="max")
    with pytest.raises(ValueError, match="rerank"):
        ParisKV(rerank="bits")
