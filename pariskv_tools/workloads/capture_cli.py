"""The command line that captures a seeded task on a model and saves the trace to a file.

Why a module of its own: :mod:`.capture` records attention for any prompt and is imported by
the evaluation; choosing the task, the model and the sizes from flags, and reporting the
result, is this command's job only.

``python -m pariskv_tools.workloads.capture --out FILE [--model PATH] [options]``
(``--help`` lists them with their defaults). ``--model`` is a Hugging Face directory or a
``.gguf`` file of a Llama, Qwen2 or Mistral-family model (see :mod:`.models`), else
SmolLM2, whose cache root and GGUF come from ``--cache-root`` / ``--smollm2-gguf``, else
from ``$SGLANG_PARISKV_CACHE`` / ``$SGLANG_PARISKV_SMOLLM2_GGUF``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pariskv_tools.cli import HelpFormatter, add_model_args
from pariskv_tools.workloads import capture as capture_module
from pariskv_tools.workloads import filler, task_generators, tasks
from pariskv_tools.workloads.models import resolve_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pariskv_tools.workloads.capture",
        description=capture_module.__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--task", choices=sorted(task_generators.TASKS), default="passkey", help="task generator"
    )
    p.add_argument(
        "--context",
        type=int,
        default=8192,
        help="total prompt tokens, clipped to the model's max_position_embeddings - --n-decode",
    )
    p.add_argument("--n-decode", type=int, default=1024, help="greedy decode steps recorded")
    p.add_argument("--seed", type=int, default=0, help="seed of the task")
    p.add_argument("--filler", choices=filler.FILLERS, default="simple", help="haystack text")
    p.add_argument("--fp16", action="store_true", help="store tensors as float16")
    p.add_argument("--out", type=Path, required=True, help="capture file to write")
    add_model_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    """CLI: build a seeded task prompt, capture it on the model and save the trace."""
    args = build_parser().parse_args(argv)
    source = resolve_model(args.model, args.cache_root, args.smollm2_gguf)
    limit = source.max_positions
    if args.n_decode < 1 or args.n_decode >= limit:
        raise SystemExit(f"--n-decode must be in [1, {limit - 1}] for this model")
    model, tokenizer = source.load()
    if args.context + args.n_decode > limit:
        args.context = limit - args.n_decode
        print(
            f"context clipped to {args.context} to leave room for {args.n_decode} decode tokens "
            f"within {limit} positions",
            file=sys.stderr,
        )
    task = task_generators.make_task(
        args.task, tokenizer, args.context, seed=args.seed, filler=args.filler
    )
    prompt_ids = torch.tensor(tasks.format_chat(tokenizer, task))
    print(
        f"{args.task}: {prompt_ids.numel()} prompt tokens, answer {task.answer!r}", file=sys.stderr
    )
    cap = capture_module.capture(
        model,
        tokenizer,
        prompt_ids,
        args.n_decode,
        store_dtype=torch.float16 if args.fp16 else torch.float32,
    )
    cap.meta.update(
        model=source.describe(),
        task=args.task,
        seed=args.seed,
        answer=task.answer,
        task_meta=task.meta,
        correct=tasks.score(task, cap.text),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cap.save(args.out)
    print(
        f"saved {args.out}: prefill {cap.meta['prefill_s']:.1f}s, "
        f"total {cap.meta['total_s']:.1f}s, "
        f"answer {cap.text[:80]!r} correct={cap.meta['correct']}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
