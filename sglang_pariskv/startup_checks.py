"""The startup checks of a ParisKV config against what surrounds it: SGLang's settings, its
environment switches, the model and host memory.

All of them run before serving starts. :func:`check_server_args` and :func:`check_launch`
run in the launching process, before a model is loaded (the host memory a
``--pariskv-host-pool-gb`` asks for is checked there by ``offload.host_pool``; the
calibration file is read with the flags, :mod:`sglang_pariskv.server_flags`); the
model-dependent :func:`check_model` (MLA, head_dim, sliding window) runs when the scheduler
builds its attention backend. Each refusal names the flag or the model and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sglang_pariskv.config import ParisKVConfig, ParisKVConfigError
from sglang_pariskv.support import check_serving_shape


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
        "with its own ParisKV decode state, and ParisKV is not verified under that split; "
        "drop --enable-pdmux",
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
