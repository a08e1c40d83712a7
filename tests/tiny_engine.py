"""Greedy generation through a real SGLang engine in a fresh process (GPU tests).

A small Llama-shaped config with SGLang's seeded dummy weights, served with and without
ParisKV by the GPU serving tests, which compare the greedy tokens of the two.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import engine_runs  # noqa: E402
import step_floor  # noqa: E402

TINY_LLAMA = {
    **step_floor.LLAMA_8B,
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


def write_tiny_llama(directory: Path) -> str:
    (directory / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(directory)


def _worker(model_dir, pariskv, groups, engine_args, out_q):
    try:
        stats_dir = tempfile.mkdtemp(prefix="pariskv-stats-")
        eng = engine_runs._engine(
            model_dir,
            pariskv,
            stats_dir,
            load_format="dummy",
            skip_tokenizer_init=True,
            context_length=2048,
            max_running_requests=8,
            mem_fraction_static=0.5,
            disable_radix_cache=True,
            **engine_args,
        )
        outs = {}
        for name, (prompts, new) in groups.items():
            res = eng.generate(
                input_ids=prompts,
                sampling_params={"max_new_tokens": new, "temperature": 0, "ignore_eos": True},
            )
            outs[name] = [r["output_ids"] for r in res]
        eng.shutdown()
        out_q.put({"outs": outs, "stats": engine_runs._read_stats(stats_dir)})
    except Exception as e:
        out_q.put({"error": f"{e!r}\n{traceback.format_exc()}"})


def serve(
    model_dir: str,
    pariskv: dict | None,
    groups: dict[str, tuple[list[list[int]], int]],
    **engine_args,
) -> dict:
    """``{"outs": {group: [output ids per prompt]}, "stats": ParisKV's summed stats}``:
    each group's ``(prompts, new tokens)`` generated greedily in one engine (ParisKV with
    config ``pariskv``; None: plain SGLang) in a fresh process."""
    got = engine_runs._run_isolated(_worker, model_dir, pariskv, groups, engine_args)
    assert "error" not in got, got.get("error")
    return got
