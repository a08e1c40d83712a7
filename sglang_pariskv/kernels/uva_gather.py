"""Row copies between pinned host memory and the GPU, read or written in place over UVA.

On a 64-bit Linux CUDA host, pinned (page-locked, mapped) host memory has an address in
the GPU's unified virtual address space, so a kernel can load from it directly: each load
becomes a PCIe read, with no staging copy and no host involvement, and it can be captured
in a CUDA graph. This module's one Triton kernel copies whole rows
``dst[dst_rows[i]] = src[src_rows[i]]`` for the entries ``i`` that are selected (below a
device-side count and/or under a mask): :func:`gather_rows` reads host rows into a GPU
staging buffer (the retrieved KV for FlashInfer), :func:`scatter_rows` writes GPU rows
into the host pool (KV copy-out).

Passing host memory to Triton: Triton's CUDA launcher takes anything with ``data_ptr()``
(and ``dtype`` for the signature) and asks the driver for the device address with
``cuPointerGetAttribute(CU_POINTER_ATTRIBUTE_DEVICE_POINTER)``; that succeeds for pinned
memory and fails with "cannot be accessed from Triton (cpu tensor?)" for pageable memory
(triton-lang/triton PR #1197 made pinned CPU tensors legal arguments). We check
``is_pinned()`` ourselves first, for a clear error, and pass a :class:`HostPointer`
(``data_ptr`` + ``dtype``), so nothing on the way treats the host tensor as a CPU tensor.
Under ``TRITON_INTERPRET=1`` (CPU tests) every tensor is a CPU tensor and is passed as is.

Rows are copied as raw bits (viewed as same-width integers), so a gather is bit-exact
for any dtype. Row ids are not bounds-checked in the kernel.
"""

from __future__ import annotations

