"""``python -m pariskv_tools.eval reuse``: the command line of :mod:`pariskv_tools.eval.reuse`."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import torch

from pariskv_tools.cli import HelpFormatter, add_model_args
from pariskv_tools.eval.captures import (
    default_cache_dir,
    default_contexts,
    load_or_capture,
    parse_contexts,
)
from pariskv_tools.eval.reuse import ReuseRunSettings, run_reuse

_DEFAULTS = ReuseRunSettings()


def _list(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma list") from None

    return parse


def add_reuse_parser(sub) -> None:
    p = sub.add_parser(
        "reuse",
        help="retrieval reuse (LouisKV-style) against retrieving at every step",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--contexts", help="comma list LEN[:TASK] (default: 2k,4k,8k)")
    p.add_argument("--n-decode", type=int, default=1024, help="decode steps per context")
    p.add_argument("--fraction", type=float, default=0.10, help="attended budget fraction")
    p.add_argument(
        "--thresholds",
        type=_list(float),
        default=",".join(map(str, _DEFAULTS.thresholds)),
        help="cosine thresholds to try",
    )
    p.add_argument(
        "--max-ages",
        type=_list(int),
        default=",".join(map(str, _DEFAULTS.max_ages)),
        help="most steps one retrieval serves",
    )
    p.add_argument(
        "--keeps",
        type=_list(int),
        default=",".join(map(str, _DEFAULTS.keeps)),
        help="kept-set multiples m (--pariskv-reuse-keep): a retrieval keeps its m*k best, a "
        "reusing step attends the k of them its own estimates rank first (1: the kept top-k "
        "as retrieved)",
    )
    p.add_argument("--layers", help="comma list of layers (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tasks")
    p.add_argument("--cache-dir", type=Path, help="captured traces")
    add_model_args(p)
    p.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/retrieval_reuse.json"), help="JSON"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")


def main_reuse(args: argparse.Namespace, argv: list[str]) -> None:
    from pariskv_tools.workloads.models import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = resolve_model(args.model, args.cache_root, args.smollm2_gguf)
    contexts = parse_contexts(args.contexts) if args.contexts else None
    contexts = contexts or default_contexts(model.max_positions)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    settings = ReuseRunSettings(
        thresholds=args.thresholds,
        max_ages=args.max_ages,
        keeps=args.keeps,
        fraction=args.fraction,
        layers=layers,
        n_decode=args.n_decode,
        seed=args.seed,
        contexts=contexts,
    )
    cache = args.cache_dir or default_cache_dir(args.cache_root)
    caps = {c.label: load_or_capture(c, args.n_decode, args.seed, cache, model) for c in contexts}
    run_reuse(settings, caps, args.out, "python -m pariskv_tools.eval " + shlex.join(argv))
