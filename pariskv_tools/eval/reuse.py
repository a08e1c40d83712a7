"""``python -m pariskv_tools.eval reuse``: what three cheaper retrieval rules cost in
retrieval quality, against retrieving at every step with the step's own query (served).

**Every N-th step.** A server can skip a step's retrieval kernels entirely only if it
decides on the host, before the step, that no request needs a new selection: then the step
replays a decode graph without the retrieval path. The one rule the host can apply without
the step's queries is an interval: retrieve at every N-th step, and in between attend over
the sink, the last retrieved top-k and every position from the last retrieval's local
window on (the window start does not move, so tokens that leave the window stay attended,
and the tokens generated since join).

**Candidates from an earlier query (lag d).** Every step retrieves, but its candidates are
the ones the collision scores of the query of d steps earlier pick over the step's own
zone; the rerank and top-k use the step's own query. The collision stage would then not
need the step's query, so a server could run it a step ahead, off a layer's critical path.

**One slice of the zone re-scored per step (N slices).** Every step retrieves, but the
collision stage scores only slice t mod N of the zone (granules of ``--slice-granule``
positions, slice j the granules whose index is j mod N); the other positions keep the
scores of the query that last scored their slice, so the scan reads 1/N of the signatures.
Candidates are picked over the whole zone; the rerank uses the step's own query on every
candidate ("collision"), or keeps the old slices' estimates too ("both").

All three are scored on captured traces, every decode step of every layer at the 10% budget of
the evaluation:

* **recall@100**: of the exact top-100 zone keys of step t (group-mean q·k over
  [sink, seq_len - local)), the share inside ParisKV's top-100 of the last retrieval step
  or inside the positions attended since its window start;
* **mass recall**: step t's dense softmax mass (group mean) on the attended set.

Between retrievals a step attends up to N - 1 tokens more than the budget (the positions
generated since), so the interval rule is scored slightly in its favour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pariskv_tools.eval.budget import Budget
from pariskv_tools.eval.layer_eval import exact_scores
from pariskv_tools.eval.methods import ParisKV
from pariskv_tools.eval.metrics import dense_probs, take_first, topk_mask
from pariskv_tools.eval.ranking import rank, zone_mask
from pariskv_tools.eval.trace import LayerTrace, StepBatch

RECALL_K = 100
METRICS = ("recall_at_100", "mass_recall")
DEFAULT_INTERVALS = (1, 2, 4, 8, 16)
DEFAULT_LAGS = (1, 2, 4)
DEFAULT_SLICES = (2, 4)


def last_retrieval(steps: torch.Tensor, interval: int) -> torch.Tensor:
    """The step whose selection step ``t`` attends: the last multiple of ``interval``."""
    return torch.div(steps, interval, rounding_mode="floor") * interval


def lagged(steps: torch.Tensor, lag: int) -> torch.Tensor:
    """The step whose query picks step ``t``'s candidates: ``t - lag``, or ``t`` itself
    for the first ``lag`` steps (no earlier query: the candidates come inline)."""
    earlier = steps - lag
    return torch.where(earlier >= 0, earlier, steps)


def selections(
    trace: LayerTrace,
    budget: Budget,
    method: ParisKV,
    chunk: int = 64,
    lag: int = 0,
    state: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [S, H, N] per decode step: the method's retrieved set at the budget, and its
    top-100. ``lag`` > 0: the collision stage picks step t's candidates with the query of
    step :func:`lagged` (t, lag); the rerank and top-k use step t's own. ``state``: the
    method's ``prepare(trace)`` when the caller has it (every rule of a layer shares it)."""
    s, h, n = trace.queries.shape[0], trace.num_kv_heads, trace.num_keys
    state = method.prepare(trace) if state is None else state
    picked = torch.zeros(s, h, n, dtype=torch.bool)
    top100 = torch.zeros_like(picked)
    for lo in range(0, s, chunk):
        steps = torch.arange(lo, min(s, lo + chunk))
        batch = budget.batch(trace.queries[steps], trace.seq_lens[steps])
        earlier = trace.queries[lagged(steps, lag)] if lag else None
        scores = method.scores(state, batch, candidate_queries=earlier)[method.names[0]]
        _mark_selection(scores, batch, picked[lo : lo + len(steps)], top100[lo : lo + len(steps)])
    return picked, top100


