"""End-to-end retrieval on planted data, mixed batches and the attention it feeds."""

import dataclasses

import pytest
import torch

from sglang_pariskv.codec import (
    dense_attention,
    encode_keys,
    retrieve,
    select_candidates,
    sparse_attention,
)
from sglang_pariskv.config import ParisKVConfig


def planted(n, d, hkv, group, n_planted, seed):
    """Random keys, plus per head a planted set of keys aligned with that head's queries."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, hkv, d, generator=gen)
    q = torch.randn(hkv, d, generator=gen)
    q = q / q.norm(dim=-1, keepdim=True) * 4
    query = q[:, None, :].expand(hkv, group, d) + 0.05 * torch.randn(hkv, group, d, generator=gen)
    planted_pos = []
    for h in range(hkv):
        pos = torch.randperm(n - 600, generator=gen)[:n_planted] + 300  # inside the zone
        keys[pos, h] = q[h] * 1.5 + 0.3 * torch.randn(n_planted, d, generator=gen)
        planted_pos.append(set(pos.tolist()))
    return keys, query.reshape(hkv * group, d), planted_pos


@pytest.mark.parametrize("d, hkv, group", [(64, 3, 3), (128, 2, 4), (128, 1, 8), (64, 4, 1)])
def test_pipeline_returns_the_planted_set(d, hkv, group):
    n, k = 4000, 40
    keys, query, truth = planted(n, d, hkv, group, k, seed=d + hkv)
    cfg = ParisKVConfig(topk=k, sink=16, local=64, dense_threshold=0)
    codes = encode_keys(keys).index(None)  # add the request dim
    out = retrieve(query[None], codes, torch.tensor([n]), cfg)
    assert not out.dense.any()
    for h in range(hkv):
        got = set(out.positions[0, h][out.valid[0, h]].tolist())
        assert truth[h] <= got
        assert len(got) == cfg.budget == out.valid[0, h].sum()


def test_mixed_batch_dense_and_sparse_requests():
    d, hkv, group, n = 64, 2, 2, 3000
    gen = torch.Generator().manual_seed(7)
    keys = torch.randn(3, n, hkv, d, generator=gen)
    query = torch.randn(3, hkv * group, d, generator=gen)
    lens = torch.tensor([3000, 500, 1700])
    cfg = ParisKVConfig(topk=100, sink=8, local=32, dense_threshold=600)
    codes = encode_keys(keys)
    out = retrieve(query, codes, lens, cfg)
    assert out.dense.tolist() == [False, True, False]
    for r in range(3):
        for h in range(hkv):
            pos = out.positions[r, h][out.valid[r, h]]
            assert len(set(pos.tolist())) == len(pos)  # no duplicates
            assert pos.min() >= 0 and pos.max() < lens[r]
            if out.dense[r]:
                assert sorted(pos.tolist()) == list(range(lens[r]))
            else:
                assert len(pos) == cfg.budget
                assert set(range(8)) <= set(pos.tolist())
                assert set(range(lens[r] - 32, lens[r])) <= set(pos.tolist())
    # Attention over the retrieved set of a dense request equals dense attention.
    sparse = sparse_attention(query, keys, keys, out.positions, out.valid)
    dense = dense_attention(query, keys, keys, lens)
    assert torch.allclose(sparse[1], dense[1], atol=1e-5)


def test_candidates_are_stable_top_scores():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (2, 50, 3), generator=gen)
    in_zone = torch.zeros(2, 50, dtype=torch.bool)
    in_zone[0, 5:45] = True
    in_zone[1, 10:30] = True
    counts = torch.tensor([12, 20])
    pos, valid = select_candidates(scores, in_zone, counts)
    for r in range(2):
        for h in range(3):
            zone = [p for p in range(50) if in_zone[r, p]]
            want = sorted(zone, key=lambda p: (-int(scores[r, p, h]), p))[: counts[r]]
            assert pos[r, h][valid[r, h]].tolist() == want


def test_dense_attention_matches_float64_softmax():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 6, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 30, 2, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 30, 2, 16, generator=gen, dtype=torch.float64)
    out = dense_attention(q, k, v, torch.tensor([20]))
    for h in range(6):
        kh, vh = k[0, :20, h // 3], v[0, :20, h // 3]
        p = torch.softmax(kh @ q[0, h] / 4.0, dim=0)
        assert torch.allclose(out[0, h], p @ vh, atol=1e-12)


@pytest.mark.parametrize("group", [1, 4])
def test_rerank_by_keys_keeps_the_candidates_of_highest_exact_group_mean_score(group):
    """rerank "keys": among the collision stage's candidates, the top-k by the group-mean
    q·k, scored one candidate at a time in float64 here; the same candidates as the code
    rerank, ranked differently."""
    from sglang_pariskv.codec import centroid_table, collision_scores, prepare_query
    from sglang_pariskv.codec.budget import candidate_ratios, num_candidates, zone_lengths
    from sglang_pariskv.codec.select import zone_mask

    n, hkv, d = 3000, 2, 64
    gen = torch.Generator().manual_seed(group)
    keys = torch.randn(1, n, hkv, d, generator=gen, dtype=torch.float64)
    query = torch.randn(1, hkv * group, d, generator=gen, dtype=torch.float64)
    cfg = ParisKVConfig(topk=50, sink=16, local=64, dense_threshold=0, rerank="keys")
    codes = encode_keys(keys)
    with pytest.raises(ValueError, match="pass keys"):
        retrieve(query, codes, torch.tensor([n]), cfg)
    out = retrieve(query, codes, torch.tensor([n]), cfg, keys=keys)
    code = retrieve(query, codes, torch.tensor([n]), dataclasses.replace(cfg, rerank="code"))

    zone = zone_lengths(torch.tensor([n]), cfg)
    count = int(num_candidates(zone, candidate_ratios(zone, cfg), cfg)[0])
    scores = collision_scores(codes.signs, centroid_table(prepare_query(query, hkv).blocks))
    in_zone = zone_mask(n, cfg.sink, cfg.sink + zone)[0]
    differs = False
    for h in range(hkv):
        # candidates: the zone's top-`count` collision scores, earlier position on ties
        pos = [p for p in range(n) if in_zone[p]]
        pos.sort(key=lambda p: (-int(scores[0, p, h]), p))
        cands = pos[:count]
        rows = [query[0, h * group + g] for g in range(group)]
        mean = [sum(float(x[j]) for x in rows) / group for j in range(d)]
        exact = {p: sum(float(keys[0, p, h, j]) * mean[j] for j in range(d)) for p in cands}
        want = set(sorted(cands, key=lambda p: (-exact[p], p))[: cfg.topk])
        sparse = out.positions[0, h][out.valid[0, h]].tolist()
        got = set(sparse[cfg.sink + cfg.local :])
        assert got == want
        code_sparse = code.positions[0, h][code.valid[0, h]].tolist()
        differs |= set(code_sparse[cfg.sink + cfg.local :]) != got
    assert differs
