"""Tiered collision scores against a plain per-key Python reference."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_pariskv.codec import centroid_histogram, centroid_tiers, collision_scores
from sglang_pariskv.codec.budget import tier_thresholds
from sglang_pariskv.config import ParisKVConfig


def _python_scores(signs, qblocks, seq_len, ratio, rhos):
    """Per key: for each block, rank all 256 sign patterns by <pattern, q_b> (ties: lower
    id first), walk the ranking summing this request's key counts, and count the tiers
    whose budget ceil(N*ratio*rho) exceeds the keys ranked before the key's pattern."""
    n_keys, n_blocks = len(signs), len(signs[0])
    counts = [[0] * 256 for _ in range(n_blocks)]
    for key in signs[:seq_len]:
        for b, c in enumerate(key):
            counts[b][c] += 1
    budgets = [math.ceil(seq_len * ratio * rho - 1e-6) for rho in rhos]
    tiers_of = []
    for b in range(n_blocks):
        q = qblocks[b]

        def score(c, q=q):
            return sum((q[j] if (c >> j) & 1 else -q[j]) for j in range(8)) / math.sqrt(8)

        ranking = sorted(range(256), key=lambda c: (-score(c), c))
        before, tiers = 0, {}
        for c in ranking:
            tiers[c] = sum(before < t for t in budgets)
            before += counts[b][c]
        tiers_of.append(tiers)
    return [sum(tiers_of[b][key[b]] for b in range(n_blocks)) for key in signs[:n_keys]]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 60),
    blocks=st.integers(1, 4),
    ratio=st.sampled_from([0.05, 0.2, 0.5, 1.0]),
    skew=st.booleans(),
)
def test_scores_match_python_reference(seed, n, blocks, ratio, skew):
    gen = torch.Generator().manual_seed(seed)
    hi = 4 if skew else 256  # skew: few distinct ids, so counts and ties matter
    signs = torch.randint(0, hi, (1, n, 1, blocks), generator=gen).to(torch.uint8)
    q = torch.randn(1, 1, blocks, 8, generator=gen, dtype=torch.float64)
    seq_len = int(torch.randint(1, n + 1, (1,), generator=gen))
    cfg = ParisKVConfig(collision_ratio=ratio)
    hist = centroid_histogram(signs, torch.tensor([seq_len]))
    thr = tier_thresholds(torch.tensor([seq_len]), torch.tensor([ratio]), cfg)
    got = collision_scores(signs, centroid_tiers(q, hist, thr))[0, :, 0].tolist()
    want = _python_scores(
        signs[0, :, 0].tolist(), q[0, 0].tolist(), seq_len, ratio, cfg.tier_ratios
    )
    assert got == want


def test_histogram_counts_only_each_requests_tokens():
    gen = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 256, (3, 40, 2, 4), generator=gen).to(torch.uint8)
    lens = torch.tensor([40, 7, 0])
    hist = centroid_histogram(signs, lens)
    assert hist.shape == (3, 2, 4, 256)
    for r in range(3):
        for h in range(2):
            for b in range(4):
                want = torch.bincount(signs[r, : lens[r], h, b].long(), minlength=256)
                assert torch.equal(hist[r, h, b].long(), want)


def test_best_centroid_is_the_query_sign_pattern():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 3, 8, generator=gen, dtype=torch.float64)
    signs = torch.zeros(1, 1, 1, 3, dtype=torch.uint8)
    hist = centroid_histogram(signs, torch.tensor([1]))
    thr = torch.tensor([[1, 1, 1, 1, 1, 1]])
    tiers = centroid_tiers(q, hist, thr)
    for b in range(3):
        best = sum(1 << j for j in range(8) if q[0, 0, b, j] >= 0)
        assert tiers[0, 0, b, best] == 6
