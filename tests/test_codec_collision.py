"""Collision scores (centroid table + per-key sums) against a plain per-key Python reference."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_pariskv.codec import centroid_table, collision_scores
from sglang_pariskv.codec.collision import SCORE_BINS


def _python_scores(signs, qblocks):
    """Per key: each block's centroid inner product <s, q_b> (s = the +-1 sign pattern of
    the key's id), scaled so that the largest |<s, q_b>| of the head is 127, rounded half
    up; the key's score is 128 + floor(sum over blocks / B)."""
    n_blocks = len(qblocks)

    def dot(c, q):
        return math.fsum(q[j] if (c >> j) & 1 else -q[j] for j in range(8))

    big = max(math.fsum(abs(x) for x in q) for q in qblocks)
    table = [
        [math.floor(127 * dot(c, q) / big + 0.5) if big > 0 else 0 for c in range(256)]
        for q in qblocks
    ]
    return [128 + sum(table[b][key[b]] for b in range(n_blocks)) // n_blocks for key in signs]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 60),
    blocks=st.sampled_from([1, 2, 4, 8, 16]),
    zero_block=st.booleans(),
)
def test_scores_match_python_reference(seed, n, blocks, zero_block):
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 256, (1, n, 1, blocks), generator=gen).to(torch.uint8)
    q = torch.randn(1, 1, blocks, 8, generator=gen).float()
    if zero_block:
        q[..., 0, :] = 0.0
    got = collision_scores(signs, centroid_table(q))[0, :, 0].tolist()
    want = _python_scores(signs[0, :, 0].tolist(), q[0, 0].double().tolist())
    assert got == want
    assert all(1 <= s < SCORE_BINS for s in got)


def test_table_is_antisymmetric_and_peaks_at_the_query_signs():
    """s and its complement (id ^ 255) are opposite patterns; the best centroid of a block
    is the query block's own sign pattern, and the head's largest entry is 127."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 4, 8, generator=gen)
    t = centroid_table(q).long()
    ids = torch.arange(256)
    assert torch.equal(t[..., ids ^ 255], -t)
    best = ((q >= 0).long() << torch.arange(8)).sum(-1)  # [2, 3, 4]
    assert torch.equal(torch.gather(t, -1, best[..., None]).squeeze(-1), t.amax(-1))
    assert torch.equal(t.amax(dim=(-1, -2)), torch.full((2, 3), 127))


def test_zero_query_scores_every_key_alike():
    signs = torch.randint(0, 256, (1, 9, 2, 4), dtype=torch.uint8)
    scores = collision_scores(signs, centroid_table(torch.zeros(1, 2, 4, 8)))
    assert torch.equal(scores, torch.full_like(scores, 128))


def test_scores_order_keys_like_their_sign_inner_products():
    """Without rounding (one block, distinct products) a higher <sign(k), q> never scores
    lower: the score is a monotone function of the sign-code inner product."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 1, 8, generator=gen)
    signs = torch.arange(256, dtype=torch.uint8).reshape(1, 256, 1, 1)
    scores = collision_scores(signs, centroid_table(q))[0, :, 0]
    pat = torch.stack([(torch.arange(256) >> j) & 1 for j in range(8)], -1) * 2 - 1
    dots = (pat.double() * q[0, 0, 0].double()).sum(-1)
    order = dots.argsort()
    assert bool((scores[order].diff() >= 0).all())
