"""The ``sglang.srt.plugins`` entry point: every change ParisKV makes to SGLang is here.

SGLang calls :func:`register` in the launcher before it parses arguments, and again in
each scheduler process. In the launcher we only add the flags and check them; once
``--enable-pariskv`` has been parsed, the validated config travels to the scheduler
processes (started with ``spawn``) in the environment variable ``SGLANG_PARISKV_CONFIG``,
and there :func:`register` installs the serving hooks: the KV pool with ParisKV codes,
the code bytes in the pool's per-token cell size, and the ParisKV attention backend.
Without ``--enable-pariskv`` nothing but the (unused) flags is added.

Engine API users (``sglang.Engine(...)``) call :func:`enable` before creating the engine
(and :func:`disable` before creating one without ParisKV).

Where SGLang's APIs differ between the supported releases, ``sglang_compat`` adapts them.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from sglang_pariskv import sglang_compat
from sglang_pariskv.config import ParisKVConfig, ParisKVConfigError
from sglang_pariskv.pool_sizing import (
    DEFAULT_MAX_RUNNING_REQUESTS,
    cap_to_host_pool,
    cell_size_hook,
    reserve_planned_memory,
)
from sglang_pariskv.server_flags import check_calibration_file, config_from_args
from sglang_pariskv.startup_checks import check_launch, check_server_args

logger = logging.getLogger("sglang_pariskv")

ENV_CONFIG = "SGLANG_PARISKV_CONFIG"


_TARGETS = {
    "add_cli_args": "sglang.srt.server_args.ServerArgs.add_cli_args",
    "from_cli_args": "sglang.srt.server_args.ServerArgs.from_cli_args",
    "kv_pool_class": "sglang.srt.mem_cache.kv_cache_configurator.MHATokenToKVPool",
    "cell_size": "sglang.srt.model_executor.pool_configurator."
    "DefaultPoolConfigurator._compute_cell_size",
    "pool_sizes": "sglang.srt.model_executor.pool_configurator."
    "DefaultPoolConfigurator.calculate_pool_sizes",
    "pool_sizes_from_max": "sglang.srt.model_executor.pool_configurator."
    "DefaultPoolConfigurator.calculate_pool_sizes_from_max_tokens",
}
_GRAPH_RUNNER = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner"
#: SGLang's decode graph runner, hooked to capture a dense-step graph next to each
#: sparse-step one (see :func:`_around_capture_one_shape`).
_GRAPH_TARGETS = {
    "capture_one_shape": f"{_GRAPH_RUNNER}.capture_one_shape",
    "graph_variant": f"{_GRAPH_RUNNER}._resolve_lora_variant",
}
#: Both graph hooks took: captures are labelled only if replays will be too.
_graph_hooks_applied = False
_serving_hooks_installed = False
_resolution_hook_registered = False
#: This process parsed a command line with --enable-pariskv: refusals end it with one line.
_launched_from_cli = False


def register() -> None:
    """Entry point of group ``sglang.srt.plugins`` (see pyproject.toml). On an SGLang
    outside the supported range it adds nothing, and a launch asking for ParisKV ends
    with one error line naming the installed version and the range. An SGLang with
    ParisKV built in (``patches/``) needs no hooks."""
    if not sglang_compat.refuse_unsupported_launch(env_config=bool(os.environ.get(ENV_CONFIG))):
        return
    if sglang_compat.native_pariskv():
        return  # SGLang was built with ParisKV (patches/): it wires everything itself
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_TARGETS["add_cli_args"], _after_add_cli_args, HookType.AFTER)
    HookRegistry.register(_TARGETS["from_cli_args"], _around_from_cli_args, HookType.AROUND)
    _register_resolution_hook()
    cfg = config_from_env()
    if cfg is not None:
        install_serving_hooks(cfg)


def enable(config: ParisKVConfig | None = None) -> ParisKVConfig:
    """Turn ParisKV on for engines created afterwards in this process (Engine API)."""
    sglang_compat.check_supported()
    cfg = config or ParisKVConfig()
    check_calibration_file(cfg)
    os.environ[ENV_CONFIG] = json.dumps(cfg.to_dict())
    install_serving_hooks(cfg)
    return cfg


def disable() -> None:
    """Serve engines created afterwards in this process without ParisKV (Engine API): the
    config leaves the environment, so their scheduler processes install nothing."""
    os.environ.pop(ENV_CONFIG, None)


def config_from_env() -> ParisKVConfig | None:
    raw = os.environ.get(ENV_CONFIG)
    if not raw:
        return None
    try:
        return ParisKVConfig.from_dict(json.loads(raw))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{ENV_CONFIG} holds an invalid ParisKV config: {e}") from e


def _after_add_cli_args(result, parser):
    from sglang_pariskv.server_flags import add_cli_args

    add_cli_args(parser)
    return result


def _around_from_cli_args(original, cls, args):
    """The launcher's argument step. A setting ParisKV cannot serve ends the launch here
    with one line naming the flag and the fix, as argparse reports a bad argument."""
    try:
        return _server_args_from_cli(original, cls, args)
    except ParisKVConfigError as e:
        _exit_with(e)


def _exit_with(error: ParisKVConfigError):
    """End a command-line launch as argparse ends one with a bad argument."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None


