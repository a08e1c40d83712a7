"""What ParisKV serves: head dims, GQA groups and GPUs.

The one source of truth for the startup checks (``startup_checks.check_model``, the
backend's device check) and for the kernels' own guards, so that a shape is either
served or refused at startup, naming the model, never failing in a kernel later.
"""

from __future__ import annotations

from sglang_pariskv.config import ParisKVConfigError


def check_head_dim(head_dim: int) -> None:
    """ParisKV splits keys into 8-dim blocks: head_dim must be a positive multiple of 8."""
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 8:
        raise ParisKVConfigError(
            f"ParisKV needs head_dim to be a positive multiple of 8, got {head_dim!r}: "
            "this model is not supported; serve it without --enable-pariskv"
        )


#: Head dims ParisKV serves: the CUDA kernels are built for 8 or 16 key blocks of 8 dims,
#: and the Triton encode's Walsh-Hadamard rotation needs a power-of-two block count.
#: (The plain-torch codec takes any multiple of 8.)
SERVING_HEAD_DIMS: tuple[int, ...] = (64, 128)
#: GPUs ParisKV serves on: compute capability 8.0 (A100) or newer (FlashInfer's tensor-core
#: decode, bf16, cp.async in the collision scan).
MIN_COMPUTE_CAPABILITY: tuple[int, int] = (8, 0)


def check_kernel_head_dim(head_dim: int) -> None:
    """What the Triton kernels take: a power-of-two multiple of 8 (the encode's
    Walsh-Hadamard rotation works on a power-of-two count of 8-dim blocks). Tests run them
    at small head dims; serving narrows this to :data:`SERVING_HEAD_DIMS`."""
    check_head_dim(head_dim)
    if head_dim & (head_dim - 1):
        raise ParisKVConfigError(
            f"head_dim {head_dim}: ParisKV's kernels need a power of two (64 or 128 are "
            "served); serve this model without --enable-pariskv"
        )


def check_serving_shape(
    head_dim: int, num_q_heads: int, num_kv_heads: int, model_name: str = "this model"
) -> None:
    """The one check of what ParisKV serves, used by the startup check and the kernels.

    GQA groups of any size are served (the head-as-batch decode uses FlashInfer's
    tensor-core kernel, which takes every group size); query heads must be a whole
    multiple of the KV heads."""
    if head_dim not in SERVING_HEAD_DIMS:
        raise ParisKVConfigError(
            f"{model_name} has head_dim {head_dim}; ParisKV serves head_dim "
            f"{' or '.join(map(str, SERVING_HEAD_DIMS))}: serve it without --enable-pariskv"
        )
    if num_kv_heads <= 0 or num_q_heads <= 0 or num_q_heads % num_kv_heads:
        raise ParisKVConfigError(
            f"{model_name} has {num_q_heads} query heads for {num_kv_heads} KV heads per GPU; "
            "ParisKV needs a whole number of query heads per KV head: serve it without "
            "--enable-pariskv (or pick a --tp-size that divides both)"
        )


def check_compute_capability(capability: tuple[int, int], device_name: str = "this GPU") -> None:
    if tuple(capability) < MIN_COMPUTE_CAPABILITY:
        major, minor = MIN_COMPUTE_CAPABILITY
        raise ParisKVConfigError(
            f"{device_name} has compute capability {capability[0]}.{capability[1]}; ParisKV "
            f"needs {major}.{minor} or newer: serve without --enable-pariskv"
        )
