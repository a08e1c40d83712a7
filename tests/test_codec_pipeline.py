"""End-to-end retrieval on planted data, mixed batches and the attention it feeds."""

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
