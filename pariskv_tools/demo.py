"""The main job on an embedded default: a passkey over an ≈8K-token document, on the CPU.

SmolLM2-135M-Instruct (or the model ``--model`` names) answers the same passkey prompt
twice, with dense attention and with ParisKV sparse decoding (``hf_attention``), and the
demo prints both answers, the token budget ParisKV attended and how much of dense attention
it kept per layer group.

    sglang-pariskv-demo [--model PATH] [--context 7800] [--topk 300] [--depth 0.4] [--seed 0]
    python -m pariskv_tools.demo ...    (the same)

``--help`` lists every option with its default. ``--model`` takes a Hugging Face directory
or a ``.gguf`` file of a Llama, Qwen2 or Mistral-family model (see
:mod:`pariskv_tools.workloads.models`); the context is clipped to its positions. SmolLM2's
cache root and GGUF come from ``--cache-root`` / ``--smollm2-gguf``, else from
``$SGLANG_PARISKV_CACHE`` / ``$SGLANG_PARISKV_SMOLLM2_GGUF`` (see
:mod:`pariskv_tools.workloads.smollm2`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pariskv_tools.cli import HelpFormatter, add_model_args, load_calibration_for
from pariskv_tools.hf_attention import ParisKVAttention, install, uninstall
from pariskv_tools.workloads import task_generators, tasks
from pariskv_tools.workloads.models import last_logits_kwargs, resolve_model
from sglang_pariskv.config import ParisKVConfig


@torch.inference_mode()
def greedy(model, prompt_ids: list[int], max_new: int, desc: str) -> tuple[list[int], float]:
    """Greedy decoding with a progress bar; returns (new token ids, seconds)."""
    t0 = time.perf_counter()
    ids = torch.tensor([prompt_ids])
    last_only = last_logits_kwargs(model)  # the prefill's full logits would be unused
    out = model(input_ids=ids, use_cache=True, **last_only)
    past, new = out.past_key_values, []
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for _ in tqdm(range(max_new), desc=desc, file=sys.stderr, leave=False):
        tok = int(out.logits[0, -1].argmax())
        if tok in eos:
            break
        new.append(tok)
        out = model(
            input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True, **last_only
        )
        past = out.past_key_values
    return new, time.perf_counter() - t0


def layer_groups(num_layers: int) -> dict[str, range]:
    """Thirds of the model's depth; a model of fewer than three layers has empty thirds,
    which are left out."""
    third = num_layers // 3
    groups = {
        "early": range(0, third),
        "middle": range(third, 2 * third),
        "late": range(2 * third, num_layers),
    }
    return {name: rng for name, rng in groups.items() if len(rng)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sglang-pariskv-demo",
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    ap.add_argument(
        "--context",
        type=int,
        default=7800,
        help="prompt tokens, clipped to the model's positions - --max-new - 64",
    )
    ap.add_argument("--depth", type=float, default=0.4, help="relative passkey depth")
    ap.add_argument("--seed", type=int, default=0, help="seed of the document and passkey")
    ap.add_argument("--topk", type=int, default=300, help="ParisKV's retrieved tokens per head")
    ap.add_argument("--sink", type=int, default=64, help="leading tokens always attended")
    ap.add_argument("--local", type=int, default=256, help="recent tokens always attended")
    ap.add_argument("--max-new", type=int, default=12, help="tokens generated per answer")
    ap.add_argument(
        "--calibration",
        type=Path,
        help="calibration file of the model (python -m pariskv_tools.eval calibrate): "
        "ParisKV encodes with its key centres and channel scales (default: none)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_model_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ParisKVConfig(topk=args.topk, sink=args.sink, local=args.local, dense_threshold=0)
    source = resolve_model(args.model, args.cache_root, args.smollm2_gguf)
    context = min(args.context, source.max_positions - args.max_new - 64)
    calibration = load_calibration_for(args.calibration, source.config)
    model, tok = source.load()
    task = task_generators.passkey(tok, context, depth=args.depth, seed=args.seed)
    prompt = tasks.format_chat(tok, task)
    print(f"prompt: {len(prompt)} tokens, passkey at depth {args.depth}: {task.answer}")
    if calibration is not None:
        print(f"calibration: {calibration.path}")

    uninstall(model)
    dense_ids, dense_s = greedy(model, prompt, args.max_new, "dense")
    dense_text = tok.decode(dense_ids, skip_special_tokens=True)

    attn = ParisKVAttention(cfg, calibration=calibration)
    install(model, attn)
    sparse_ids, sparse_s = greedy(model, prompt, args.max_new, "pariskv")
    sparse_text = tok.decode(sparse_ids, skip_special_tokens=True)
    uninstall(model)

    m = attn.metrics
    print(
        f"\ndense   answer: {dense_text!r}  correct={tasks.score(task, dense_text)}  "
        f"({dense_s:.1f} s)"
    )
    print(
        f"pariskv answer: {sparse_text!r}  correct={tasks.score(task, sparse_text)}  "
        f"({sparse_s:.1f} s)"
    )
    print(f"same tokens as dense: {dense_ids == sparse_ids}")
    if not m:  # sink + local + top-k covered the whole context at every step
        print(
            f"no sparse step: the context fits in sink {cfg.sink} + local {cfg.local} + top-k "
            f"{cfg.topk}, so every step attended densely; raise --context or lower --topk"
        )
        return 0
    attended = statistics.mean(x.attended for x in m)
    context = statistics.mean(x.context for x in m)
    print(
        f"budget: sink {cfg.sink} + local {cfg.local} + top-k {cfg.topk} = "
        f"{attended:.0f} of {context:.0f} tokens attended per KV head "
        f"({100 * attended / context:.1f}% of the context)"
    )
    print(f"\n{'layers':<16}{'recall@' + str(cfg.topk):>12}{'mass recall':>14}")
    for name, rng in layer_groups(model.config.num_hidden_layers).items():
        sel = [x for x in m if x.layer in rng]
        print(
            f"{name + f' {rng.start}-{rng.stop - 1}':<16}"
            f"{statistics.mean(x.recall_at_k for x in sel):>12.3f}"
            f"{statistics.mean(x.mass_recall for x in sel):>14.3f}"
        )
    print(
        f"{'all':<16}{statistics.mean(x.recall_at_k for x in m):>12.3f}"
        f"{statistics.mean(x.mass_recall for x in m):>14.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
