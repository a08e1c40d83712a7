"""The entry points of an SGLang with ParisKV built in (``patches/``).

A patched SGLang declares the ParisKV flags as ``ServerArgs`` fields, so the config
travels with the server arguments instead of the environment, and it calls these
functions at the points the plugin hooks: its resolution steps, the KV pool's class and
cell size, the pool sizing, and the FlashInfer entry of the attention registry. Every
function takes SGLang's own objects; what it builds comes from ``serving.py`` and
``pool_sizing.py``, as in the plugin.
"""

from __future__ import annotations

from typing import Any

from sglang_pariskv.config import ParisKVConfig, ParisKVConfigError
from sglang_pariskv.pool_sizing import (
    DEFAULT_MAX_RUNNING_REQUESTS,
    add_code_bytes,
    cap_to_host_pool,
    reserve_planned_memory,
)
from sglang_pariskv.server_flags import config_from_args
from sglang_pariskv.sglang_compat import resolved
from sglang_pariskv.startup_checks import check_launch, check_server_args


def config_of(server_args: Any) -> ParisKVConfig | None:
    """The ParisKV config the server arguments ask for (None without --enable-pariskv)."""
    return config_from_args(resolved(server_args))


def _required(server_args: Any) -> ParisKVConfig:
    cfg = config_of(server_args)
    if cfg is None:
        raise ParisKVConfigError("ParisKV was called on a server without --enable-pariskv")
    return cfg


def resolution_defaults(view: Any) -> dict[str, Any]:
    """The values ParisKV declares early in SGLang's resolution, where the user chose
    none: the FlashInfer backend (ParisKV is built on it) and a bounded number of running
    requests (ParisKV's decode workspace is sized for that many)."""
    if not getattr(view, "enable_pariskv", False):
        return {}
    declared: dict[str, Any] = {}
    backends = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")
    if all(getattr(view, name, None) is None for name in backends):
        declared["attention_backend"] = "flashinfer"
    if getattr(view, "max_running_requests", None) is None:
        declared["max_running_requests"] = DEFAULT_MAX_RUNNING_REQUESTS
    return declared


def check_resolved(view: Any) -> None:
    """At the end of SGLang's resolution: the flags' values, and every resolved setting
    ParisKV cannot serve, each refused naming the flag and the fix."""
    cfg = config_from_args(view)
    if cfg is None:
        return
    check_server_args(view)
    check_launch(cfg, view)


def kv_pool_class(server_args: Any) -> type:
    """The MHA KV pool class for these server arguments (ParisKV codes ride along)."""
    from sglang_pariskv.serving import kv_pool_class as configured

    return configured(_required(server_args))


def create_attn_backend(runner: Any):
    """The attention backend SGLang's FlashInfer registry entry builds with ParisKV on."""
    from sglang_pariskv.serving import build_attn_backend

    return build_attn_backend(runner, _required(runner.server_args))


def cell_size(cell_size: int, configurator: Any, kvc: Any, num_layers: int) -> int:
    """SGLang's per-token KV cell size with the ParisKV codes (the GPU cost per token)."""
    return add_code_bytes(cell_size, configurator, kvc, num_layers, _required(kvc.server_args))


def pool_sizes(result: Any, configurator: Any, available_bytes: int, page_size: int) -> Any:
    """SGLang's pool sizes with ParisKV's planned GPU bytes kept out of the pool."""
    return reserve_planned_memory(result, configurator, available_bytes, page_size)


def pool_sizes_from_max_tokens(result: Any, configurator: Any, max_tokens: int, page_size: int):
    """SGLang's pool sizes from a token cap, capped by the host pool with offload."""
    return cap_to_host_pool(result, configurator, max_tokens, page_size)