def _server_args_from_cli(original, cls, args):
    cfg = config_from_args(args)  # raises on bad values, before any model work
    if cfg is None:
        if os.environ.pop(ENV_CONFIG, None):
            # The command line decides: a config inherited from the environment (an
            # exported variable, a parent's enable()) must not reach the schedulers.
            logger.warning(
                "%s is set but --enable-pariskv was not given: serving without ParisKV",
                ENV_CONFIG,
            )
        return original(cls, args)
    if getattr(args, "attention_backend", None) is None:
        # SGLang's default may be another backend (e.g. fa3 on Hopper); ParisKV is built
        # on FlashInfer, so pick it explicitly rather than refuse the user's default.
        args.attention_backend = "flashinfer"
    check_server_args(args)
    check_launch(cfg, args)
    _cap_running_requests(args)
    server_args = original(cls, args)
    # Again on the record SGLang built (resolved here up to SGLang 0.5.18; from 0.5.19 the
    # resolution hook checks the resolved values when the launcher resolves them).
    check_server_args(server_args)
    # The config travels in the environment only: a resolved ServerArgs is read-only (and
    # ``pariskv_config`` is the --pariskv-config path's dest anyway).
    os.environ[ENV_CONFIG] = json.dumps(cfg.to_dict())
    global _launched_from_cli
    _launched_from_cli = True
    logger.info("ParisKV enabled: %s", json.dumps(cfg.to_dict()))
    return server_args


def install_serving_hooks(cfg: ParisKVConfig) -> None:
    """Swap in the ParisKV KV pool, cell size and attention backend (idempotent)."""
    global _serving_hooks_installed
    if _serving_hooks_installed:
        return
    from sglang.srt.layers.attention import attention_registry
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_pariskv.serving import kv_pool_class

    if cfg.offloaded:
        HookRegistry.register(_TARGETS["pool_sizes_from_max"], cap_to_host_pool, HookType.AFTER)
    HookRegistry.register(_TARGETS["pool_sizes"], reserve_planned_memory, HookType.AFTER)
    HookRegistry.register(_TARGETS["kv_pool_class"], kv_pool_class(cfg), HookType.REPLACE)
    HookRegistry.register(_TARGETS["cell_size"], cell_size_hook(cfg), HookType.AFTER)
    _register_resolution_hook()
    HookRegistry.register(
        _GRAPH_TARGETS["capture_one_shape"], _around_capture_one_shape, HookType.AROUND
    )
    HookRegistry.register(_GRAPH_TARGETS["graph_variant"], _around_graph_variant, HookType.AROUND)
    HookRegistry.apply_hooks()
    _check_graph_hooks(HookRegistry._patched)
    import sglang.srt.models.utils  # noqa: F401  (patched before any model binds it)

    disable_fused_kv_store()
    original = attention_registry.ATTENTION_BACKENDS["flashinfer"]
    attention_registry.ATTENTION_BACKENDS["flashinfer"] = _backend_factory(original, cfg)
    _serving_hooks_installed = True


def _register_resolution_hook() -> None:
    """Hook the ``ServerArgs`` method that resolves the arguments (once per process)."""
    global _resolution_hook_registered
    if _resolution_hook_registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    target = sglang_compat.resolution_target()
    HookRegistry.register(target, _around_resolution, HookType.AROUND)
    _resolution_hook_registered = True


def _around_resolution(original, server_args, *args, **kwargs):
    """Once ParisKV is on (its config is in the environment), every ServerArgs (CLI or
    Engine API) must be servable by it: a user who picked another attention backend gets
    an error, not dense attention.

    The request-slot cap goes in before SGLang resolves the arguments, after which
    ServerArgs fields are read-only; the checks read the resolved values."""
    cfg = config_from_env()
    if cfg is None:
        return original(server_args, *args, **kwargs)
    if not sglang_compat.is_resolved(server_args):
        _cap_running_requests(server_args)
    result = original(server_args, *args, **kwargs)
    try:
        view = sglang_compat.resolved(server_args)
        check_server_args(view)
        if not _launched_from_cli:  # a launch checked them before any model work
            check_launch(cfg, view)
    except ParisKVConfigError as e:
        if _launched_from_cli:  # from 0.5.19 the launcher resolves after from_cli_args
            _exit_with(e)
        raise
    return result


