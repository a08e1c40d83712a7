"""ParisKV's part in SGLang's KV pool sizing (hooks registered by ``plugin.py``).

SGLang turns the memory it keeps for the KV cache into a token count: bytes over the
per-token cell size. ParisKV changes both sides of that division:

* the cell: every token also holds its code (:func:`add_code_bytes`); with
  ``--pariskv-offload host`` the K/V bytes are in host memory, so the GPU cell is the code
  alone and the host pool's size caps the tokens;
* the bytes: what the ParisKV backend allocates after the pool exists (decode
  workspace, FlashInfer workspaces: ``attention.memory_plan``; with offload, the hot
  cache) is planned here and taken out of the pool (:func:`reserve_planned_memory`), so
  a pool filled to its advertised capacity still leaves SGLang its headroom.
"""

from __future__ import annotations

import dataclasses
import logging

from sglang_pariskv.config import ParisKVConfig, ParisKVConfigError
from sglang_pariskv.sglang_compat import captured_decode_batch_sizes, resolved

logger = logging.getLogger("sglang_pariskv")

#: ParisKV's decode workspace grows with running requests x context (about 3.7 GB at 1M
#: tokens x 256 requests) and SGLang bounds the running requests at 2048-4096 unless told
#: otherwise, so without a cap the workspace alone could outgrow the GPU.
DEFAULT_MAX_RUNNING_REQUESTS = 256


def cell_size_hook(cfg: ParisKVConfig):
    """The AFTER hook of SGLang's ``_compute_cell_size`` for this config."""

    def hook(cell_size: int, configurator, kvc, num_layers: int) -> int:
        return add_code_bytes(cell_size, configurator, kvc, num_layers, cfg)

    return hook


def _graph_batch_sizes(server_args, max_batch: int) -> list[int]:
    """The decode batch sizes SGLang captures; every size up to ``max_batch`` where the
    server arguments do not tell (unknown, or a record without SGLang's resolved graph
    settings): the plan then covers the most graphs there can be."""
    bound = list(range(1, max_batch + 1))
    if server_args is None:
        return bound
    try:
        return captured_decode_batch_sizes(server_args, max_batch)
    except (AttributeError, ImportError):  # no resolved graph config, no schedule to ask
        return bound


def _max_running_requests(server_args) -> int:
    """The request bound SGLang resolved (the plugin sets one when the user gave none)."""
    if server_args is None:
        return DEFAULT_MAX_RUNNING_REQUESTS
    value = getattr(resolved(server_args), "max_running_requests", None)
    return int(value or DEFAULT_MAX_RUNNING_REQUESTS)


def backend_bytes(cfg: ParisKVConfig, kvc, num_layers: int, tp_size: int) -> int:
    """GPU bytes the ParisKV backend will allocate for this model and these server args
    (``attention.memory_plan``); 0 when the model is one ParisKV refuses anyway."""
    from sglang_pariskv.attention.memory_plan import plan_backend_memory

    mc, args = kvc.model_config, getattr(kvc, "server_args", None)
    cfg.dense_layer_set(num_layers)  # layers outside the model: refused here, naming them
    max_reqs = _max_running_requests(args)
    graph_sizes = _graph_batch_sizes(args, max_reqs)
    try:
        plan = plan_backend_memory(
            cfg,
            num_q_heads=mc.get_num_attention_heads(tp_size),
            num_kv_heads=mc.get_num_kv_heads(tp_size),
            head_dim=mc.head_dim,
            num_layers=num_layers,
            max_batch=max_reqs,
            max_context=int(mc.context_len),
            graph_batch_sizes=len(graph_sizes),
            max_graph_batch=max(graph_sizes, default=0),
        )
    except ValueError:  # an unsupported shape: the backend factory refuses it, naming it
        # (that check runs on the same numbers, so nothing is sized for a model it refuses)
        return 0
    return plan.total


