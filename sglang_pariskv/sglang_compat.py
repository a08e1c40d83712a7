"""The SGLang releases ParisKV runs on, and the places where their APIs differ.

Every SGLang API the plugin touches was read in each release of the supported range; the
ones that changed shape are adapted here, so the rest of the package is written once:

* **Resolution.** Up to 0.5.18 ``ServerArgs.__post_init__`` resolves the arguments and
  writes the results into the fields. From 0.5.19 construction stores the operator's input
  only; ``ServerArgs.resolve_once`` resolves into a side table read through
  ``resolved_view``, and the record refuses writes once resolved. :func:`resolution_target`
  names the method to hook, :func:`resolved` reads resolved values in either regime.
* **Decode graph batch sizes.** A ``ServerArgs`` method up to 0.5.18, a function of
  ``arg_groups.cuda_graph_hook`` from 0.5.19 (:func:`decode_graph_batch_sizes`).

Signatures that only grew optional trailing parameters (the graph runner's
``capture_one_shape``, the pools' ``get_cpu_copy`` / ``load_cpu_copy``) are handled where
they are wrapped, by passing extra arguments through. Unchanged across the range, as the
plugin uses them: the plugin hook registry, the attention registry's ``flashinfer`` entry,
``MHATokenToKVPool`` (looked up by name when the pool is built), the pool configurator's
``_compute_cell_size`` / ``calculate_pool_sizes*``, ``FlashInferAttnBackend``'s methods
the backend overrides, and FlashInfer's decode wrapper (0.6.15 to 0.7.2).
"""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any

from packaging.version import InvalidVersion, Version

from sglang_pariskv.config import ParisKVConfigError

#: Oldest and newest SGLang release the plugin was built and tested against (inclusive);
#: pyproject.toml declares the same range.
SUPPORTED_RANGE: tuple[str, str] = ("0.5.17", "0.5.23")


class UnsupportedSGLangError(ParisKVConfigError):
    """The installed SGLang is outside :data:`SUPPORTED_RANGE`."""


def installed_version() -> str:
    """The installed SGLang distribution's version ("none" when it is missing)."""
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return "none"


def check_supported(version: str | None = None) -> str:
    """Return the installed (or given) SGLang version, or raise one line naming it and the
    supported range: the hooks below assume the APIs of exactly these releases."""
    version = installed_version() if version is None else version
    low, high = SUPPORTED_RANGE
    try:
        ok = Version(low) <= Version(version) <= Version(high)
    except InvalidVersion:
        ok = False
    if not ok:
        raise UnsupportedSGLangError(
            f"sglang-pariskv supports SGLang {low} to {high}, but SGLang {version} is "
            f"installed: pip install 'sglang>={low},<={high}'"
        )
    return version


def _server_args_class() -> type:
    from sglang.srt.server_args import ServerArgs

    return ServerArgs


def resolves_on_construction() -> bool:
    """True for SGLang <= 0.5.18, where ``ServerArgs(...)`` resolves in ``__post_init__``."""
    return not hasattr(_server_args_class(), "resolve_once")


def resolution_target() -> str:
    """The dotted path of the ``ServerArgs`` method that resolves the arguments; hooked
    around, ParisKV writes its defaults before it and checks the result after it."""
    method = "__post_init__" if resolves_on_construction() else "resolve_once"
    return f"sglang.srt.server_args.ServerArgs.{method}"


def is_resolved(server_args: Any) -> bool:
    """Whether SGLang already resolved this record (and so refuses writes to it)."""
    return bool(
        getattr(server_args, "_resolution_finished", False)
        or getattr(server_args, "_declarations_materialized", False)
    )


def resolved(server_args: Any) -> Any:
    """A read-only view of the values SGLang resolved (its declarations over the fields).

    Reading a field of a 0.5.19+ ``ServerArgs`` directly returns the operator's input,
    e.g. ``attention_backend=None`` where resolution chose a backend; the view returns
    the resolved value. Up to 0.5.18 the fields hold the resolved values themselves and
    the view returns the same. Works on argparse namespaces too (nothing is declared)."""
    from sglang.srt.arg_groups.overrides import resolved_view

    return resolved_view(server_args)


def native_pariskv() -> bool:
    """Whether this SGLang has ParisKV built in (``patches/`` applied): its ServerArgs
    declares the ParisKV flags, and the plugin must then add nothing."""
    cls = _server_args_class()
    fields = getattr(cls, "__struct_fields__", None) or getattr(cls, "__dataclass_fields__", ())
    return "enable_pariskv" in fields


def capture_attention_variant() -> str | None:
    """The attention graph variant SGLang's decode graph runner is capturing (releases
    with ``AttentionGraphVariants``, 0.5.23), else None."""
    try:
        from sglang.srt.model_executor.runner_utils.capture_mode import (
            get_capture_attention_variant,
        )
    except ImportError:
        return None
    return get_capture_attention_variant()


def decode_graph_batch_sizes(server_args: Any, max_bs: int) -> list[int]:
    """The decode batch sizes SGLang captures CUDA graphs for, up to ``max_bs``."""
    method = getattr(server_args, "_generate_decode_cuda_graph_batch_sizes", None)
    if method is not None:
        return list(method(max_bs))
    from sglang.srt.arg_groups.cuda_graph_hook import generate_decode_cuda_graph_batch_sizes

    return list(generate_decode_cuda_graph_batch_sizes(server_args, max_bs))


def captured_decode_batch_sizes(server_args: Any, max_requests: int) -> list[int]:
    """The decode batch sizes SGLang will capture graphs for, as its decode graph runner
    picks them: the resolved ``cuda_graph_config`` decode sizes up to ``max_requests``
    (plus ``max_requests`` itself when a larger size was configured); none when decode
    graphs are disabled. Where the resolved record has no such config, SGLang's schedule
    up to ``max_requests`` (or none under ``--disable-cuda-graph``)."""
    view = resolved(server_args)
    decode = getattr(getattr(view, "cuda_graph_config", None), "decode", None)
    backend = getattr(decode, "backend", None)
    if backend is not None:
        if str(backend) == "disabled":
            return []
        sizes = [int(b) for b in (getattr(decode, "bs", None) or [])]
        if sizes:
            kept = {b for b in sizes if b <= max_requests}
            if max(sizes) > max_requests:
                kept.add(max_requests)
            return sorted(kept)
    elif getattr(view, "disable_cuda_graph", False):
        return []
    return decode_graph_batch_sizes(view, max_requests)


def refuse_unsupported_launch(argv: list[str] | None = None, env_config: bool = False) -> bool:
    """At plugin load on an SGLang outside the range: end a launch that asks for ParisKV
    with one error line (exit code 2, as argparse), and otherwise leave SGLang untouched.
    Returns True when the installed SGLang is supported (the plugin may register)."""
    try:
        check_supported()
    except UnsupportedSGLangError as e:
        argv = sys.argv if argv is None else argv
        if env_config or any(a.startswith(("--enable-pariskv", "--pariskv-")) for a in argv):
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"warning: ParisKV not loaded: {e}", file=sys.stderr)
        return False
    return True
