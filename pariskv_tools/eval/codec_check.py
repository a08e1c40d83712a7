"""Cross-check on real traces: the evaluation's ParisKV ranking cut at k is ``codec.retrieve``.

The unit test checks the equivalence on planted data; this runs it on captured steps, e.g.
``python -m pariskv_tools.eval.codec_check``, and prints how many (step, head) sets differ.
"""

from __future__ import annotations

import torch

from pariskv_tools.eval.budget import Budget
from pariskv_tools.eval.methods import ParisKV
from pariskv_tools.eval.ranking import rank, zone_mask
from pariskv_tools.eval.trace import LayerTrace
from sglang_pariskv.codec import KeyCodes, encode_keys, retrieve
from sglang_pariskv.config import ParisKVConfig


def mismatches(trace: LayerTrace, budget: Budget, steps: list[int]) -> tuple[int, int]:
    """(differing sets, sets compared) between our ranking and ``codec.retrieve``."""
    method = ParisKV(outputs=("full",))
    state = method.prepare(trace)
    codes = encode_keys(trace.keys)
    bad = total = 0
    for i in steps:
        q, seq = trace.queries[i : i + 1], trace.seq_lens[i : i + 1]
        batch = budget.batch(q, seq)
        k = int(batch.retrieved[0])
        in_zone = zone_mask(seq, budget.sink, budget.local, trace.num_keys)
        ranked, _ = rank(method.scores(state, batch)["pariskv"], in_zone, k)
        cfg = ParisKVConfig(topk=k, sink=budget.sink, local=budget.local, dense_threshold=0)
        n = int(seq[0])
        one = KeyCodes(*(t[None, :n] for t in codes))
        got = retrieve(q, one, seq, cfg).positions[0, :, budget.sink + budget.local :]
        for h in range(trace.num_kv_heads):
            total += 1
            bad += set(ranked[0, h].tolist()) != set(got[h][got[h] >= 0].tolist())
    return bad, total


def main() -> None:
    from pariskv_tools.eval.budget import budget_for
    from pariskv_tools.eval.captures import (
        DEFAULT_CONTEXTS,
        default_cache_dir,
        layer_trace,
        load_or_capture,
    )
    from pariskv_tools.workloads.models import resolve_model

    torch.set_num_threads(1)
    model = resolve_model(None)
    for spec in DEFAULT_CONTEXTS:
        cap = load_or_capture(spec, 1024, 0, default_cache_dir(), model)
        budget = budget_for(0.10, cap.prompt_len)
        bad = total = 0
        n = cap.n_layers
        for layer in (0, n // 2, n - 1):
            b, t = mismatches(layer_trace(cap, layer), budget, [0, 511, 1023])
            bad, total = bad + b, total + t
        print(f"{spec.label}: {bad} of {total} (step, head) sets differ from codec.retrieve")


if __name__ == "__main__":
    main()