def _mark_selection(
    scores: torch.Tensor, batch: StepBatch, picked: torch.Tensor, top100: torch.Tensor
) -> None:
    """Marks in ``picked`` / ``top100`` (bool [S, H, N], rows of the batch's steps) the
    budget's retrieved set and the top-100 of the ranking ``scores`` over the zone."""
    in_zone = zone_mask(batch.seq_lens, batch.sink, batch.local, scores.shape[-1])
    ranked, valid = rank(scores, in_zone, max(RECALL_K, int(batch.retrieved.max())))
    picked.scatter_(-1, ranked, take_first(valid, batch.retrieved))
    top100.scatter_(-1, ranked, take_first(valid, torch.full_like(batch.retrieved, RECALL_K)))


def refresh_source(steps: torch.Tensor, n: int, slices: int, granule: int) -> torch.Tensor:
    """int64 [S, n]: the step whose query last scored position p at step t when each step
    re-scores one of ``slices`` slices of the zone (slice j: the granules of ``granule``
    positions whose index is j mod ``slices``; step t re-scores slice t mod ``slices``).
    Step 0 scores every slice (a request's first sparse step has no earlier scores)."""
    j = (torch.arange(n) // granule) % slices
    src = steps[:, None] - torch.remainder(steps[:, None] - j[None], slices)
    return src.clamp_min(0)


def sliced_rules(
    trace: LayerTrace,
    budget: Budget,
    slices: Sequence[int],
    method: ParisKV,
    granule: int,
    chunk: int = 64,
    state: object | None = None,
) -> dict[tuple[str, int], Rule]:
    """Every step retrieves, but re-scores only one of N slices of the zone, keyed by
    ("collision", N): the collision scores of the other slices are those of the step that
    last re-scored them, the rerank of the candidates uses the step's own query; and by
    ("both", N): the other slices' rerank estimates are kept from that step too. The top-k
    then runs over every candidate. ``state``: as in :func:`selections`."""
    s, h, n = trace.queries.shape[0], trace.num_kv_heads, trace.num_keys
    state = method.prepare(trace) if state is None else state
    coll_all = torch.empty(s, h, n, dtype=torch.int16)  # collision scores are bytes
    est_all = torch.empty(s, h, n, dtype=torch.float32)
    for lo in range(0, s, chunk):
        steps = torch.arange(lo, min(s, lo + chunk))
        batch = budget.batch(trace.queries[steps], trace.seq_lens[steps])
        coll, est = method.stage_scores(state, batch)
        coll_all[steps], est_all[steps] = coll.to(torch.int16), est.float()
    rules = {}
    for count in slices:
        marks = {kind: torch.zeros(2, s, h, n, dtype=torch.bool) for kind in ("collision", "both")}
        for lo in range(0, s, chunk):
            steps = torch.arange(lo, min(s, lo + chunk))
            batch = budget.batch(trace.queries[steps], trace.seq_lens[steps])
            src = refresh_source(steps, n, count, granule)[:, None].expand(-1, h, -1)
            coll = torch.gather(coll_all, 0, src).to(torch.int64)  # the same for both kinds
            rows = slice(lo, lo + len(steps))
            for kind, (picked, top100) in marks.items():
                est = torch.gather(est_all, 0, src) if kind == "both" else est_all[steps]
                _mark_selection(method.ranking(coll, est, batch), batch, picked[rows], top100[rows])
        rules |= {(kind, count): (m[0], m[1], lambda t: t) for kind, m in marks.items()}
    return rules


#: A selection rule as :func:`rule_quality` scores it: each step's retrieved set and
#: top-100 (bool [S, H, N]), and which step's selection step t attends.
Rule = tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def rule_quality(
    trace: LayerTrace, budget: Budget, rules: dict, chunk: int = 64
) -> dict[object, dict[str, torch.Tensor]]:
    """{rule key: {"recall_at_100", "mass_recall": float32 [S, H]}} of one layer, for
    rules (:data:`Rule`) under which step t attends the selection of step ``source(t)``,
    the sink and every position from that step's local-window start on. The dense
    attention and exact top-100 of each step are computed once for all rules."""
    s, h, n = trace.queries.shape[0], trace.num_kv_heads, trace.num_keys
    pos = torch.arange(n)[None]
    out = {key: {m: [] for m in METRICS} for key in rules}
    for lo in range(0, s, chunk):
        steps = torch.arange(lo, min(s, lo + chunk))
        batch = budget.batch(trace.queries[steps], trace.seq_lens[steps])
        seq = batch.seq_lens
        mean_probs = dense_probs(batch.queries, trace.keys, seq).reshape(len(steps), h, -1, n)
        mean_probs = mean_probs.mean(2)
        in_zone = zone_mask(seq, batch.sink, batch.local, n)
        target, _ = rank(exact_scores(batch, trace.keys), in_zone, RECALL_K)
        truth = topk_mask(target, torch.full_like(seq, RECALL_K), n)
        sink = pos < batch.sink[:, None]
        for key, (picked, top100, source) in rules.items():
            r = source(steps)
            window_start = budget.zone_end(trace.seq_lens[r])
            since = (pos >= window_start[:, None]) & (pos < seq[:, None])  # [s, N]
            attended = picked[r] | (sink | since)[:, None]
            hits = (truth & (top100[r] | since[:, None])).sum(-1)
            out[key]["mass_recall"].append((mean_probs * attended).sum(-1))
            out[key]["recall_at_100"].append(hits.float() / RECALL_K)
    return {key: {m: torch.cat(v) for m, v in mets.items()} for key, mets in out.items()}


def interval_rules(
    trace: LayerTrace,
    budget: Budget,
    intervals: Sequence[int],
    method: ParisKV,
    chunk: int = 64,
    state: object | None = None,
) -> dict[int, Rule]:
    """Retrieval at every N-th decode step (step 0 retrieves), keyed by N."""
    picked, top100 = selections(trace, budget, method, chunk, state=state)
    return {iv: (picked, top100, lambda t, iv=iv: last_retrieval(t, iv)) for iv in intervals}


def lagged_rules(
    trace: LayerTrace,
    budget: Budget,
    lags: Sequence[int],
    method: ParisKV,
    chunk: int = 64,
    state: object | None = None,
) -> dict[int, Rule]:
    """Retrieval at every step with the candidates an earlier query picks, keyed by lag."""
    state = method.prepare(trace) if state is None else state
    return {
        lag: (*selections(trace, budget, method, chunk, lag, state), lambda t: t) for lag in lags
    }


def interval_quality(
    trace: LayerTrace,
    budget: Budget,
    intervals: Sequence[int],
    method: ParisKV | None = None,
    chunk: int = 64,
) -> dict[int, dict[str, torch.Tensor]]:
    """{N: {"recall_at_100", "mass_recall": float32 [S, H]}} of one layer when retrieval
    runs at every N-th decode step (step 0 retrieves)."""
    method = method or ParisKV(outputs=("full",))
    return rule_quality(
        trace, budget, interval_rules(trace, budget, intervals, method, chunk), chunk
    )


def lagged_candidate_quality(
    trace: LayerTrace,
    budget: Budget,
    lags: Sequence[int],
    method: ParisKV | None = None,
    chunk: int = 64,
) -> dict[int, dict[str, torch.Tensor]]:
    """{lag: {"recall_at_100", "mass_recall": float32 [S, H]}} of one layer when every
    step retrieves, but with the candidates its query's collision scores would give ``lag``
    steps earlier (lag 0: the served pipeline)."""
    method = method or ParisKV(outputs=("full",))
    return rule_quality(trace, budget, lagged_rules(trace, budget, lags, method, chunk), chunk)
