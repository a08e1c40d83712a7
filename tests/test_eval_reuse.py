"""The reuse evaluation (pariskv_tools/eval/reuse.py): its schedule against the codec's
rule, its every-step metrics against the retrieval harness, and the default's choice."""

from __future__ import annotations

import json

import pytest
import torch

from pariskv_tools.eval.budget import budget_for
from pariskv_tools.eval.captures import ContextSpec, layer_trace
from pariskv_tools.eval.layer_eval import evaluate_layer
from pariskv_tools.eval.methods.pariskv import ParisKV
from pariskv_tools.eval.reuse import (
    EVERY_STEP,
    ReuseRunSettings,
    ReuseSetting,
    choose_default,
    evaluate_layer_reuse,
    rerank_kept,
    reuse_schedule,
    run_reuse,
)
from sglang_pariskv.codec.reuse import KeptSelection, needs_retrieval
from tests.test_eval_retrieval import fake_capture


def drifting_queries(steps=200, h=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(h, d, generator=g)
    out = []
    for _ in range(steps):
        x = x + 0.25 * torch.randn(h, d, generator=g)
        out.append(torch.nn.functional.normalize(x, dim=-1))
    return torch.stack(out).double()


@pytest.mark.parametrize("granularity", ["layer", "head"])
@pytest.mark.parametrize("threshold, max_age", [(0.9, 16), (0.97, 5), (0.5, 40)])
def test_schedule_is_the_codec_rule(granularity, threshold, max_age):
    unit = drifting_queries()
    s, h, d = unit.shape
    kept = KeptSelection.empty(1, h, d, 1)
    kept.query = kept.query.double()
    setting = ReuseSetting(threshold, max_age, granularity)
    want = torch.zeros(s, h, dtype=torch.int64)
    last = torch.zeros(h, dtype=torch.int64)
    for i in range(s):
        need = needs_retrieval(unit[i : i + 1], kept, torch.tensor([i]), threshold, max_age,
                               granularity)[0]  # fmt: skip
        kept.query[0, need] = unit[i, need]
        kept.seq[0, need] = i
        last = torch.where(need, i, last)
        want[i] = last
    got = reuse_schedule(unit, setting)
    assert torch.equal(got, want)
    retrieved = (got == torch.arange(s)[:, None]).float().mean()
    assert 0.0 < retrieved < 1.0  # the case exercises both branches


def test_every_step_metrics_equal_the_retrieval_harness():
    cap = fake_capture(prompt=700, decode=24, layers=1)
    trace = layer_trace(cap, 0)
    budget = budget_for(0.1, cap.prompt_len)
    got = evaluate_layer_reuse(trace, budget, [ReuseSetting(-1.0, 1)], chunk=8)
    ref = evaluate_layer(trace, [ParisKV(outputs=("full",))], budget, chunk=8).metrics["pariskv"]
    base = got[EVERY_STEP]
    for m in ("recall_at_100", "mass_recall"):
        torch.testing.assert_close(base[m], ref[m])
        # max age 1 retrieves at every step: the same numbers
        torch.testing.assert_close(got["t-1_age1_layer"][m], ref[m])
    assert (base["retrieved"] == 1).all()
    # Never retrieving again (after step 0) loses recall on random queries.
    never = evaluate_layer_reuse(trace, budget, [ReuseSetting(-1.0, 1000)], chunk=8)
    stale = never["t-1_age1000_layer"]
    assert stale["retrieved"][1:].sum() == 0
    assert stale["recall_at_100"][1:].mean() < base["recall_at_100"][1:].mean() - 0.2


def test_default_is_the_fewest_retrievals_within_tolerance():
    summary = {
        EVERY_STEP: {"recall_at_100": 0.90, "mass_recall": 0.95, "retrieved": 1.0},
        "a_layer": {"recall_at_100": 0.895, "mass_recall": 0.949, "retrieved": 0.6},
        "b_layer": {"recall_at_100": 0.885, "mass_recall": 0.95, "retrieved": 0.3},  # too low
        "c_layer": {"recall_at_100": 0.90, "mass_recall": 0.95, "retrieved": 0.7},
        "d_head": {"recall_at_100": 0.90, "mass_recall": 0.95, "retrieved": 0.1},  # not served
    }
    assert choose_default(summary) == "a_layer"
    summary["e_layer_keep3"] = {"recall_at_100": 0.9, "mass_recall": 0.95, "retrieved": 0.5}
    assert choose_default(summary) == "e_layer_keep3"
    assert choose_default({EVERY_STEP: summary[EVERY_STEP]}) == EVERY_STEP


def test_run_writes_json_and_table(tmp_path, capsys):
    spec = ContextSpec("tiny", "synthetic", 700)
    settings = ReuseRunSettings(
        thresholds=(-1.0, 0.99), max_ages=(4,), granularities=("layer",), keeps=(1,),
        n_decode=24, chunk=8, contexts=(spec,), layers=[0, 1],
    )  # fmt: skip
    out = tmp_path / "reuse.json"
    doc = run_reuse(settings, {"tiny": fake_capture(layers=2)}, out, "test")
    saved = json.loads(out.read_text())
    assert saved["summary"].keys() == {EVERY_STEP, "t-1_age4_layer", "t0.99_age4_layer"}
    assert saved["chosen"] == doc["chosen"]
    # threshold -1 (below any cosine) retrieves only by age: every 4th step
    assert saved["summary"]["t-1_age4_layer"]["retrieved"] == pytest.approx(6 / 24)
    assert "| t-1_age4_layer" in capsys.readouterr().out


def test_rerank_kept_orders_the_kept_prefix_by_the_current_estimates():
    """Against a per-row loop: the first kept_len valid entries, best current estimate
    first, then everything else invalid."""
    g = torch.Generator().manual_seed(3)
    s, h, n, length = 4, 3, 50, 20
    ranked = torch.stack([torch.randperm(n, generator=g)[:length] for _ in range(s * h)])
    ranked = ranked.reshape(s, h, length)
    valid = torch.rand(s, h, length, generator=g) > 0.2
    kept_len = torch.randint(0, length + 3, (s, h), generator=g)
    est = torch.randn(s, h, n, generator=g)
    got_r, got_v = rerank_kept(ranked, valid, kept_len, est)
    for i in range(s):
        for j in range(h):
            kept = [int(p) for t, (p, ok) in enumerate(zip(ranked[i, j], valid[i, j]))
                    if ok and t < kept_len[i, j]]  # fmt: skip
            want = sorted(kept, key=lambda p: -float(est[i, j, p]))
            nv = int(got_v[i, j].sum())
            assert got_r[i, j, :nv].tolist() == want
            assert got_v[i, j, :nv].all() and not got_v[i, j, nv:].any()


def test_a_kept_superset_recovers_recall_that_a_kept_top_k_loses():
    """Never retrieving again after step 0: re-ranking a kept superset by each step's own
    estimates keeps more of the true top-100 than the step-0 top-k as it was; with a
    retrieval at every step (max age 1) the superset changes nothing."""
    cap = fake_capture(prompt=700, decode=24, layers=1)
    trace = layer_trace(cap, 0)
    budget = budget_for(0.3, cap.prompt_len)
    settings = [ReuseSetting(-1.0, 1000, keep=m) for m in (1, 4)] + [
        ReuseSetting(-1.0, 1, keep=4)
    ]
    got = evaluate_layer_reuse(trace, budget, settings, chunk=8)
    stale, superset = got["t-1_age1000_layer"], got["t-1_age1000_layer_keep4"]
    assert superset["retrieved"][1:].sum() == 0
    gain = superset["recall_at_100"][1:].mean() - stale["recall_at_100"][1:].mean()
    assert gain > 0.05
    every = got[EVERY_STEP]
    for m in ("recall_at_100", "mass_recall"):
        torch.testing.assert_close(got["t-1_age1_layer_keep4"][m], every[m])
