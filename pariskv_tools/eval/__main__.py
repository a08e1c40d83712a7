"""CLI: ``python -m pariskv_tools.eval retrieval|calibrate|stress|reuse [options]`` (``--help``
lists them with their defaults).

The model is ``--model PATH`` (a Hugging Face directory or a ``.gguf`` file of a Llama,
Qwen2 or Mistral-family causal LM, see :mod:`pariskv_tools.workloads.models`), else
SmolLM2-135M-Instruct. Layers, heads and head_dim come from its config; the default
contexts (2K / 4K / 8K) are scaled to and capped by its ``max_position_embeddings``.
SmolLM2's cache root and GGUF come from ``--cache-root`` / ``--smollm2-gguf``, else from
``$SGLANG_PARISKV_CACHE`` / ``$SGLANG_PARISKV_SMOLLM2_GGUF`` (see
:mod:`pariskv_tools.workloads.smollm2`); ``--cache-root`` also holds captures and GGUF
conversions.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from pariskv_tools.cli import HelpFormatter, add_model_args, load_calibration_for, parse_layers
from pariskv_tools.eval.calibrate import CalibrateSettings, run_calibrate
from pariskv_tools.eval.captures import (
    ContextSpec,
    default_cache_dir,
    default_contexts,
    parse_contexts,
)
from pariskv_tools.eval.methods import ParisKV, default_methods
from pariskv_tools.eval.retrieval import RetrievalSettings, run_retrieval
from pariskv_tools.workloads.models import resolve_model
from sglang_pariskv.config import ParisKVConfig


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _variant(spec: str) -> ParisKV:
    """NAME:key=value;key=value -> an extra ParisKV variant (full pipeline only).

    Keys: candidate_ratio, gqa (mean|max), rotate (0|1), rerank (code|keys)."""
    name, _, rest = spec.partition(":")
    cfg: dict = {}
    kw: dict = {}
    for item in filter(None, rest.split(";")):
        k, _, v = item.partition("=")
        if k == "candidate_ratio":
            cfg[k] = float(v)
        elif k == "gqa":
            kw["gqa"] = v
        elif k == "rotate":
            kw["rotate"] = v == "1"
        elif k == "rerank":
            kw["rerank"] = v
        else:
            raise SystemExit(f"unknown variant key {k!r} in {spec!r}")
    return ParisKV(ParisKVConfig(**cfg), name=name, outputs=("full",), **kw)


def build_parser(prog: str = "python -m pariskv_tools.eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser(
        "retrieval",
        help="retrieval quality vs peers at equal budget",
        formatter_class=HelpFormatter,
    )
    r.add_argument("--device", default="cpu", help="torch device the methods run on")
    r.add_argument(
        "--contexts",
        help="comma list of prompt lengths LEN[:TASK] (e.g. 2k,4k,8k or 300:passkey), each "
        "capped at the model's max_position_embeddings - --n-decode - 64 (default: 2k,4k,8k "
        "with tasks passkey, multikey, variable_tracking, scaled down for a model with fewer "
        "than 8192 positions)",
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
    r.add_argument("--layers", default="all", help="layers to score: all | ::STRIDE | 0,5,29")
    r.add_argument("--chunk", type=int, default=32, help="decode steps ranked per batch")
    r.add_argument("--seed", type=int, default=0, help="seed of the tasks and the methods")
    r.add_argument("--methods", help="comma list of methods to keep (default: all)")
    r.add_argument(
        "--variant",
        action="append",
        default=[],
        help="extra ParisKV variant NAME:key=v;key=v (repeatable; keys: candidate_ratio, "
        "gqa mean|max, rotate 0|1, rerank code|keys)",
    )
    r.add_argument(
        "--cache-dir",
        type=Path,
        help="captured traces (default: captures under --cache-root)",
    )
    add_model_args(r)
    r.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/retrieval_quality.json"),
        help="results JSON; plots are written next to it",
    )
    r.add_argument("--no-plots", action="store_true", help="write the JSON only")
    r.add_argument(
        "--calibration",
        type=Path,
        help="also report pariskv_calibrated: ParisKV with this calibration file's key centres "
        "and channel scales",
    )
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
    _add_calibrate_parser(sub)
    from pariskv_tools.eval.stress import add_stress_parser

    add_stress_parser(sub)
    from pariskv_tools.eval.reuse_cli import add_reuse_parser

    add_reuse_parser(sub)
    return p


def _add_calibrate_parser(sub) -> None:
    c = sub.add_parser(
        "calibrate",
        help="write the calibration file a server reads with --pariskv-calibration",
        formatter_class=HelpFormatter,
    )
    defaults = CalibrateSettings()
    c.add_argument("--out", type=Path, required=True, help="calibration JSON to write")
    c.add_argument(
        "--context",
        type=int,
        default=defaults.context.tokens,
        help="prompt tokens of the calibration text (capped by the model's positions)",
    )
    c.add_argument(
        "--n-decode",
        type=int,
        default=defaults.n_decode,
        help="generated tokens: the key centres and channel scales come from their keys "
        "(and the decode queries)",
    )
    c.add_argument("--seed", type=int, default=defaults.seed, help="seed of the prompt")
    c.add_argument(
        "--fraction",
        type=float,
        default=defaults.fraction,
        help="budget at which each layer's attention-mass recall is measured",
    )
    c.add_argument(
        "--dense-below",
        type=float,
        default=defaults.dense_below,
        help="recommend layers whose mass recall is below this for --pariskv-dense-layers auto",
    )
    c.add_argument(
        "--max-dense",
        type=int,
        help="at most this many recommended dense layers, weakest first (default: an "
        "eighth of the layers, at least one)",
    )
    c.add_argument(
        "--device",
        default=defaults.capture_device,
        help="torch device the model generates the calibration text on (e.g. cuda: "
        "bfloat16, as served; the statistics are computed on the CPU in float64)",
    )
    c.add_argument("--cache-dir", type=Path, help="captured traces (default: under --cache-root)")
    c.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    add_model_args(c)


def _calibrate(args, argv: list[str]) -> None:
    model = resolve_model(args.model, args.cache_root, args.smollm2_gguf)
    spec = ContextSpec("calib", CalibrateSettings().context.task, args.context)
    if spec.prompt_tokens(args.n_decode, model.max_positions) < 64:
        raise SystemExit(
            f"--context {args.context} with --n-decode {args.n_decode} leaves no room for a "
            f"prompt in the model's {model.max_positions} positions"
        )
    try:
        device = torch.device(args.device)
    except RuntimeError:
        msg = f"--device {args.device}: not a torch device (cpu, cuda, cuda:1)"
        raise SystemExit(msg) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is visible; use --device cpu")
    settings = CalibrateSettings(
        context=spec,
        n_decode=args.n_decode,
        seed=args.seed,
        fraction=args.fraction,
        dense_below=args.dense_below,
        max_dense=args.max_dense,
        capture_device=args.device,
    )
    run_calibrate(
        model,
        args.out,
        args.cache_dir or default_cache_dir(args.cache_root),
        settings,
        "python -m pariskv_tools.eval " + shlex.join(argv),
    )


def main(argv: list[str] | None = None, prog: str = "python -m pariskv_tools.eval") -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(prog).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cmd == "calibrate":
        return _calibrate(args, argv)
    if args.cmd == "stress":
        from pariskv_tools.eval.stress import run_stress_cli

        return run_stress_cli(args, argv)
    if args.cmd == "reuse":
        from pariskv_tools.eval.reuse_cli import run_reuse_cli

        return run_reuse_cli(args, argv)

    torch.manual_seed(args.seed)
    contexts = parse_contexts(args.contexts) if args.contexts else None
    # Only the config is read here: layers and contexts are checked before any capture.
    model = resolve_model(args.model, args.cache_root, args.smollm2_gguf)
    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    contexts = contexts or default_contexts(model.max_positions)
    for spec in contexts:
        if spec.prompt_tokens(args.n_decode, model.max_positions) < 64:
            raise SystemExit(
                f"--n-decode {args.n_decode} leaves no room for a prompt in the model's "
                f"{model.max_positions} positions"
            )
    methods = default_methods(args.seed)
    if args.methods:
        keep = set(args.methods.split(","))
        methods = [m for m in methods if keep & set(m.names)]
    methods += [_variant(v) for v in args.variant]
    if args.calibration is not None:
        cal = load_calibration_for(args.calibration, model.config)
        methods.append(
            ParisKV(
                name="pariskv_calibrated", outputs=("full",), centres=cal.centres, scales=cal.scales
            )
        )
    settings = RetrievalSettings(
        fraction=args.fraction,
        sweep=args.sweep,
        sweep_stride=args.sweep_stride,
        layers=layers,
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
        model=model,
    )


if __name__ == "__main__":
    main()
