"""ParisKV's command-line flags: their definitions, their values checked, and the config
they make.

Each value is checked here, in the launching process, before a model is loaded: a bad value
or a flag given without ``--enable-pariskv`` ends the launch with one message that names the
flag and the fix. The checks of a config against SGLang's other settings, the environment
and the model are in :mod:`sglang_pariskv.startup_checks`.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from sglang_pariskv.config import (
    DEFAULT_HOT_CACHE_LINES,
    DEFAULT_MIN_SPARSE_TOKENS,
    OFFLOAD_MODES,
    RERANK_MODES,
    ParisKVConfig,
    ParisKVConfigError,
)


def _ratio(flag: str, text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise ParisKVConfigError(
            f"{flag}={text!r} is not a number: pass a value in (0, 1] or 'auto'"
        ) from None


def _layer_list(flag: str, text: str) -> tuple[int, ...] | str:
    """``0,1,2`` -> (0, 1, 2); ``auto`` stays "auto" (resolved from the calibration file)."""
    if text == "auto":
        return text
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ParisKVConfigError(
            f"{flag}={text!r} is not a list of layer indices: pass e.g. 0,1,2, or auto"
        ) from None


def _as_is(flag: str, value: Any) -> Any:
    return value


#: (flag, ParisKVConfig field, converter (flag, parsed value) -> field value).
KNOB_FLAGS: tuple[tuple[str, str, Any], ...] = (
    ("--pariskv-topk", "topk", _as_is),
    ("--pariskv-sink", "sink", _as_is),
    ("--pariskv-local", "local", _as_is),
    ("--pariskv-dense-threshold", "dense_threshold", _as_is),
    ("--pariskv-min-sparse-tokens", "min_sparse_tokens", _as_is),
    ("--pariskv-candidate-ratio", "candidate_ratio", _ratio),
    ("--pariskv-offload", "offload", _as_is),
    ("--pariskv-rerank", "rerank", _as_is),
    ("--pariskv-host-pool-gb", "host_pool_gb", _as_is),
    ("--pariskv-hot-cache-lines", "hot_cache_lines", _as_is),
    ("--pariskv-stats-dir", "stats_dir", _as_is),
    ("--pariskv-calibration", "calibration", _as_is),
    ("--pariskv-dense-layers", "dense_layers", _layer_list),
)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the ParisKV flag group to SGLang's server argument parser."""
    if any(a.dest == "enable_pariskv" for a in parser._actions):
        return  # already added (hooks may run twice in one process)
    defaults = ParisKVConfig()
    g = parser.add_argument_group("ParisKV sparse decoding (sglang-pariskv)")
    g.add_argument(
        "--enable-pariskv",
        action="store_true",
        help="Decode long requests with ParisKV retrieval: attend sink + local window + "
        "retrieved top-k tokens instead of the whole context.",
    )
    g.add_argument(
        "--pariskv-topk",
        type=int,
        default=None,
        help=f"Retrieved tokens per KV head per decode step (default {defaults.topk}).",
    )
    g.add_argument(
        "--pariskv-sink",
        type=int,
        default=None,
        help=f"First tokens always attended (default {defaults.sink}).",
    )
    g.add_argument(
        "--pariskv-local",
        type=int,
        default=None,
        help=f"Last tokens always attended (default {defaults.local}).",
    )
    g.add_argument(
        "--pariskv-dense-threshold",
        type=int,
        default=None,
        help="Requests of at most this many tokens decode densely "
        f"(default {defaults.dense_threshold}).",
    )
    g.add_argument(
        "--pariskv-min-sparse-tokens",
        type=int,
        default=None,
        help="A decode step retrieves only if its requests above the dense threshold hold "
        "at least this many tokens together; otherwise the whole step decodes densely, "
        "which is faster below it (default "
        f"{DEFAULT_MIN_SPARSE_TOKENS}; 0 with --pariskv-offload host; 0: every request "
        "above the threshold retrieves).",
    )
    g.add_argument(
        "--pariskv-candidate-ratio",
        type=str,
        default=None,
        help="Fraction of the retrieval zone kept as rerank candidates, or 'auto' "
        "(length-adaptive, the default).",
    )
    g.add_argument(
        "--pariskv-offload",
        choices=OFFLOAD_MODES,
        default=None,
        help="'host': keep every token's K/V in pinned host memory and fetch the retrieved "
        "rows over UVA (the GPU keeps codes and a hot cache), for contexts whose KV does "
        "not fit on the GPU (default none).",
    )
    g.add_argument(
        "--pariskv-rerank",
        choices=RERANK_MODES,
        default=None,
        help="How the collision stage's candidates are ranked: 'code' (the 3-bit estimate, "
        "the default; host offload needs it) or 'keys' (the exact group-mean q.k of the "
        "keys in the KV pool: reads 3.2x the bytes per candidate, and the GPU stores 16 "
        "instead of 96 bytes of codes per token and KV head at head_dim 128).",
    )
    g.add_argument(
        "--pariskv-host-pool-gb",
        type=float,
        default=None,
        help="GiB of pinned host memory for the K/V pool with --pariskv-offload host "
        "(per GPU); it caps the tokens the server holds.",
    )
    g.add_argument(
        "--pariskv-hot-cache-lines",
        type=int,
        default=None,
        help="GPU hot-cache lines per layer with --pariskv-offload host: rows retrieved in "
        f"recent steps are not fetched again (default {DEFAULT_HOT_CACHE_LINES}; 0: none, "
        "attention reads the retrieved host rows directly).",
    )
    g.add_argument(
        "--pariskv-stats-dir",
        type=str,
        default=None,
        help="Folder where each scheduler process rewrites its ParisKV counters as JSON "
        "after every batch, for scripts without a Prometheus scraper (default: none; "
        "--enable-metrics exports the same counters to Prometheus).",
    )
    g.add_argument(
        "--pariskv-calibration",
        type=str,
        default=None,
        help="Calibration file of this model (`python -m pariskv_tools.eval calibrate`): "
        "keys are encoded relative to its fixed per-layer, per-KV-head centres and channel "
        "scales, which keeps retrieval accurate when a model's keys share a large common "
        "direction or carry outlier channels (default: none, keys encoded as they are).",
    )
    g.add_argument(
        "--pariskv-dense-layers",
        type=str,
        default=None,
        help="Layers that attend densely over the whole context at every decode step: a "
        "comma list such as 0,1,2, or 'auto' for the calibration file's recommendation "
        "(needs --pariskv-calibration). Each dense layer reads its full KV (default: none).",
    )
    g.add_argument(
        "--pariskv-config",
        type=str,
        default=None,
        help="JSON file with any of the knobs above (keys: "
        + ", ".join(f.name for f in dataclasses.fields(ParisKVConfig))
        + "); flags given on the command line override it.",
    )


