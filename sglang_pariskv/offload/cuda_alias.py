"""A CUDA tensor over pinned host memory: SGLang's own kernels read and write it over UVA.

Why: with ``--pariskv-offload host`` the K/V of every token lives in host memory, yet
SGLang's writers (the KV store of extend and decode, KV moves) and readers (FlashInfer's
prefill over a cached prefix, dense decode of short requests) take CUDA tensors. Memory
registered with ``cudaHostRegister`` (portable | mapped) is addressable by the GPU at the
same address on a UVA system, so a CUDA tensor whose data pointer is that address is read
and written by any kernel over PCIe, with no code change in SGLang or FlashInfer.

How: torch has no public constructor for a CUDA tensor over a foreign pointer, and
``__cuda_array_interface__`` is refused for host memory (torch 2.11 checks the
pointer). DLPack import does not check it: ``at::fromDLPack``
maps ``kDLCUDA`` to ``Device(CUDA, device_id)`` and calls ``from_blob`` with that device.
So we hand torch a DLPack capsule (built here with ctypes) that names the host address
with ``device_type = kDLCUDA``. The capsule carries no deleter: the alias borrows the
memory, and :class:`~sglang_pariskv.offload.host_pool.HostKVPool` (which owns it) must
outlive every alias; the pool keeps its aliases as attributes for that reason.

The same capsule with ``kDLCPU`` wraps a CPU address, which is how the CPU tests check
the struct layout (shape, strides, dtype, offset) without a GPU.
"""

from __future__ import annotations

import ctypes

import torch

KDL_CPU = 1
KDL_CUDA = 2

_DL_CODES = {
    torch.float16: (2, 16),  # kDLFloat
    torch.float32: (2, 32),
    torch.bfloat16: (4, 16),  # kDLBfloat
    torch.int32: (0, 32),  # kDLInt
    torch.int64: (0, 64),
    torch.uint8: (1, 8),  # kDLUInt
    torch.int16: (0, 16),
}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),  # NULL: torch then frees nothing
    ]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

#: The ctypes structs torch reads at import time are kept alive here (a few hundred
#: bytes per alias; aliases are made once per pool at startup).
_keepalive: list[object] = []


def tensor_from_address(
    address: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """A tensor over ``address`` (elements, not bytes, in ``strides``) on ``device``;
    no copy, no ownership: the memory must outlive the tensor."""
    device = torch.device(device)
    if dtype not in _DL_CODES:
        raise ValueError(f"no DLPack code for {dtype}")
    if len(shape) != len(strides):
        raise ValueError(f"shape {shape} and strides {strides} differ in rank")
    n = len(shape)
    shape_arr = (ctypes.c_int64 * max(n, 1))(*shape)
    stride_arr = (ctypes.c_int64 * max(n, 1))(*strides)
    code, bits = _DL_CODES[dtype]
    if device.type == "cuda":
        dev = _DLDevice(KDL_CUDA, device.index if device.index is not None else 0)
    elif device.type == "cpu":
        dev = _DLDevice(KDL_CPU, 0)
    else:
        raise ValueError(f"aliases are made for cuda or cpu devices, not {device}")
    managed = _DLManagedTensor(
        _DLTensor(address, dev, n, _DLDataType(code, bits, 1), shape_arr, stride_arr, 0),
        None,
        None,
    )
    _keepalive.append((managed, shape_arr, stride_arr))
    capsule = _capsule_new(ctypes.addressof(managed), b"dltensor", None)
    return torch.utils.dlpack.from_dlpack(capsule)


def cuda_alias(host: torch.Tensor, device: torch.device | str = "cuda") -> torch.Tensor:
    """The CUDA-device view of registered host tensor ``host`` (same shape and strides).

    ``host`` must be pinned (``cudaHostRegister``'d or ``pin_memory``), or the first
    kernel that touches the alias faults (``kernels.uva_gather.host_accessible`` checks it)."""
    if host.device.type != "cpu":
        raise ValueError(f"cuda_alias takes a host tensor, got one on {host.device}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return tensor_from_address(
        host.data_ptr(), tuple(host.shape), tuple(host.stride()), host.dtype, device
    )