def _cap_running_requests(args) -> None:
    """Bound the running requests (and so the decode workspace, sized for that many) unless
    the user chose."""
    if getattr(args, "max_running_requests", None) is None:
        args.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS
        logger.warning(
            "ParisKV: --max-running-requests not given; using %d (ParisKV's decode "
            "workspace is sized for that many requests). Pass --max-running-requests to "
            "choose another bound.",
            DEFAULT_MAX_RUNNING_REQUESTS,
        )


def _no_fused_kv_store(forward_batch) -> bool:
    """ParisKV's replacement for SGLang's ``enable_fused_set_kv_buffer``: always False."""
    return False


def disable_fused_kv_store() -> list[str]:
    """Make models store K/V through the pool's ``set_kv_buffer`` (which writes the codes
    and, with offload, drops stale hot-cache rows) instead of inside their fused RoPE
    kernel (Qwen3-MoE, gpt-oss, ... on CUDA with a bf16 cache), which writes the pool's
    buffers directly and would leave those slots without codes. Models bind the helper
    by name at import, so every loaded model module is patched, as well as
    ``sglang.srt.models.utils`` for modules imported later. Returns the patched modules."""
    import sys

    patched = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith("sglang.srt.models.") or mod is None:
            continue
        fn = getattr(mod, "enable_fused_set_kv_buffer", None)
        if fn is not None and fn is not _no_fused_kv_store:
            mod.enable_fused_set_kv_buffer = _no_fused_kv_store
            patched.append(name)
    return patched


def _backend_factory(original, cfg: ParisKVConfig):
    def create_pariskv_backend(runner):
        from sglang_pariskv.serving import build_attn_backend

        patched = disable_fused_kv_store()  # the model is loaded: its modules are bound
        if patched:
            logger.info("ParisKV: K/V stores go through the KV pool in %s", patched)
        return build_attn_backend(runner, cfg)

    create_pariskv_backend.original = original
    return create_pariskv_backend


# -- dense-step CUDA graphs ------------------------------------------------------------
# A captured decode graph holds the retrieval path of every layer, and replaying it costs
# its launches even when no request of the step is above the dense threshold. SGLang's
# decode runner already keeps per-variant graphs (ShapeKey.variant_label), so each batch
# size gets a sparse-step and a dense-step variant, and a replay picks the one
# ParisKVAttnBackend.step_graph names for its batch (attention/step_graphs.py).


def graph_variant_label(base: str | None, step: str) -> str:
    """SGLang's variant label of a decode graph (None without LoRA) with the ParisKV step
    graph ("sparse" / "dense") added."""
    tag = f"pariskv_{step}"
    return tag if base is None else f"{base}+{tag}"


def _check_graph_hooks(patched: set[str]) -> bool:
    """Dense-step graphs need both hooks (labelled captures without labelled replays would
    find no graph); SGLang's registry logs and skips a hook it cannot apply."""
    global _graph_hooks_applied
    _graph_hooks_applied = all(t in patched for t in _GRAPH_TARGETS.values())
    if not _graph_hooks_applied:
        logger.warning(
            "ParisKV: could not hook SGLang's decode CUDA graph runner (%s); every decode "
            "graph holds the retrieval path, so steps of short requests also pay its "
            "launches",
            sorted(_GRAPH_TARGETS.values()),
        )
    return _graph_hooks_applied


def _graph_backend(runner):
    """The runner's ParisKV backend when the graph hooks took, else None (another backend,
    or hooks that did not take: every graph is then a sparse-step one)."""
    from sglang_pariskv.attention.backend import ParisKVAttnBackend

    backend = getattr(runner, "attn_backend", None)
    if _graph_hooks_applied and isinstance(backend, ParisKVAttnBackend):
        return backend
    return None


def _around_capture_one_shape(
    original, runner, size, forward, stream_idx=None, variant_label=None, *rest
):
    """Capture each batch size twice: with the retrieval path, and without it.

    ``rest``: the parameters later SGLang releases append (0.5.18's ``dsa_variant``,
    0.5.20's ``attention_variant``), passed through unchanged."""
    from sglang_pariskv.attention.step_graphs import STEP_GRAPHS

    backend = _graph_backend(runner)
    if backend is None:
        return original(runner, size, forward, stream_idx, variant_label, *rest)
    for step in STEP_GRAPHS:
        with backend.capturing(step):
            label = graph_variant_label(variant_label, step)
            original(runner, size, forward, stream_idx, label, *rest)
    return None


def _around_graph_variant(original, runner, forward_batch):
    """The graph a decode batch replays: the sparse-step one iff some request needs
    retrieval (the backend plans the step by the same rule)."""
    from sglang_pariskv.attention.step_graphs import host_seq_lens

    label = original(runner, forward_batch)
    backend = _graph_backend(runner)
    if backend is None or not backend.graphs.captured:
        return label
    seq = host_seq_lens(forward_batch)[: forward_batch.batch_size]
    return graph_variant_label(label, backend.step_graph(seq))
