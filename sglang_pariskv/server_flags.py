"""ParisKV's command-line flags and the startup checks that go with them.

The flags' values are checked here, in the launching process, before a model is loaded:
a bad value, a flag given without ``--enable-pariskv``, or a combination with a SGLang
feature that ParisKV does not support. Each error names the flag and the fix. (The host
memory a ``--pariskv-host-pool-gb`` asks for is checked by ``offload.host_pool``, also
before the model loads.)
Model-dependent checks (MLA, head_dim, sliding window) run in :func:`check_model`, when the
scheduler builds its attention backend, which is still before serving starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sglang_pariskv.config import (
    DEFAULT_HOT_CACHE_LINES,
    DEFAULT_MIN_SPARSE_TOKENS,
    DEFAULT_REUSE_MAX_AGE,
    OFFLOAD_MODES,
    ParisKVConfig,
    ParisKVConfigError,
)
from sglang_pariskv.support import check_serving_shape


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
    ("--pariskv-host-pool-gb", "host_pool_gb", _as_is),
    ("--pariskv-hot-cache-lines", "hot_cache_lines", _as_is),
    ("--pariskv-stats-dir", "stats_dir", _as_is),
    ("--pariskv-calibration", "calibration", _as_is),
    ("--pariskv-dense-layers", "dense_layers", _layer_list),
    ("--pariskv-reuse-threshold", "reuse_threshold", _as_is),
    ("--pariskv-reuse-max-age", "reuse_max_age", _as_is),
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
        "--pariskv-reuse-threshold",
        type=float,
        default=None,
        help="Retrieval reuse: a decode layer retrieves again only when the cosine between "
        "its retrieval query and the one of its kept top-k falls below this, in [0, 1]; "
        f"otherwise it attends over the kept top-k (default {defaults.reuse_threshold}; "
        "0: retrieve at every step).",
    )
    g.add_argument(
        "--pariskv-reuse-max-age",
        type=int,
        default=None,
        help="With retrieval reuse: most decode steps one kept top-k serves before the "
        f"layer retrieves again (default {DEFAULT_REUSE_MAX_AGE}).",
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
    max_age = base.get("reuse_max_age")  # given by the flag or the config file
    if max_age is not None and not cfg.reuses:
        where = (
            ""
            if getattr(args, "pariskv_reuse_max_age", None) is not None
            else (f" (in --pariskv-config {args.pariskv_config})")
        )
        raise ParisKVConfigError(
            f"--pariskv-reuse-max-age {max_age}{where} applies only to retrieval "
            "reuse, which --pariskv-reuse-threshold 0 turns off: set a threshold > 0, or "
            "drop --pariskv-reuse-max-age"
        )
    return cfg


def check_launch(cfg: ParisKVConfig, server_args: Any) -> None:
    """The checks of a config against what surrounds the launch, before any model work:
    SGLang's environment switches, the dense layers against a local model, and the host
    memory every rank's pool will pin. One function for the command line, the Engine API
    and an SGLang with ParisKV built in."""
    check_environment(cfg)
    check_dense_layers_fit(cfg, getattr(server_args, "model_path", None))
    from sglang_pariskv.offload.host_pool import check_host_pools

    check_host_pools(cfg, server_args)


def check_dense_layers_fit(cfg: ParisKVConfig, model_path: str | None) -> None:
    """``--pariskv-dense-layers`` against the layers of a model in a local folder, at
    launch, before the weights load. (A hub name is resolved by SGLang later; the
    scheduler checks the same list when it sizes the KV pool.)"""
    if not cfg.dense_layers or not model_path:
        return
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return
    try:
        hf = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return  # SGLang reports an unreadable model config itself
    layers = hf.get("num_hidden_layers", (hf.get("text_config") or {}).get("num_hidden_layers"))
    if isinstance(layers, int):
        cfg.dense_layer_set(layers)


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


def check_server_args(server_args: Any) -> None:
    """Refuse SGLang settings that ParisKV cannot serve correctly, naming the fix.

    ``server_args``: parsed flags, a ``ServerArgs``, or ``sglang_compat.resolved(...)``
    of one (a resolved record's own fields are the operator's input from SGLang 0.5.19)."""
    problems: list[str] = []

    def refuse(cond: bool, msg: str) -> None:
        if cond:
            problems.append(msg)

    for name in ("attention_backend", "decode_attention_backend", "prefill_attention_backend"):
        value = getattr(server_args, name, None)
        refuse(
            value not in (None, "flashinfer"),
            f"--{name.replace('_', '-')} {value}: ParisKV runs on the FlashInfer backend; "
            f"drop the flag or pass --{name.replace('_', '-')} flashinfer",
        )
    refuse(
        getattr(server_args, "speculative_algorithm", None) is not None,
        "--speculative-algorithm: speculative decoding is not supported with ParisKV; "
        "drop it or drop --enable-pariskv",
    )
    refuse(
        bool(getattr(server_args, "enable_hierarchical_cache", False)),
        "--enable-hierarchical-cache: HiCache load-back does not write ParisKV codes yet; "
        "drop it (ParisKV has its own host offload) or drop --enable-pariskv",
    )
    refuse(
        (getattr(server_args, "page_size", None) or 1) != 1,
        f"--page-size {getattr(server_args, 'page_size', None)}: ParisKV retrieves single "
        "tokens and needs --page-size 1 (the FlashInfer default)",
    )
    kv_dtype = getattr(server_args, "kv_cache_dtype", "auto") or "auto"
    refuse(
        kv_dtype not in ("auto", "bfloat16", "bf16", "float16", "fp16"),
        f"--kv-cache-dtype {kv_dtype}: ParisKV supports bf16/fp16 KV caches; "
        "pass --kv-cache-dtype auto",
    )
    refuse(
        bool(getattr(server_args, "enable_dp_attention", False))
        or (getattr(server_args, "attn_dp_size", 1) or 1) > 1,
        "--enable-dp-attention / --attn-dp-size > 1: DP attention is not supported with "
        "ParisKV; drop it",
    )
    refuse(
        (getattr(server_args, "pp_size", 1) or 1) > 1,
        "--pp-size > 1 is not supported with ParisKV; use --pp-size 1",
    )
    refuse(
        (getattr(server_args, "dcp_size", 1) or 1) > 1,
        "--dcp-size > 1 is not supported with ParisKV; use --dcp-size 1",
    )
    refuse(
        bool(getattr(server_args, "enable_pdmux", False)),
        "--enable-pdmux: PD multiplexing builds one attention backend per SM group, each "
        "with its own ParisKV decode state (retrieval reuse's kept selections), so decode "
        "would not see the extends prefill planned; drop --enable-pdmux",
    )
    refuse(
        bool(getattr(server_args, "enable_two_batch_overlap", False)),
        "--enable-two-batch-overlap: its micro-batches run on separate attention backends "
        "with separate ParisKV decode state; drop --enable-two-batch-overlap",
    )
    refuse(
        bool(getattr(server_args, "enable_torch_compile", False)),
        "--enable-torch-compile: ParisKV's decode path (its CUDA kernels and FlashInfer "
        "plans) has not been run under torch.compile; drop --enable-torch-compile (CUDA "
        "graphs stay on)",
    )
    refuse(
        bool(
            getattr(server_args, "enable_lora", False) or getattr(server_args, "lora_paths", None)
        ),
        "--enable-lora / --lora-paths: LoRA adapters add decode CUDA graph variants that "
        "ParisKV's per-graph FlashInfer plans do not track; serve LoRA without "
        "--enable-pariskv",
    )
    refuse(
        bool(getattr(server_args, "enable_deterministic_inference", False)),
        "--enable-deterministic-inference: ParisKV's top-k compaction breaks ties between "
        "equal scores in launch order, so repeated runs may attend different tokens; drop "
        "--enable-deterministic-inference or drop --enable-pariskv",
    )
    refuse(
        bool(getattr(server_args, "enable_mixed_chunk", False)),
        "--enable-mixed-chunk: a mixed batch is planned as an extend, which would decode "
        "every running long request densely at each such step; drop --enable-mixed-chunk",
    )
    refuse(
        _prefill_graph_backend(server_args) == "full",
        "--cuda-graph-backend-prefill full (or cuda_graph_config prefill backend full): a "
        "whole-forward prefill graph would capture ParisKV's extend (its code writes), "
        "which runs eagerly and has not been validated inside one; use the default prefill "
        "graph backend or --cuda-graph-backend-prefill breakable",
    )
    mode = getattr(server_args, "disaggregation_mode", "null") or "null"
    refuse(
        mode != "null",
        f"--disaggregation-mode {mode}: PD disaggregation moves KV between servers without "
        "the ParisKV codes; serve PD-disaggregated without --enable-pariskv",
    )
    # --tp-size N is supported: each rank's pool, codes and retrieval cover its own
    # KV heads (retrieval is per KV head, so no collective is needed).
    for flag in ("enable_hisparse", "enable_double_sparsity"):
        refuse(
            bool(getattr(server_args, flag, False)),
            f"--{flag.replace('_', '-')}: another sparse-attention method cannot be combined "
            "with ParisKV; drop one of them",
        )
    if problems:
        raise ParisKVConfigError(
            "--enable-pariskv cannot be served with these settings: " + "; ".join(problems)
        )


#: Values SGLang reads as true in its boolean environment variables.
_TRUE = ("1", "true", "yes", "y", "on")


def check_environment(cfg: ParisKVConfig, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse SGLang environment switches ParisKV cannot serve, in the launcher (the
    scheduler processes inherit the environment), before any model work."""
    problems = []
    if environ.get("SGLANG_ENABLE_POST_CAPTURE_KV_SIZING", "").strip().lower() in _TRUE:
        problems.append(
            "SGLANG_ENABLE_POST_CAPTURE_KV_SIZING resizes the KV pool after CUDA-graph "
            "capture, which the ParisKV code pool does not follow: unset it"
        )
    if cfg.offloaded and environ.get("SGLANG_USE_HND_KVCACHE", "").strip().lower() in _TRUE:
        problems.append(
            "SGLANG_USE_HND_KVCACHE: --pariskv-offload host keeps SGLang's default NHD KV "
            "layout in host memory: unset it"
        )
    if problems:
        raise ParisKVConfigError(
            "--enable-pariskv cannot be served with this environment: " + "; ".join(problems)
        )


