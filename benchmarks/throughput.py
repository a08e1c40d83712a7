"""Decode throughput through SGLang: a dense engine against a ParisKV one, same prompts.

Each engine runs in its own process (:mod:`engine_runs`) on a Llama-3.1-8B shape with
dummy weights, at every batch that fits it. A step's time is the difference of two
generation lengths on radix-cached prompts, so prefill and scheduling cancel out, and each
row stands beside its byte floor (:mod:`step_floor`). The stats files must show each engine
decoding as its mode says, or nothing is reported. Rows are saved as they are measured, so
one comparison can span device calls. ``bench_e2e.py throughput``, ``bench_short_traffic.py``
and ``bench_tp.py throughput`` run it; :mod:`throughput_results` summarizes its rows and
merges them into ``e2e.json``.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from pathlib import Path

from engine_runs import _engine, _read_stats, _run_isolated, add_counters, resume_run
from step_floor import LLAMA_8B, hbm_bandwidth_gbs, step_bytes
from throughput_results import TABLE_DENSE_BACKEND, max_throughput


def _throughput_worker(
    model_dir, pariskv, input_len, batches, max_running, output_len, engine_kwargs,
    ttft_repeats, grow_prompts, out_q,
):  # fmt: skip
    """One engine per (mode, input length), sized for ``max_running`` requests; every batch
    whose KV fits, ascending, each row sent as a partial result as soon as it is measured.

    Time to first token is the median over ``ttft_repeats`` prefills of fresh prompts (the
    first prefill of a long prompt on a fresh engine can carry a one-time cost); decode is
    timed on the last prompts. With ``grow_prompts`` only the first batch does that: each
    later batch decodes the previous batch's prompts (still in the radix cache) plus as many
    new ones as it needs, prefilled untimed, so a sweep of batches at 128K prefills each
    prompt once instead of once per batch (no time to first token in those rows).

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
        kept: list[list[int]] = []  # grow_prompts: the prompts the radix cache holds

        def fresh(k: int) -> list[list[int]]:
            return [[rng.randrange(1000, 100000) for _ in range(input_len)] for _ in range(k)]

        for b in batches:
            if b * (input_len + output_len) > capacity:
                rows.append({"batch": b, "error": f"KV capacity {capacity} tokens < batch"})
                continue
            ttft = {}
            if grow_prompts and kept:
                new = fresh(max(0, b - len(kept)))
                if new:
                    eng.generate(input_ids=new, sampling_params={"max_new_tokens": 1})
                kept += new
                prompts = kept[:b]
            else:
                prefills = []
                for _ in range(ttft_repeats):
                    prompts = fresh(b)
                    t0 = time.perf_counter()
                    eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1})
                    prefills.append(time.perf_counter() - t0)
                # the batch's time to first token (median)
                ttft = {"prefill_s": statistics.median(prefills), "prefill_s_each": prefills}
                kept = list(prompts)
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
                    **ttft,
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
    check_dense_engine(input_len, dense_stats)
    if not ok:
        raise RuntimeError(
            f"ParisKV did not run as expected at input {input_len} (dense threshold "
            f"{c.dense_threshold}): dense stats {dense_stats}, pariskv stats {pariskv_stats}"
        )


def check_dense_engine(input_len: int, dense_stats: dict) -> None:
    """Raise if the dense engine wrote ParisKV stats: it served with the plugin on."""
    if dense_stats:
        raise RuntimeError(
            f"the dense engine ran ParisKV at input {input_len}: dense stats {dense_stats}"
        )


def merge_engine_runs(done: dict | None, part: dict) -> dict:
    """One engine's rows from a run cut short (``done``, or None) and the run that resumed
    it: both runs' rows in batch order, their counters summed."""
    if done is None:
        return part
    rows = sorted(done["rows"] + part["rows"], key=lambda r: r["batch"])
    return {**part, "rows": rows, "stats": add_counters(done["stats"], part["stats"])}


def _measure_engine(
    model_dir, mcfg, n, max_running, output_len, engine_kwargs, ttft_repeats, grow_prompts,
    todo, on_partial,
):  # fmt: skip
    """:func:`_throughput_worker`'s rows for the batches ``todo``, in a fresh process."""
    return _run_isolated(
        _throughput_worker, model_dir, mcfg, n, todo, max_running, output_len, engine_kwargs,
        ttft_repeats, grow_prompts, on_partial=on_partial,
    )  # fmt: skip


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
    grow_prompts: bool = False,
) -> dict | None:
    """Dense and ParisKV engines per input length (time to first token: the median of
    ``ttft_repeats`` prefills per batch); ``shards`` GPUs split each step's bytes
    (tensor parallelism), so the floor is per GPU. The dense engine runs SGLang's
    ``dense_backend`` (ParisKV always runs on FlashInfer's).

    ``modes`` runs only those engines; with ``runs_dir`` each engine's rows are saved there
    as they are measured and the other mode's are read back, so one comparison can span
    device calls (each has a wall-clock limit): a run cut short keeps its finished batches,
    and the same command again runs only the rest. Returns None while a mode is missing,
    except for a dense engine of another backend than the table's
    (:data:`~throughput_results.TABLE_DENSE_BACKEND`): its rows alone are a result, the
    columns it adds to a table of ParisKV and FlashInfer rows (``pariskv_tok_s`` None
    where ParisKV's rows are missing)."""
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
            if grow_prompts:
                key["grow_prompts"] = True
            measure = functools.partial(
                _measure_engine, str(model_dir), mcfg, n, max(batches), output_len,
                key["engine"], ttft_repeats, grow_prompts,
            )  # fmt: skip
            got[mode] = _resume_engine(saved, key, mode in modes, batches, measure)
            if got[mode] is None:
                del got[mode]
        dense_only = "pariskv" not in got and dense_backend != TABLE_DENSE_BACKEND
        if "dense" not in got or ("pariskv" not in got and not dense_only):
            return None
        dense = got["dense"]
        engines[str(n)] = {"dense_capacity_tokens": dense["capacity_tokens"]}
        by_b = {}
        if dense_only:
            check_dense_engine(n, dense["stats"])
        else:
            sparse = got["pariskv"]
            check_engines_ran(n, output_len, cfg, dense["stats"], sparse["stats"], max(batches))
            engines[str(n)] |= {
                "pariskv_capacity_tokens": sparse["capacity_tokens"],
                "pariskv_stats": sparse["stats"],
            }
            by_b = {r["batch"]: r for r in sparse["rows"]}
        dense_by_b = {r["batch"]: r for r in dense["rows"]}
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
