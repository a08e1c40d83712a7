"""CLI: ``python -m pariskv_tools.eval retrieval [options]`` (``--help`` lists them with
their defaults).

SmolLM2's cache root and GGUF come from ``--cache-root`` / ``--smollm2-gguf``, else from
``$SGLANG_PARISKV_CACHE`` / ``$SGLANG_PARISKV_SMOLLM2_GGUF`` (see
:mod:`pariskv_tools.workloads.smollm2`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from pariskv_tools.cli import HelpFormatter, add_smollm2_args
from pariskv_tools.eval.captures import DEFAULT_CONTEXTS, default_cache_dir
from pariskv_tools.eval.methods import ParisKV, default_methods
from pariskv_tools.eval.retrieval import RetrievalSettings, run_retrieval
from sglang_pariskv.config import ParisKVConfig


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _layers(text: str) -> list[int] | None:
    """'all', a stride '::3', or a list '0,5,29'."""
    if text == "all":
        return None
    if text.startswith("::"):
        return list(range(0, 30, int(text[2:])))
    return [int(x) for x in text.split(",")]


def _variant(spec: str) -> ParisKV:
    """NAME:key=value;key=value -> an extra ParisKV variant (full pipeline only).

    Keys: candidate_ratio, collision_ratio, tier_ratios (a/b/c), gqa (mean|max), rotate (0|1)."""
    name, _, rest = spec.partition(":")
    cfg: dict = {}
    kw: dict = {}
    for item in filter(None, rest.split(";")):
        k, _, v = item.partition("=")
        if k in ("candidate_ratio", "collision_ratio"):
            cfg[k] = float(v)
        elif k == "tier_ratios":
            cfg[k] = tuple(float(x) for x in v.split("/"))
        elif k == "gqa":
            kw["gqa"] = v
        elif k == "rotate":
            kw["rotate"] = v == "1"
        else:
            raise SystemExit(f"unknown variant key {k!r} in {spec!r}")
    return ParisKV(ParisKVConfig(**cfg), name=name, outputs=("full",), **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pariskv_tools.eval", formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser(
        "retrieval",
        help="retrieval quality vs peers at equal budget",
        formatter_class=HelpFormatter,
    )
    r.add_argument("--device", default="cpu", help="torch device the methods run on")
    r.add_argument(
        "--contexts",
        default=",".join(c.label for c in DEFAULT_CONTEXTS),
        help="comma list of context labels to evaluate",
    )
    r.add_argument(
        "--n-decode", type=int, default=1024, help="decode steps captured and scored per context"
    )
    r.add_argument(
        "--fraction",
        type=float,
        default=0.10,
        help="headline budget: attended tokens as a fraction of the prompt",
    )
    r.add_argument(
        "--sweep",
        type=_floats,
        default=",".join(str(f) for f in RetrievalSettings.sweep),
        help="comma list of budget fractions for the budget sweep",
    )
    r.add_argument(
        "--sweep-stride",
        type=int,
        default=16,
        help="score every N-th decode step in the budget sweep",
    )
    r.add_argument(
        "--layers", type=_layers, default="all", help="layers to score: all | ::STRIDE | 0,5,29"
    )
    r.add_argument("--chunk", type=int, default=32, help="decode steps ranked per batch")
    r.add_argument("--seed", type=int, default=0, help="seed of the tasks and the methods")
    r.add_argument("--methods", help="comma list of methods to keep (default: all)")
    r.add_argument(
        "--variant",
        action="append",
        default=[],
        help="extra ParisKV variant NAME:key=v;key=v (repeatable; keys: candidate_ratio, "
        "collision_ratio, tier_ratios a/b/c, gqa mean|max, rotate 0|1)",
    )
    r.add_argument(
        "--cache-dir",
        type=Path,
        help="captured traces (default: captures under --cache-root)",
    )
    add_smollm2_args(r)
    r.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/retrieval_quality.json"),
        help="results JSON; plots are written next to it",
    )
    r.add_argument("--no-plots", action="store_true", help="write the JSON only")
    r.add_argument(
        "--dense-first",
        type=int,
        default=0,
        help="also report pariskv with the first N layers dense (derived, higher budget)",
    )
    r.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (on a shared CPU, OpenMP threads waiting on a descheduled "
        "peer make every op several times slower; 0 keeps torch's default)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    labels = args.contexts.split(",")
    contexts = tuple(c for c in DEFAULT_CONTEXTS if c.label in labels)
    methods = default_methods(args.seed)
    if args.methods:
        keep = set(args.methods.split(","))
        methods = [m for m in methods if keep & set(m.names)]
    methods += [_variant(v) for v in args.variant]
    settings = RetrievalSettings(
        fraction=args.fraction,
        sweep=args.sweep,
        sweep_stride=args.sweep_stride,
        layers=args.layers,
        n_decode=args.n_decode,
        chunk=args.chunk,
        seed=args.seed,
        device=args.device,
        contexts=contexts,
        dense_first=args.dense_first,
    )
    command = "python -m pariskv_tools.eval " + shlex.join(argv)
    run_retrieval(
        settings,
        methods,
        args.cache_dir or default_cache_dir(args.cache_root),
        args.out,
        command,
        plots=not args.no_plots,
        model_cache=args.cache_root,
        gguf=args.smollm2_gguf,
    )


if __name__ == "__main__":
    main()
