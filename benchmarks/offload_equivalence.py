"""Host offload against the GPU pool: the same passkey prompts must get the same answers.

With ``--pariskv-offload host`` ParisKV attends the same rows as over SGLang's GPU pool,
only fetched from host memory, so every greedy answer must be identical. Where one differs,
the first differing token and the baseline's top-1/top-2 log-probability margin there tell
a flipped near-tie (numerics) from a real divergence (other rows attended); a second
GPU-pool engine (``gpu_pool_repeat``) measures SGLang's own run-to-run noise as the
yardstick. ``bench_e2e.py offload`` runs it.
"""

from __future__ import annotations

from engine_runs import _run_isolated
from passkey_runs import _passkey_worker, passkey_prompts

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

    from pariskv_tools.workloads import task_generators, tasks
    from pariskv_tools.workloads.smollm2 import ensure_smollm2
    from sglang_pariskv.config import ParisKVConfig

    model = str(ensure_smollm2())
    tok = AutoTokenizer.from_pretrained(model)
    task_list, prompts = passkey_prompts(tok, contexts, trials)
    short = [tasks.format_chat(tok, task_generators.passkey(tok, 600, 0.5, s)) for s in range(4)]
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


def _describe_difference(d: dict) -> str:
    def fmt(m):
        return "n/a" if m is None else f"{m:.3f}"

    return (
        f"prompt {d['prompt']} (context {d['context']}): first differing token "
        f"{d['first_diff_token']}, gpu_pool margin there {fmt(d['baseline_margin_at_diff'])} "
        f"(this run {fmt(d['this_margin_at_diff'])}), took gpu_pool's 2nd choice "
        f"{d['this_is_baseline_top2']}"
    )