def planned_gpu_bytes(
    cfg: ParisKVConfig, kvc, num_layers: int, tp_size: int, cell_size: int
) -> dict[str, int]:
    """GPU bytes ParisKV allocates after SGLang builds its pools, by owner: ``backend``
    (:func:`backend_bytes`) and, with host offload, ``prefill_staging`` and (with a hot
    cache) ``hot_cache``. The pool sizing takes their sum out of the pool; the backend
    logs it beside what it measured."""
    out = {"backend": backend_bytes(cfg, kvc, num_layers, tp_size)}
    if not cfg.offloaded:
        return out
    from sglang_pariskv.offload.prefill_staging import staging_bytes

    heads = kvc.model_config.get_num_kv_heads(tp_size)
    head_dim = kvc.model_config.head_dim
    # the K/V cell is 2 (K, V) x heads x head_dim x layers elements
    elt = max(cell_size // (2 * heads * head_dim * num_layers), 1)
    # two layers' prefix K/V of the longest request (offload.prefill_staging)
    out["prefill_staging"] = staging_bytes(int(kvc.model_config.context_len), heads, head_dim, elt)
    if cfg.hot_cache_lines:
        from sglang_pariskv.offload.hot_cache import HotCache

        # overflow rows: one step's retrieved entries at the most requests SGLang runs
        # (the plugin sets --max-running-requests when it is not given)
        max_reqs = _max_running_requests(getattr(kvc, "server_args", None))
        entries = max_reqs * heads * cfg.budget
        out["hot_cache"] = HotCache.planned_nbytes(
            num_layers, cfg.hot_cache_lines, 2 * head_dim, elt, entries
        )
    return out


def add_code_bytes(
    cell_size: int, configurator, kvc, num_layers: int, cfg: ParisKVConfig | None = None
) -> int:
    """The per-token GPU cost with ParisKV codes. On ``configurator`` it records the bytes
    to keep out of the pool (``_pariskv_reserved_tokens`` in tokens of this cost, and
    ``_pariskv_reserved_gib``) and, with host offload, the host pool's token count
    (``_pariskv_host_slots``), for :func:`reserve_planned_memory`."""
    from sglang.srt.model_executor import pool_configurator

    from sglang_pariskv.index.code_pool import code_bytes_per_token

    if kvc.use_mla_backend:
        return cell_size  # refused later by the backend factory, with a clear message
    tp = pool_configurator.get_parallel().attn_tp_size
    heads = kvc.model_config.get_num_kv_heads(tp)
    cfg = cfg or ParisKVConfig()
    extra = code_bytes_per_token(
        heads, kvc.model_config.head_dim, num_layers, records=cfg.stores_records
    )
    reserved = sum(planned_gpu_bytes(cfg, kvc, num_layers, tp, cell_size).values())
    cost = cell_size + extra
    if cfg.offloaded:
        slots = int(cfg.host_pool_gb * 2**30) // cell_size
        cost = extra
        if configurator is not None:
            configurator._pariskv_host_slots = slots
        logger.info(
            "ParisKV offload: K/V (%d B/token) in a %.1f GiB host pool = %d tokens; the GPU "
            "holds %d B/token of codes",
            cell_size,
            cfg.host_pool_gb,
            slots,
            extra,
        )
    else:
        logger.info(
            "ParisKV codes add %d B/token to the KV cell size (%d B): +%.1f%%",
            extra,
            cell_size,
            100.0 * extra / max(cell_size, 1),
        )
    if configurator is not None:
        configurator._pariskv_reserved_tokens = -(-reserved // max(cost, 1))
        configurator._pariskv_reserved_gib = reserved / 2**30
    return cost


def _page_size(args, kwargs) -> int:
    return int(args[-1]) if args else int(kwargs.get("page_size", 1))


def reserve_planned_memory(result, configurator, *args, **kwargs):
    """After SGLang turns its byte budget into tokens: keep ParisKV's planned bytes out of
    the pool and, with host offload, no more tokens than the host pool holds (page-aligned)."""
    reserved = getattr(configurator, "_pariskv_reserved_tokens", 0)
    slots = getattr(configurator, "_pariskv_host_slots", None)
    total = result.max_total_num_tokens
    gib = getattr(configurator, "_pariskv_reserved_gib", 0.0)
    if not reserved and (slots is None or total <= slots):
        return result
    page = _page_size(args, kwargs)
    gpu = (total - reserved) // page * page
    fix = (
        "lower --pariskv-hot-cache-lines (0 = none) or --max-running-requests, or raise "
        "--mem-fraction-static"
        if slots is not None
        else "lower --max-running-requests or --context-length, or raise --mem-fraction-static"
    )
    if gpu <= 0:
        raise ParisKVConfigError(
            f"ParisKV's GPU memory ({gib:.2f} GiB of decode workspace and caches) "
            f"leaves room for {max(total - reserved, 0)} tokens, less than one page: {fix}"
        )
    capped = gpu if slots is None else min(slots // page * page, gpu)
    if capped <= 0:
        raise ParisKVConfigError(
            f"--pariskv-host-pool-gb holds {slots} tokens, less than one page: pass a "
            "larger --pariskv-host-pool-gb"
        )
    logger.info(
        "ParisKV: %d tokens fit SGLang's KV budget; %.2f GiB (%d tokens) are kept for "
        "ParisKV's backend%s: serving %d",
        total,
        gib,
        reserved,
        "" if slots is None else f", the host pool holds {slots}",
        capped,
    )
    return result if capped == total else dataclasses.replace(result, max_total_num_tokens=capped)


def cap_to_host_pool(result, configurator, *args, **kwargs):
    """After SGLang re-sizes the pool from a token count (a user's cap): with host offload,
    no more tokens than the host pool holds. (The planned bytes were already kept out of
    the budget the count came from.)"""
    slots = getattr(configurator, "_pariskv_host_slots", None)
    if slots is None or result.max_total_num_tokens <= slots:
        return result
    page = _page_size(args, kwargs)
    return dataclasses.replace(result, max_total_num_tokens=slots // page * page)
