"""Retrieval reuse in the codec (codec/reuse.py) against codec.retrieve and hand-built sets."""

import pytest
import torch

from sglang_pariskv.codec import encode_keys, retrieve
from sglang_pariskv.codec.query import prepare_query
from sglang_pariskv.codec.reuse import KeptSelection, needs_retrieval, retrieve_with_reuse
from sglang_pariskv.codec.select import estimate_inner_products
from sglang_pariskv.config import ParisKVConfig

D, HKV, G = 64, 2, 3


def setup(n=2000, r=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(r, n, HKV, D, generator=gen)
    query = torch.randn(r, HKV * G, D, generator=gen)
    return encode_keys(keys), query, gen


def cfg(**kw):
    base = dict(topk=40, sink=8, local=32, dense_threshold=500)
    base.update(kw)
    return ParisKVConfig(**base)


def attended(out, r, h):
    return set(out.positions[r, h][out.valid[r, h]].tolist())


def top_of(out, c, r, h):
    """The retrieved part of a sparse row (after sink and window)."""
    first = c.sink + c.local
    return set(out.positions[r, h, first : first + c.topk].tolist())


def test_threshold_zero_is_retrieve_at_every_step():
    codes, query, _ = setup()
    c = cfg(reuse_threshold=0)
    kept = KeptSelection.empty(2, HKV, D, c.reuse_kept)
    for seq in (1500, 1501, 1502):
        lens = torch.tensor([seq, 300])
        want = retrieve(query, codes, lens, c)
        got, kept, retrieved = retrieve_with_reuse(query, codes, lens, c, kept)
        assert torch.equal(got.positions, want.positions) and torch.equal(got.valid, want.valid)
        assert retrieved.tolist() == [[True, True], [False, False]]  # request 1 is dense


def test_same_query_reuses_the_kept_top_k_with_the_moved_window():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2000, HKV, D, generator=gen)
    query = torch.randn(2, HKV * G, D, generator=gen)
    # Keys the query wants, inside request 0's window at 1500 and in its zone at 1503.
    mean = query.view(2, HKV, G, D).mean(2)
    keys[0, 1469:1471] = 3 * mean[0] / mean[0].norm(dim=-1, keepdim=True) * D**0.5
    codes = encode_keys(keys)
    c = cfg(reuse_threshold=0.9, reuse_max_age=8)
    kept = KeptSelection.empty(2, HKV, D, c.reuse_kept)
    first, kept, retrieved = retrieve_with_reuse(query, codes, torch.tensor([1500, 1600]), c, kept)
    assert retrieved.all()
    got, kept2, retrieved = retrieve_with_reuse(query, codes, torch.tensor([1503, 1604]), c, kept)
    assert not retrieved.any()
    assert torch.equal(kept2.top, kept.top) and torch.equal(kept2.seq, kept.seq)
    for r, seq in enumerate((1503, 1604)):
        for h in range(HKV):
            window = set(range(seq - c.local, seq))
            want = set(range(c.sink)) | window | top_of(first, c, r, h)
            assert attended(got, r, h) == want
            assert len(want) == c.budget  # the kept top-k lies before the moved window
    # A fresh retrieval would take the keys that slid out of the window; the reused step
    # attends them again only at its next retrieval.
    fresh = retrieve(query, codes, torch.tensor([1503, 1604]), c)
    for h in range(HKV):
        assert {1469, 1470} <= attended(fresh, 0, h)
        assert not {1469, 1470} & attended(got, 0, h)


def test_max_age_forces_a_retrieval():
    codes, query, _ = setup()
    c = cfg(reuse_threshold=0.5, reuse_max_age=4)
    kept = KeptSelection.empty(2, HKV, D, c.reuse_kept)
    pattern = []
    for step in range(10):
        lens = torch.tensor([1500 + step, 1500 + step])
        _, kept, retrieved = retrieve_with_reuse(query, codes, lens, c, kept)
        pattern.append(bool(retrieved[0, 0]))
    assert pattern == [True, False, False, False, True, False, False, False, True, False]


def test_group_mean_cosine_decides_per_layer_or_per_head():
    codes, query, gen = setup()
    c = cfg(reuse_threshold=0.8, reuse_max_age=100)
    kept = KeptSelection.empty(2, HKV, D, c.reuse_kept)
    lens = torch.tensor([1500, 1500])
    _, kept, _ = retrieve_with_reuse(query, codes, lens, c, kept)
    moved = query.clone().view(2, HKV, G, D)
    # Head 0 of request 0: the group's heads spread out around the same mean (cosine 1).
    spread = torch.randn(G, D, generator=gen)
    moved[0, 0] += spread - spread.mean(0)
    # Head 1 of request 1: a new direction (cosine of the group mean far below 0.8).
    moved[1, 1] = torch.randn(G, D, generator=gen) * 3
    moved = moved.view(2, HKV * G, D)
    lens = lens + 1
    _, _, by_layer = retrieve_with_reuse(moved, codes, lens, c, kept)
    assert by_layer.tolist() == [[False, False], [True, True]]
    _, _, by_head = retrieve_with_reuse(moved, codes, lens, c, kept, granularity="head")
    assert by_head.tolist() == [[False, False], [False, True]]


