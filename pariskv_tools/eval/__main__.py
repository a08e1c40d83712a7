"""CLI: ``python -m pariskv_tools.eval retrieval [options]``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from sglang_pariskv.config import ParisKVConfig
from pariskv_tools.eval.captures import DEFAULT_CONTEXTS, default_cache_dir
from pariskv_tools.eval.methods import ParisKV, default_methods
from pariskv_tools.eval.retrieval import RetrievalSettings, run_retrieval


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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m pariskv_tools.eval")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("retrieval", help="retrieval quality vs peers at equal budget")
    r.add_argument("--device", default="cpu")
    r.add_argument("--contexts", default=",".join(c.label for c in DEFAULT_CONTEXTS))
    r.add_argument("--n-decode", type=int, default=1024)
    r.add_argument("--fraction", type=float, default=0.10)
    r.add_argument("--sweep", type=_floats, default=RetrievalSettings.sweep)
    r.add_argument("--sweep-stride", type=int, default=16)
    r.add_argument("--layers", type=_layers, default=None, help="all | ::STRIDE | 0,5,29")
    r.add_argument("--chunk", type=int, default=32)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--methods", default="", help="comma list to keep (default: all)")
    r.add_argument("--variant", action="append", default=[], help="NAME:key=v;key=v")
    r.add_argument("--cache-dir", type=Path, default=None)
    r.add_argument("--out", type=Path, default=Path("benchmarks/results/retrieval_quality.json"))
    r.add_argument("--no-plots", action="store_true")
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
        help="torch CPU threads (default 1: on a shared CPU, OpenMP threads waiting on a "
        "descheduled peer made every op several times slower; 0 keeps torch's default)",
    )
    args = p.parse_args(argv)
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
        args.cache_dir or default_cache_dir(),
        args.out,
        command,
        plots=not args.no_plots,
    )


if __name__ == "__main__":
    main()
