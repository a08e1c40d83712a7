"""Long-context tasks at budgets of 1-5%: dense, exact top-k and ParisKV side by side (CPU).

    python benchmarks/bench_quality_suite.py --context 4000 --trials 10 --budgets 0.01 0.02 0.05

A simple passkey does not separate retrieval methods: on small budgets every method finds
one salient needle. These tasks do (``pariskv_tools.workloads.task_generators``):

* ``multikey_needle``: four same-shaped "special magic number" sentences, one asked for;
* ``multivalue_needle``: three numbers of one word among two other words' numbers, all
  three asked for at once (aggregation);
* ``variable_tracking``: a chain of four assignments plus a distractor chain;
* ``passkey``, as the easy reference.

Each prompt is prefilled once, densely, as in serving; its first answer token comes from
that prefill, and the rest of the answer is decoded greedily from copies of the same KV
cache: densely, and for every budget fraction f both with the exact top-k (the zone's
top-k by exact group-mean q.k: what the budget alone loses) and with ParisKV's retrieval,
each attending sink + local window + top-k = f x prompt tokens (``--methods pariskv_keys``
adds ParisKV with the rerank by the keys, ``--pariskv-rerank keys``). The sparse methods run
through the reference integration (``pariskv_tools.hf_attention``: the codec the GPU
kernels are tested against); with ``--calibration`` ParisKV uses the file's key centres
and channel scales, as a server given ``--pariskv-calibration`` does. Reported per (task,
budget, method): accuracy, agreement with dense (the answer scores as dense's does),
identical answers, and two measures that still separate methods when a small model gets a
task all wrong or all right: with dense's answer teacher-forced, the share of its tokens
(after the first) that are the method's argmax too, and the mean log-probability of those
tokens against dense's own (``logprob_gap``, 0 for a method that predicts as dense does).
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

from pariskv_tools.cli import HelpFormatter, add_results_args, load_calibration_for, redraw

RESULTS = Path(__file__).resolve().parent / "results" / "quality_suite.json"
TASKS = ("passkey", "multikey_needle", "multivalue_needle", "variable_tracking")
#: tokens an answer needs at most (7-digit numbers are up to 7 tokens; names 2-3 each)
MAX_NEW = {"passkey": 10, "multikey_needle": 10, "multivalue_needle": 32, "variable_tracking": 24}
#: method -> (hf_attention selection, ParisKV rerank)
METHODS = {
    "exact": ("exact", "code"),
    "pariskv": ("pariskv", "code"),
    "pariskv_keys": ("pariskv", "keys"),
}
#: legend of each method in the plot
LABELS = {"exact": "exact top-k", "pariskv": "ParisKV", "pariskv_keys": "ParisKV, rerank by keys"}


def make_task(generators, tok, name: str, context: int, seed: int):
    """The task with its generator's default parameters (4 keys; 3 values and 2 distractor
    words; 2 chains of 4); passkeys at depths spread by the seed."""
    if name == "passkey":
        return generators.passkey(tok, context, depth=(seed * 0.618 + 0.1) % 0.9 + 0.05, seed=seed)
    return generators.make_task(name, tok, context, seed=seed)


def topk_for(fraction: float, prompt_tokens: int, sink: int, local: int) -> int:
    """Top-k so that sink + local + top-k is ``fraction`` of the prompt (at least 1)."""
    k = round(fraction * prompt_tokens) - sink - local
    if k < 1:
        raise SystemExit(
            f"--budgets {fraction}: {fraction:.3g} x {prompt_tokens} prompt tokens does not "
            f"cover --sink {sink} + --local {local}; raise the budget or the context"
        )
    return k


def run(model, tok, args, calibration=None) -> list[dict]:
    """One row per (task, seed): every method's answer, its score and its identity to dense
    (``calibration``: a loaded calibration file for ParisKV, or None)."""
    from pariskv_tools.hf_attention import ParisKVAttention, install, uninstall
    from pariskv_tools.workloads import task_generators, tasks
    from pariskv_tools.workloads.models import (
        eos_ids,
        forced_agreement,
        greedy_continue,
        last_logits_kwargs,
    )
    from sglang_pariskv.config import ParisKVConfig

    eos = eos_ids(model)
    rows = []
    for name in args.tasks:
        for seed in range(args.trials):
            t0 = time.perf_counter()
            task = make_task(task_generators, tok, name, args.context, seed)
            prompt = tasks.format_chat(tok, task)
            steps = MAX_NEW[name]
            uninstall(model)
            with torch.inference_mode():
                out = model(
                    input_ids=torch.tensor([prompt]), use_cache=True, **last_logits_kwargs(model)
                )
            first = int(out.logits[0, -1].argmax())
            past = copy.deepcopy(out.past_key_values)
            answers = {"dense": greedy_continue(model, past, first, steps, eos)}
            forced = {"dense": forced_agreement(model, copy.deepcopy(out.past_key_values),
                                                answers["dense"])}  # fmt: skip
            for f in args.budgets:
                k = topk_for(f, len(prompt), args.sink, args.local)
                for method in args.methods:
                    selection, rerank = METHODS[method]
                    cfg = ParisKVConfig(
                        topk=k, sink=args.sink, local=args.local, dense_threshold=0, rerank=rerank
                    )
                    attn = ParisKVAttention(
                        cfg, measure=False, selection=selection, calibration=calibration
                    )
                    install(model, attn)
                    past = copy.deepcopy(out.past_key_values)
                    answers[f"{method}@{f}"] = greedy_continue(model, past, first, steps, eos)
                    attn.reset()  # a new sequence from the same prefill
                    past = copy.deepcopy(out.past_key_values)
                    forced[f"{method}@{f}"] = forced_agreement(model, past, answers["dense"])
                    uninstall(model)
            texts = {m: tok.decode(ids, skip_special_tokens=True) for m, ids in answers.items()}
            row = {
                "task": name,
                "seed": seed,
                "prompt_tokens": len(prompt),
                "answer": task.answer,
                "texts": texts,
                "correct": {m: bool(tasks.score(task, t)) for m, t in texts.items()},
                "identical": {m: a == answers["dense"] for m, a in answers.items()},
                "token_agreement": {m: top1 for m, (top1, _) in forced.items()},
                "logprob": {m: lp for m, (_, lp) in forced.items()},
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("task", "seed", "correct")}), flush=True)
    return rows


def summarise(rows: list[dict], budgets: list[float], methods: list[str]) -> list[dict]:
    """Per (task, budget, method): accuracy next to dense's, agreement, identical answers,
    token agreement and log-probability gap with dense's answer teacher-forced."""
    out = []
    for name in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == name]
        n = len(mine)
        dense = sum(r["correct"]["dense"] for r in mine) / n
        for f in budgets:
            for method in methods:
                key = f"{method}@{f}"
                gap = sum(r["logprob"][key] - r["logprob"]["dense"] for r in mine) / n
                out.append(
                    {
                        "task": name,
                        "budget_fraction": f,
                        "method": method,
                        "trials": n,
                        "dense_acc": dense,
                        "acc": sum(r["correct"][key] for r in mine) / n,
                        "agreement": sum(r["correct"][key] == r["correct"]["dense"] for r in mine)
                        / n,
                        "identical_answers": sum(r["identical"][key] for r in mine) / n,
                        "token_agreement": sum(r["token_agreement"][key] for r in mine) / n,
                        "logprob_gap": gap,
                    }
                )
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument("--model", type=Path, help="HF directory or .gguf (default: SmolLM2-135M)")
    ap.add_argument("--context", type=int, default=4000, help="prompt tokens")
    ap.add_argument("--trials", type=int, default=10, help="prompts (seeds) per task")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="tasks to run")
    ap.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[0.01, 0.02, 0.05],
        help="attended tokens (sink + local + top-k) as fractions of the prompt",
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=["exact", "pariskv"],
        help="sparse methods beside dense: exact top-k, ParisKV, ParisKV with the rerank by "
        "the keys",
    )
    ap.add_argument(
        "--calibration",
        type=Path,
        help="calibration file of the model (python -m pariskv_tools.eval calibrate): "
        "ParisKV encodes with its key centres and channel scales (default: none)",
    )
    ap.add_argument("--sink", type=int, default=4, help="leading tokens always attended")
    ap.add_argument("--local", type=int, default=16, help="recent tokens always attended")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cache-root", type=Path, help="where models are converted and cached")
    add_results_args(ap, RESULTS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:
        print(redraw(args.plot, plot))
        return 0
    for f in args.budgets:
        if not 0 < f <= 1:
            raise SystemExit(f"--budgets {f}: a fraction of the prompt, in (0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    from pariskv_tools.workloads.models import resolve_model

    source = resolve_model(args.model, args.cache_root)
    calibration = load_calibration_for(args.calibration, source.config)
    model, tok = source.load()
    t0 = time.perf_counter()
    rows = run(model, tok, args, calibration)
    report = {
        "device": f"CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join(["python", *sys.argv]),
        "model": source.describe(),
        "context": args.context,
        "sink": args.sink,
        "local": args.local,
        "budgets": args.budgets,
        "methods": args.methods,
        "calibration": None if args.calibration is None else str(args.calibration),
        "summary": summarise(rows, args.budgets, args.methods),
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    head = ("task", "budget", "method", "acc", "dense", "agree", "same", "tok", "dlogp")
    print("{:<18} {:>6} {:>8} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6}".format(*head))
    for s in report["summary"]:
        print(
            f"{s['task']:<18} {s['budget_fraction']:>6.3f} {s['method']:>8} {s['acc']:>5.2f} "
            f"{s['dense_acc']:>5.2f} {s['agreement']:>5.2f} {s['identical_answers']:>5.2f} "
            f"{s['token_agreement']:>5.2f} {s['logprob_gap']:>6.3f}"
        )
    print(plot(report, args.out.with_suffix(".png")))
    return 0


def plot(report: dict, out: Path) -> Path:
    """One column per task: accuracy by budget (a bar per method, dense a line) above the
    log-probability gap to dense with dense's answer teacher-forced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    names = list(dict.fromkeys(s["task"] for s in summary))
    budgets = report["budgets"]
    methods = report.get("methods", ["exact", "pariskv"])
    width = 0.76 / len(methods)
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 6.2), sharey="row")
    axes = axes.reshape(2, len(names))
    for col, name in enumerate(names):
        mine = [s for s in summary if s["task"] == name]
        for j, method in enumerate(methods):
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(budgets))]
            for row, key in enumerate(("acc", "logprob_gap")):
                ys = [next(s[key] for s in mine if s["method"] == method
                           and s["budget_fraction"] == f) for f in budgets]  # fmt: skip
                axes[row, col].bar(xs, ys, width, label=LABELS[method])
        axes[0, col].axhline(mine[0]["dense_acc"], color="k", ls="--", label="dense")
        axes[0, col].set_title(name, fontsize=10)
        axes[0, col].set_ylim(0, 1.05)
        for row in range(2):
            axes[row, col].set_xticks(range(len(budgets)), [f"{100 * f:g}%" for f in budgets])
    axes[0, 0].set_ylabel(f"accuracy ({mine[0]['trials']} prompts per task)")
    axes[1, 0].set_ylabel("log-prob of dense's answer\nminus dense's (nats per token)")
    axes[0, -1].legend(loc="lower right", fontsize=8)
    fig.suptitle(
        f"{report['model']['name']}, {report['context']}-token prompts, budget = sink + local "
        "+ top-k as % of the prompt",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    sys.exit(main())