def test_needs_retrieval_matches_the_cosine_rule():
    gen = torch.Generator().manual_seed(3)
    unit = torch.nn.functional.normalize(torch.randn(4, HKV, D, generator=gen), dim=-1)
    old = torch.nn.functional.normalize(unit + 0.6 * torch.randn(4, HKV, D, generator=gen), dim=-1)
    kept = KeptSelection(old, torch.zeros(4, HKV, 1, dtype=torch.long), torch.full((4, HKV), 10))
    cos = (unit * old).sum(-1)
    thr = float(cos.median())
    got = needs_retrieval(unit, kept, torch.full((4,), 11), thr, 5, "head")
    assert torch.equal(got, cos < thr)
    # nothing kept, or too old: retrieve whatever the cosine says
    kept.seq[2, 0] = -1
    got = needs_retrieval(unit, kept, torch.tensor([11, 11, 11, 15]), -1.0, 5, "layer")
    assert got.tolist() == [[False, False], [False, False], [True, True], [True, True]]


def test_a_dense_request_keeps_nothing_and_retrieves_once_it_grows():
    codes, query, _ = setup()
    c = cfg(reuse_threshold=0.5, reuse_max_age=64)
    kept = KeptSelection.empty(2, HKV, D, c.reuse_kept)
    _, kept, retrieved = retrieve_with_reuse(query, codes, torch.tensor([400, 1500]), c, kept)
    assert retrieved.tolist() == [[False, False], [True, True]]
    assert (kept.seq[0] == -1).all() and (kept.top[0] == -1).all()
    _, kept, retrieved = retrieve_with_reuse(query, codes, torch.tensor([501, 1501]), c, kept)
    assert retrieved.tolist() == [[True, True], [False, False]]


def test_kept_set_size_must_match_the_config():
    codes, query, _ = setup()
    c = cfg(reuse_threshold=0.5)
    with pytest.raises(ValueError, match="kept set of 7 positions, config.reuse_kept 120"):
        retrieve_with_reuse(query, codes, torch.tensor([1500, 1500]), c,
                            KeptSelection.empty(2, HKV, D, 7))  # fmt: skip


def _estimates(codes, query, positions, r, h, c):
    """Float64 rerank estimates of request r's keys at ``positions`` for KV head h."""
    q = prepare_query(query, HKV, c.rotation_seed)
    pos = torch.tensor(sorted(positions))
    reqs, heads = torch.full_like(pos, r), torch.full_like(pos, h)
    est = estimate_inner_products(codes.index(reqs, pos, heads), q.blocks[r, h], q.norm[r, h])
    return dict(zip(pos.tolist(), est.double().tolist()))


@pytest.mark.parametrize("keep", [1, 3])
def test_a_reused_step_attends_the_best_k_of_the_kept_set_for_its_own_query(keep):
    """Retrieval keeps the best keep*k candidates and attends exactly what retrieve()
    does; a reusing step whose query moved attends the k kept positions its own query
    estimates highest (keep 1: the kept top-k as it was)."""
    codes, query, gen = setup()
    c = cfg(reuse_threshold=0.5, reuse_max_age=64, reuse_keep=keep)
    kept = KeptSelection.empty(2, HKV, D, c.reuse_kept)
    lens = torch.tensor([1500, 1600])
    first, kept, retrieved = retrieve_with_reuse(query, codes, lens, c, kept)
    assert retrieved.all()
    want = retrieve(query, codes, lens, c)
    assert torch.equal(first.positions, want.positions) and torch.equal(first.valid, want.valid)
    counts = want.num_candidates
    for r in range(2):
        for h in range(HKV):
            kept_set = set(kept.top[r, h][kept.top[r, h] >= 0].tolist())
            assert len(kept_set) == min(c.reuse_kept, int(counts[r]))
            assert top_of(want, c, r, h) <= kept_set
    moved = query + 0.5 * torch.randn(query.shape, generator=gen)
    got, kept2, retrieved = retrieve_with_reuse(moved, codes, lens + 1, c, kept)
    assert not retrieved.any()  # cosine above 0.5 everywhere
    assert torch.equal(kept2.top, kept.top)
    changed = 0
    for r in range(2):
        for h in range(HKV):
            kept_set = set(kept.top[r, h][kept.top[r, h] >= 0].tolist())
            top = top_of(got, c, r, h)
            assert len(top) == c.topk and top <= kept_set
            est = _estimates(codes, moved, kept_set, r, h, c)
            rest = [est[p] for p in kept_set - top]
            assert not rest or min(est[p] for p in top) >= max(rest)
            changed += len(top - top_of(first, c, r, h))
    assert (changed > 0) == (keep > 1)