def _prefill_graph_backend(server_args: Any) -> str | None:
    """The prefill CUDA-graph backend asked for: the per-phase flag, else the
    ``--cuda-graph-config`` prefill entry (parsed or resolved), where this SGLang has them."""
    backend = getattr(server_args, "cuda_graph_backend_prefill", None)
    config = getattr(server_args, "cuda_graph_config", None)
    if backend is None and config is not None:  # a parsed JSON dict, or a resolved record
        prefill = (
            config.get("prefill") if isinstance(config, dict) else getattr(config, "prefill", None)
        )
        backend = (
            prefill.get("backend")
            if isinstance(prefill, dict)
            else getattr(prefill, "backend", None)
        )
    return None if backend is None else str(backend)


def check_model(
    *,
    use_mla: bool,
    head_dim: int,
    v_head_dim: int,
    sliding_window: bool,
    model_name: str,
    num_q_heads: int,
    num_kv_heads: int,
) -> None:
    """Refuse model architectures ParisKV does not support (called by the scheduler)."""
    if use_mla:
        raise ParisKVConfigError(
            f"{model_name} uses MLA (DeepSeek-style latent attention), which ParisKV does not "
            "support: serve it without --enable-pariskv"
        )
    if sliding_window:
        raise ParisKVConfigError(
            f"{model_name} uses sliding-window attention layers, which ParisKV does not "
            "support: serve it without --enable-pariskv"
        )
    if head_dim != v_head_dim:
        raise ParisKVConfigError(
            f"{model_name} has head_dim {head_dim} != v_head_dim {v_head_dim}; ParisKV needs "
            "equal key and value head dims: serve it without --enable-pariskv"
        )
    check_serving_shape(head_dim, num_q_heads, num_kv_heads, model_name)
