"""Retrieval every N-th step (``eval.reuse``) against a per-step float64 oracle built on
``codec.retrieve``, and against the main evaluation at N = 1."""

from __future__ import annotations

import pytest
import torch

from pariskv_tools.eval.__main__ import build_parser, main
from pariskv_tools.eval.budget import Budget
from pariskv_tools.eval.layer_eval import evaluate_layer
from pariskv_tools.eval.methods import ParisKV
from pariskv_tools.eval.reuse import (
    interval_quality,
    lagged,
    lagged_candidate_quality,
    last_retrieval,
    refresh_source,
    rule_quality,
    sliced_rules,
)
from pariskv_tools.eval.trace import LayerTrace
from sglang_pariskv.codec.budget import candidate_ratios, num_candidates
from sglang_pariskv.codec.collision import centroid_table, collision_scores
from sglang_pariskv.codec.encode import encode_keys
from sglang_pariskv.codec.pipeline import retrieve
from sglang_pariskv.codec.query import prepare_query
from sglang_pariskv.codec.select import (
    estimate_inner_products,
    rerank_topk,
    select_candidates,
    zone_mask,
)
from sglang_pariskv.config import ParisKVConfig

HKV, G, D, N, S = 3, 3, 32, 700, 13
BUDGET = Budget(fraction=0.2, sink=8, local=32)


