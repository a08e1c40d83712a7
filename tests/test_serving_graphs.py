"""Dense-step CUDA graphs and ``min_sparse_tokens`` through real SGLang engines (GPU).

A small Llama-shaped model with SGLang's seeded dummy weights serves the same prompts in
four engines; every comparison is between paths that must compute bit-identical logits,
so greedy outputs must match token for token:

* dense-step graphs (``SGLANG_PARISKV_DENSE_GRAPHS=1``) vs without (``=0``): a step
  without a request above the threshold replays the graph without retrieval instead of
  the one whose dense rows are selected out (same FlashInfer call either way), and
  fewer steps run the retrieval kernels;
* ``min_sparse_tokens`` above any step's tokens vs plain SGLang (no plugin): every step
  is SGLang's own dense decode.
"""

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_e2e  # noqa: E402

pytestmark = pytest.mark.gpu

TINY_LLAMA = {
    **bench_e2e.LLAMA_8B,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 2048,
    "max_position_embeddings": 4096,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
CFG = {"topk": 64, "sink": 8, "local": 32, "dense_threshold": 256}


def _prompts() -> dict[str, tuple[list[list[int]], int]]:
    """(prompts, new tokens) per group: dense throughout, crossing the threshold while
    decoding, sparse throughout, and a mixed batch."""
    import random

    rng = random.Random(0)

    def p(n):
        return [rng.randrange(3, 2048) for _ in range(n)]

    return {
        "short": ([p(100) for _ in range(4)], 64),
        "crossing": ([p(220) for _ in range(2)], 80),
        "long": ([p(900) for _ in range(2)], 32),
        "mixed": ([p(100), p(900), p(120)], 48),
    }


def _worker(model_dir, pariskv, env, out_q):
    try:
        os.environ.update(env)
        stats_dir = tempfile.mkdtemp(prefix="pariskv-stats-")
        os.environ["SGLANG_PARISKV_STATS_DIR"] = stats_dir
        eng = bench_e2e._engine(
            model_dir,
            pariskv,
            load_format="dummy",
            skip_tokenizer_init=True,
            context_length=2048,
            max_running_requests=8,
            mem_fraction_static=0.5,
            disable_radix_cache=True,
        )
        outs = {}
        for name, (prompts, new) in _prompts().items():
            res = eng.generate(
                input_ids=prompts,
                sampling_params={"max_new_tokens": new, "temperature": 0, "ignore_eos": True},
            )
            outs[name] = [r["output_ids"] for r in res]
        eng.shutdown()
        out_q.put({"outs": outs, "stats": bench_e2e._read_stats(stats_dir)})
    except Exception as e:
        out_q.put({"error": f"{e!r}\n{traceback.format_exc()}"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    (d / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(d)


def _serve(model_dir, pariskv, **env):
    return bench_e2e._run_isolated(_worker, model_dir, pariskv, env)


def test_dense_step_graphs_give_the_same_tokens_and_skip_retrieval(model_dir):
    on = _serve(model_dir, CFG, SGLANG_PARISKV_DENSE_GRAPHS="1")
    off = _serve(model_dir, CFG, SGLANG_PARISKV_DENSE_GRAPHS="0")
    assert on["outs"] == off["outs"]
    s_on, s_off = on["stats"], off["stats"]
    assert s_on["decode_steps"] == s_off["decode_steps"] > 0
    assert s_on["sparse_request_steps"] == s_off["sparse_request_steps"] > 0
    # "short" alone never needs retrieval: 63 graph steps at least run without it
    assert s_on["sparse_steps"] <= s_off["sparse_steps"] - 63, (s_on, s_off)


def test_min_sparse_tokens_above_every_step_is_sglangs_dense_decode(model_dir):
    plain = _serve(model_dir, None)
    dense_steps = _serve(
        model_dir, {**CFG, "min_sparse_tokens": 10**9}, SGLANG_PARISKV_DENSE_GRAPHS="1"
    )
    assert dense_steps["outs"] == plain["outs"]
    st = dense_steps["stats"]
    assert st["sparse_steps"] == 0 and st["sparse_request_steps"] == 0
    assert st["dense_request_steps"] > 0 and not plain["stats"]