import ctypes

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class HostPointer:
    """A pinned host tensor as a Triton pointer argument (its address and dtype only)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor  # keeps the memory alive for the launch
        self.dtype = tensor.dtype

    def data_ptr(self) -> int:
        return self.tensor.data_ptr()


def _interpreted() -> bool:
    return isinstance(_copy_rows_kernel, InterpretedFunction)


def host_accessible(t: torch.Tensor) -> bool:
    """Whether a GPU kernel can address host tensor ``t``: pinned per torch, or registered
    with the driver (asked directly, as Triton's launcher does)."""
    if t.is_pinned():
        return True
    try:
        _device_pointer(t.data_ptr())
    except (OSError, ValueError):
        return False
    return True


def kernel_arg(t: torch.Tensor, on_gpu: bool | None = None):
    """``t`` as a kernel pointer argument: device tensors as is, pinned host tensors as a
    :class:`HostPointer`; pageable host memory is refused (a GPU kernel cannot read it)."""
    if on_gpu is None:
        on_gpu = not _interpreted()
    if not on_gpu or t.is_cuda:
        return t
    if not host_accessible(t):
        raise ValueError(
            f"a {tuple(t.shape)} {t.dtype} host tensor is not pinned, so a GPU kernel cannot "
            "read it over UVA: allocate it with offload.HostKVPool (cudaHostRegister) or "
            "tensor.pin_memory()"
        )
    return HostPointer(t)


@triton.jit
def _copy_rows_kernel(
    src,
    src_rows,
    dst,
    dst_rows,
    mask,
    count,
    n,
    src_stride,
    dst_stride,
    HAS_SRC_ROWS: tl.constexpr,
    HAS_DST_ROWS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_COUNT: tl.constexpr,
    W: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = i < n
    if HAS_COUNT:
        ok = ok & (i < tl.load(count).to(tl.int64))
    if HAS_MASK:
        ok = ok & (tl.load(mask + i, mask=ok, other=0) != 0)
    if HAS_SRC_ROWS:
        s = tl.load(src_rows + i, mask=ok, other=0).to(tl.int64)
    else:
        s = i.to(tl.int64)
    if HAS_DST_ROWS:
        d = tl.load(dst_rows + i, mask=ok, other=0).to(tl.int64)
    else:
        d = i.to(tl.int64)
    src_off = s[:, None] * src_stride
    dst_off = d[:, None] * dst_stride
    for w0 in tl.static_range(0, W, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        m = ok[:, None] & (w[None, :] < W)
        x = tl.load(src + src_off + w[None, :], mask=m)
        tl.store(dst + dst_off + w[None, :], x, mask=m)


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"rows must be a 2-D tensor with contiguous rows, got {tuple(t.shape)}")
    return t.view(_BITS[t.element_size()])


def copy_rows(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_rows: torch.Tensor | None = None,
    dst_rows: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    num_valid: torch.Tensor | None = None,
    rows_per_program: int = 8,
    block_w: int = 256,
) -> None:
    """``dst[dst_rows[i]] = src[src_rows[i]]`` for selected entries ``i`` (identity where a
    row list is None); selected: ``i < num_valid[0]`` (a device scalar, e.g.
    ``kv_indptr[-1:]``) and ``mask[i]``. Fixed grid, no host sync: CUDA-graph safe.
    ``src``/``dst`` are ``[rows, W]`` with the same element size; either may live in
    pinned host memory."""
    if src.element_size() != dst.element_size() or src.shape[1] != dst.shape[1]:
        raise ValueError(
            f"src {src.dtype} {tuple(src.shape)} vs dst {dst.dtype} {tuple(dst.shape)}"
        )
    rows = src_rows if src_rows is not None else dst_rows
    n = rows.numel() if rows is not None else src.shape[0]
    if n == 0:
        return
    s, d = _bits(src), _bits(dst)
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    on_gpu = not _interpreted()
    for name, x in (("src_rows", src_rows), ("dst_rows", dst_rows), ("mask", mask),
                    ("num_valid", num_valid)):  # fmt: skip
        if on_gpu and x is not None and not x.is_cuda:
            raise ValueError(f"{name} must be a device tensor (the kernel reads it on the GPU)")
    dummy = kernel_arg(d, on_gpu)  # unused pointer arguments

    def ptr(x):
        return dummy if x is None else x

    w = src.shape[1]
    _copy_rows_kernel[(triton.cdiv(n, rows_per_program),)](
        kernel_arg(s, on_gpu),
        ptr(src_rows),
        dummy,
        ptr(dst_rows),
        ptr(mask),
        ptr(num_valid),
        n,
        s.stride(0),
        d.stride(0),
        HAS_SRC_ROWS=src_rows is not None,
        HAS_DST_ROWS=dst_rows is not None,
        HAS_MASK=mask is not None,
        HAS_COUNT=num_valid is not None,
        W=w,
        ROWS=rows_per_program,
        BLOCK_W=min(block_w, triton.next_power_of_2(w)),
    )


def gather_rows(
    src: torch.Tensor,
    rows: torch.Tensor,
    dst: torch.Tensor,
    dst_rows: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    num_valid: torch.Tensor | None = None,
) -> None:
    """Gather ``src[rows[i]]`` (host pool view, e.g. ``HostKVPool.layer_rows``; int32 or
    int64 ``rows`` such as the workspace's ``kv_indices``) into ``dst[dst_rows[i]]``
    (``dst[i]`` when ``dst_rows`` is None), for the selected entries (see
    :func:`copy_rows`)."""
    copy_rows(src, dst, rows, dst_rows, mask, num_valid)


def scatter_rows(src: torch.Tensor, dst: torch.Tensor, dst_rows: torch.Tensor) -> None:
    """``dst[dst_rows[i]] = src[i]``: GPU rows written into a (pinned host) pool."""
    copy_rows(src, dst, None, dst_rows)


# -- GPU-only helpers (not run on CPU) -------------------------------------------------
def _device_pointer(host_ptr: int) -> int:
    """The device address of pinned host memory (cuPointerGetAttribute, as Triton does)."""
    libcuda = ctypes.CDLL("libcuda.so.1")
    out = ctypes.c_uint64(0)
    rc = libcuda.cuPointerGetAttribute(ctypes.byref(out), 2, ctypes.c_uint64(host_ptr))
    if rc != 0:
        raise ValueError(f"cuPointerGetAttribute failed ({rc}): is the memory pinned?")
    return out.value


def gather_bandwidth(
    src: torch.Tensor, num_rows: int, iters: int = 20, seed: int = 0
) -> dict[str, float]:
    """Bench helper (GPU): GB/s of :func:`gather_rows` reading ``num_rows`` distinct random
    rows of the pinned ``src`` ``[rows, W]`` into a device buffer, timed with CUDA events
    after one warm-up. Row size (2·D per (slot, head) vs Hkv·2·D per slot) is the
    ``HostKVPool.layer_rows`` / ``slot_rows`` choice the benchmark compares."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(src.shape[0], generator=gen)[:num_rows].to("cuda", torch.int32)
    dst = torch.empty(num_rows, src.shape[1], dtype=src.dtype, device="cuda")
    gather_rows(src, rows, dst)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        gather_rows(src, rows, dst)
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / iters
    row_bytes = src.shape[1] * src.element_size()
    return {
        "ms": ms,
        "rows": num_rows,
        "row_bytes": row_bytes,
        "gbps": num_rows * row_bytes / ms / 1e6,
    }
