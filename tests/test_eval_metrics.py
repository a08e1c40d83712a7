"""Metric code of the retrieval evaluation, on cases small enough to compute by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pariskv_tools.eval.budget import budget_for
from pariskv_tools.eval.metrics import (
    StepReference,
    dense_probs,
    fixed_mask,
    recall_at_k,
    take_first,
    topk_mask,
)
from pariskv_tools.eval.ranking import rank, zone_mask


def test_dense_probs_is_causal_softmax():
    # One query head, one KV head, D=1, scale 1: logits = q*k = [0, ln2, ln3, big(masked)].
    q = torch.tensor([[[1.0]]])
    k = torch.tensor([[[0.0]], [[math.log(2)]], [[math.log(3)]], [[100.0]]])
    p = dense_probs(q, k, torch.tensor([3]), scale=1.0)
    assert torch.allclose(p[0, 0], torch.tensor([1 / 6, 2 / 6, 3 / 6, 0.0]))


def test_fixed_mask_sink_and_window():
    m = fixed_mask(torch.tensor([10, 6]), sink=2, local=3, n=12)
    assert m[0].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    assert m[1].nonzero().flatten().tolist() == [0, 1, 3, 4, 5]


def test_mass_and_output_error_by_hand():
    # N=4 keys, sink = position 0, window = position 3, zone = {1, 2}; G=1 query head.
    probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    values = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]], [[0.0, 0.0]]])
    ref = StepReference(probs, values, torch.tensor([4]), sink=1, local=1)
    ranked = torch.tensor([[[2, 1]]])  # retrieve position 2 first
    take = take_first(torch.ones(1, 1, 2, dtype=torch.bool), torch.tensor([1]))
    # Attended {0, 2, 3}: mass 0.1 + 0.3 + 0.4 = 0.8.
    assert ref.mass_recall(ranked, take).item() == pytest.approx(0.8)
    # Dense out = 0.1*(1,0) + 0.2*(0,1) + 0.3*(1,1) = (0.4, 0.5).
    # Sparse out = (0.1*(1,0) + 0.3*(1,1)) / 0.8 = (0.5, 0.375).
    err = math.hypot(0.1, 0.125) / math.hypot(0.4, 0.5)
    assert ref.output_rel_err(ranked, take).item() == pytest.approx(err, rel=1e-5)
    # Everything attended: no error, full mass.
    take_all = torch.ones(1, 1, 2, dtype=torch.bool)
    assert ref.mass_recall(ranked, take_all).item() == pytest.approx(1.0)
    assert ref.output_rel_err(ranked, take_all).item() == pytest.approx(0.0, abs=1e-6)


def test_mass_averages_the_gqa_group():
    # Two query heads on one KV head: per-head masses 0.2 and 0.6 -> 0.4.
    probs = torch.tensor([[[0.2, 0.8], [0.6, 0.4]]])
    values = torch.ones(2, 1, 1)
    ref = StepReference(probs, values, torch.tensor([2]), sink=1, local=0)
    none = torch.zeros(1, 1, 1, dtype=torch.bool)
    assert ref.mass_recall(torch.tensor([[[1]]]), none).item() == pytest.approx(0.4)


def test_recall_at_k_by_hand():
    target = torch.tensor([[[5, 3, 9, 1]]])
    ranked = torch.tensor([[[3, 7, 5, 9]]])
    k = torch.tensor([2])
    take = take_first(torch.ones(1, 1, 4, dtype=torch.bool), k)
    # Truth {5, 3}; ranked first 2 {3, 7}: one hit of 2.
    assert recall_at_k(ranked, take, topk_mask(target, k, 10), k).item() == 0.5
    k3 = torch.tensor([3])
    take3 = take_first(torch.ones(1, 1, 4, dtype=torch.bool), k3)
    # Truth {5, 3, 9}; ranked {3, 7, 5}: two hits of 3.
    assert recall_at_k(ranked, take3, topk_mask(target, k3, 10), k3).item() == pytest.approx(2 / 3)


def test_rank_zone_and_tie_break():
    scores = torch.tensor([[[9, 1, 1, 3, 1, 9]]])  # integer: ties -> earlier position first
    in_zone = zone_mask(torch.tensor([6]), sink=1, local=1, n=6)  # zone {1, 2, 3, 4}
    pos, valid = rank(scores, in_zone, 4)
    assert pos[0, 0].tolist() == [3, 1, 2, 4]
    assert valid.all()
    pos, valid = rank(scores, in_zone, 6)
    assert valid[0, 0].tolist() == [True] * 4 + [False] * 2


def test_budget_rule():
    b = budget_for(0.1, 8000)  # half budget 400 >= 320: defaults kept
    assert (b.sink, b.local) == (64, 256)
    assert b.attended(torch.tensor([8000])).item() == 800
    assert b.retrieved(torch.tensor([8000])).item() == 480
    s = budget_for(0.1, 2000)  # half budget 100 < 320: scaled 1:4
    assert (s.sink, s.local) == (20, 80)
    assert s.retrieved(torch.tensor([2000])).item() == 100