def trace(seed: int = 0) -> LayerTrace:
    """Keys with a shared direction and queries that drift slowly, so consecutive steps'
    selections overlap (as real decode queries do) without being equal."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(N, HKV, D, generator=g) + torch.randn(HKV, D, generator=g)
    base = torch.randn(HKV * G, D, generator=g)
    drift = torch.randn(S, HKV * G, D, generator=g).cumsum(0) * 0.3
    values = torch.randn(N, HKV, D, generator=g)
    return LayerTrace(keys, values, base + drift, torch.arange(N - S + 1, N + 1), N - S)


def oracle(t: LayerTrace, interval: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(recall@100, mass) [S, H] step by step: the attended set of step s is what
    ``codec.retrieve`` returned at its last retrieval step r (sink, r's window, r's top-k)
    plus the positions written since r; dense weights in float64."""
    codes = encode_keys(t.keys)
    recall = torch.zeros(S, HKV, dtype=torch.float64)
    mass = torch.zeros(S, HKV, dtype=torch.float64)
    for s in range(S):
        r = (s // interval) * interval
        seq_r, seq_s = int(t.seq_lens[r]), int(t.seq_lens[s])
        picks = {}
        for name, k in (("budget", int(BUDGET.retrieved(t.seq_lens[r : r + 1]))), ("100", 100)):
            cfg = ParisKVConfig(topk=k, sink=BUDGET.sink, local=BUDGET.local, dense_threshold=0)
            full = type(codes)(*(x[None] for x in codes))
            ret = retrieve(t.queries[r : r + 1], full, t.seq_lens[r : r + 1], cfg)
            picks[name] = [set(ret.positions[0, h][ret.valid[0, h]].tolist()) for h in range(HKV)]
        new = set(range(seq_r, seq_s))
        q = t.queries[s].double().reshape(HKV, G, D)
        for h in range(HKV):
            k = t.keys[:seq_s, h].double()
            probs = torch.softmax(q[h] @ k.T * D**-0.5, -1).mean(0)
            attended = torch.tensor(sorted(picks["budget"][h] | new))
            mass[s, h] = probs[attended].sum()
            zone = torch.arange(BUDGET.sink, seq_s - BUDGET.local)
            exact = k[zone] @ q[h].mean(0)
            truth = set(zone[exact.argsort(descending=True)[:100]].tolist())
            window_r = set(range(seq_r - BUDGET.local, seq_r))
            # picks["100"] holds r's sink and window too; only zone keys count
            recall[s, h] = len(truth & (picks["100"][h] | window_r | new)) / 100
    return recall, mass


@pytest.mark.parametrize("interval", [1, 3, 5])
def test_interval_quality_matches_the_per_step_oracle(interval):
    t = trace(interval)
    got = interval_quality(t, BUDGET, [interval], chunk=4)[interval]
    recall, mass = oracle(t, interval)
    torch.testing.assert_close(got["mass_recall"].double(), mass, atol=2e-5, rtol=0)
    # float32 and float64 exact scores may order the 100th and 101st key differently
    diff = (got["recall_at_100"].double() - recall).abs()
    assert diff.max() <= 0.01 + 1e-9 and diff.mean() < 2e-3


def test_every_step_is_the_main_evaluation():
    """N = 1 gives exactly the retrieval evaluation's ParisKV recall@100 and mass."""
    t = trace(7)
    got = interval_quality(t, BUDGET, [1, 4])
    main_eval = evaluate_layer(t, [ParisKV(outputs=("full",))], BUDGET).metrics["pariskv"]
    for m in ("recall_at_100", "mass_recall"):
        torch.testing.assert_close(got[1][m], main_eval[m])
        # a step that retrieves scores as if every step did
        torch.testing.assert_close(got[4][m][::4], main_eval[m][::4])
    assert not torch.equal(got[4]["recall_at_100"], got[1]["recall_at_100"])


def lagged_oracle(t: LayerTrace, lag: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(recall@100, mass) [S, H] step by step from the codec's stages: step s's candidates
    are the top collision scores of step max(s - lag, s if s < lag)'s query over step s's
    zone, reranked by step s's own query; dense weights in float64."""
    codes = encode_keys(t.keys)
    full = type(codes)(*(x[None] for x in codes))
    recall = torch.zeros(S, HKV, dtype=torch.float64)
    mass = torch.zeros(S, HKV, dtype=torch.float64)
    for s in range(S):
        e = s - lag if s >= lag else s
        seq = t.seq_lens[s : s + 1]
        cfg = ParisKVConfig(topk=1, sink=BUDGET.sink, local=BUDGET.local, dense_threshold=0)
        zone = seq - BUDGET.sink - BUDGET.local
        counts = num_candidates(zone, candidate_ratios(zone, cfg), cfg)
        table = centroid_table(prepare_query(t.queries[e : e + 1], HKV).blocks)
        in_zone = zone_mask(N, BUDGET.sink, seq - BUDGET.local)
        cand, valid = select_candidates(collision_scores(full.signs, table), in_zone, counts)
        q_own = prepare_query(t.queries[s : s + 1], HKV)
        picks = {}
        for name, k in (("budget", int(BUDGET.retrieved(seq))), ("100", 100)):
            pos, ok = rerank_topk(full, q_own, cand, valid, k)
            picks[name] = [set(pos[0, h][ok[0, h]].tolist()) for h in range(HKV)]
        score_step(t, s, picks, recall, mass)
    return recall, mass


def score_step(t: LayerTrace, s: int, picks: dict, recall, mass) -> None:
    """recall[s] and mass[s] of step s attending the sink, its window and ``picks``
    ("budget": the retrieved sets per head; "100": the top-100 per head), in float64."""
    seq_s = int(t.seq_lens[s])
    q = t.queries[s].double().reshape(HKV, G, D)
    window = set(range(seq_s - BUDGET.local, seq_s)) | set(range(BUDGET.sink))
    for h in range(HKV):
        k = t.keys[:seq_s, h].double()
        probs = torch.softmax(q[h] @ k.T * D**-0.5, -1).mean(0)
        mass[s, h] = probs[sorted(picks["budget"][h] | window)].sum()
        zone_pos = torch.arange(BUDGET.sink, seq_s - BUDGET.local)
        exact = k[zone_pos] @ q[h].mean(0)
        truth = set(zone_pos[exact.argsort(descending=True)[:100]].tolist())
        recall[s, h] = len(truth & picks["100"][h]) / 100


@pytest.mark.parametrize("lag", [1, 4])
def test_lagged_candidates_match_the_codec_stages(lag):
    t = trace(lag + 10)
    got = lagged_candidate_quality(t, BUDGET, [lag], chunk=4)[lag]
    recall, mass = lagged_oracle(t, lag)
    torch.testing.assert_close(got["mass_recall"].double(), mass, atol=2e-5, rtol=0)
    diff = (got["recall_at_100"].double() - recall).abs()
    assert diff.max() <= 0.01 + 1e-9 and diff.mean() < 2e-3
    # the first `lag` steps have no earlier query: they retrieve as served
    served = interval_quality(t, BUDGET, [1])[1]
    torch.testing.assert_close(got["mass_recall"][:lag], served["mass_recall"][:lag])
    # later steps' candidates come from another query (drifting queries: other sets)
    assert not torch.equal(got["mass_recall"][lag:], served["mass_recall"][lag:])


def sliced_oracle(t: LayerTrace, count: int, granule: int, kind: str):
    """(recall@100, mass) [S, H] step by step from the codec's stages when step s
    re-scores slice s mod ``count`` of the positions (granules of ``granule``, slice j =
    granule index mod ``count``; step 0 all): every other position keeps the collision
    score (and for ``kind`` "both" the rerank estimate) of the query of the last step that
    re-scored its slice; candidates and top-k over every position."""
    codes = encode_keys(t.keys)
    full = type(codes)(*(x[None] for x in codes))
    recall = torch.zeros(S, HKV, dtype=torch.float64)
    mass = torch.zeros(S, HKV, dtype=torch.float64)
    slice_of = [(p // granule) % count for p in range(N)]
    for s in range(S):
        src = torch.tensor([max(0, s - (s - j) % count) for j in slice_of])  # [N]
        seq = t.seq_lens[s : s + 1]
        coll = torch.zeros(1, N, HKV, dtype=torch.int64)
        prepared = {}
        for e in src.unique().tolist():
            prepared[e] = prepare_query(t.queries[e : e + 1], HKV)
            scores_e = collision_scores(full.signs, centroid_table(prepared[e].blocks))
            coll[:, src == e] = scores_e[:, src == e]
        cfg = ParisKVConfig(topk=1, sink=BUDGET.sink, local=BUDGET.local, dense_threshold=0)
        zone = seq - BUDGET.sink - BUDGET.local
        counts = num_candidates(zone, candidate_ratios(zone, cfg), cfg)
        in_zone = zone_mask(N, BUDGET.sink, seq - BUDGET.local)
        cand, valid = select_candidates(coll, in_zone, counts)
        q_own = prepare_query(t.queries[s : s + 1], HKV)
        heads = torch.arange(HKV)[None, :, None].expand_as(cand)
        recs = full.index(torch.zeros_like(cand), cand, heads)  # [1, H, C, ...]
        owner = src[cand] if kind == "both" else torch.full_like(cand, s)
        est = torch.full(cand.shape, float("-inf"))
        for e in owner.unique().tolist():
            q_e = q_own if e == s else prepared[e]
            est_e = estimate_inner_products(recs, q_e.blocks[:, :, None], q_e.norm[..., None])
            est = torch.where(owner == e, est_e, est)
        est = torch.where(valid, est, float("-inf"))
        order = torch.sort(est, dim=-1, descending=True, stable=True).indices
        picks = {}
        for name, k in (("budget", int(BUDGET.retrieved(seq))), ("100", 100)):
            top = order[..., :k]
            pos, ok = torch.gather(cand, -1, top), torch.gather(valid, -1, top)
            picks[name] = [set(pos[0, h][ok[0, h]].tolist()) for h in range(HKV)]
        score_step(t, s, picks, recall, mass)
    return recall, mass


@pytest.mark.parametrize("kind", ["collision", "both"])
@pytest.mark.parametrize(("count", "granule"), [(2, 64), (3, 100)])
def test_sliced_refresh_matches_the_codec_stages(kind, count, granule):
    t = trace(count + granule)
    method = ParisKV(outputs=("full",))
    rules = sliced_rules(t, BUDGET, [count], method, granule, chunk=4)
    got = rule_quality(t, BUDGET, {"r": rules[(kind, count)]}, chunk=4)["r"]
    recall, mass = sliced_oracle(t, count, granule, kind)
    torch.testing.assert_close(got["mass_recall"].double(), mass, atol=2e-5, rtol=0)
    diff = (got["recall_at_100"].double() - recall).abs()
    assert diff.max() <= 0.01 + 1e-9 and diff.mean() < 2e-3
    # step 0 re-scores everything: it retrieves as served; later steps keep older scores
    served = interval_quality(t, BUDGET, [1], method)[1]
    torch.testing.assert_close(got["mass_recall"][:1], served["mass_recall"][:1])
    assert not torch.equal(got["mass_recall"][1:], served["mass_recall"][1:])


def test_refresh_source():
    # granules of 2 positions, 3 slices: positions 0-1 slice 0, 2-3 slice 1, 4-5 slice 2
    got = refresh_source(torch.arange(5), 6, 3, 2)
    assert got.tolist() == [
        [0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 2, 2],
        [3, 3, 1, 1, 2, 2],
        [3, 3, 4, 4, 2, 2],
    ]


def test_lag_is_free_when_every_zone_key_is_a_candidate():
    """At candidate ratio 1 the collision stage keeps the whole zone whatever the query, so
    an earlier query's candidates are this step's."""
    t = trace(3)
    method = ParisKV(ParisKVConfig(candidate_ratio=1.0), outputs=("full",))
    lagged_q = lagged_candidate_quality(t, BUDGET, [2], method)[2]
    served = interval_quality(t, BUDGET, [1], method)[1]
    for m in ("recall_at_100", "mass_recall"):
        torch.testing.assert_close(lagged_q[m], served[m])


def test_lagged_step():
    assert lagged(torch.arange(6), 2).tolist() == [0, 1, 0, 1, 2, 3]


def test_last_retrieval_step():
    assert last_retrieval(torch.arange(7), 3).tolist() == [0, 0, 0, 3, 3, 3, 6]


@pytest.mark.parametrize("flag", ["--intervals", "--lags", "--slices"])
@pytest.mark.parametrize("bad", ["0,2", "x", ""])
def test_bad_lists_are_refused(flag, bad, tmp_path):
    with pytest.raises(SystemExit, match=flag):
        main(["reuse", flag, bad, "--out", str(tmp_path / "r.json")])


@pytest.mark.parametrize("bad", ["0", "1.5", "nan"])
def test_bad_candidate_ratio_is_refused(bad, tmp_path):
    with pytest.raises(SystemExit, match="--candidate-ratio"):
        main(["reuse", "--candidate-ratio", bad, "--out", str(tmp_path / "r.json")])


def test_reuse_command_is_listed():
    args = build_parser().parse_args(["reuse"])
    assert args.intervals == "1,2,4,8,16" and args.lags == "1,2,4" and args.fraction == 0.10
    assert args.slices == "2,4" and args.slice_granule == 128
    assert args.candidate_ratio is None


def test_reuse_takes_contexts_and_layers():
    args = build_parser().parse_args(
        ["reuse", "--contexts", "64000:variable_tracking", "--layers", "0,10", "--slices", "4"]
    )
    assert (args.contexts, args.layers, args.slices) == ("64000:variable_tracking", "0,10", "4")