def config_from_args(args: Any) -> ParisKVConfig | None:
    """The ParisKV config the flags ask for, or None when ``--enable-pariskv`` is absent.

    ``args`` is the parsed namespace (or anything with the same attributes).
    """
    given = [flag for flag, field, _ in KNOB_FLAGS if getattr(args, _dest(flag), None) is not None]
    if getattr(args, "pariskv_config", None) is not None:
        given.append("--pariskv-config")
    if not getattr(args, "enable_pariskv", False):
        if given:
            raise ParisKVConfigError(
                f"{', '.join(given)} given without --enable-pariskv: add --enable-pariskv "
                "to use ParisKV, or drop the ParisKV flags"
            )
        return None
    base: dict[str, Any] = {}
    if args.pariskv_config is not None:
        try:
            base = ParisKVConfig.read_json(args.pariskv_config)
        except ValueError as e:
            raise ParisKVConfigError(f"--pariskv-config {args.pariskv_config}: {e}") from e
    for flag, field, kind in KNOB_FLAGS:
        value = getattr(args, _dest(flag), None)
        if value is None:
            continue
        base[field] = kind(flag, value)
    try:
        cfg = ParisKVConfig.from_dict(base)
    except ValueError as e:
        where = f" (with --pariskv-config {args.pariskv_config})" if args.pariskv_config else ""
        raise ParisKVConfigError(f"{e}{where}") from e
    check_calibration_file(cfg)
    return cfg


def check_calibration_file(cfg: ParisKVConfig) -> None:
    """Read the calibration file now, before any model work: a missing or malformed file,
    or dense layers beyond the layers it was written for, end the launch here. Its shape
    is checked against the model when the KV pool is built."""
    if cfg.calibration is None:
        return
    from sglang_pariskv.calibration import load_calibration

    cfg.dense_layer_set(load_calibration(cfg.calibration).num_layers)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
