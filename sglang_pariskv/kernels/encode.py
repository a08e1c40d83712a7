"""Encode-at-write: post-RoPE keys -> ParisKV codes in the slot-keyed pool (docs/design.md 1-5).

One fused pass per block of (token, head) rows: load the key, apply its head's fixed
calibration (centre and channel scales, when the pool has them: ``codec.encode`` explains
why they keep the ranking), normalise, rotate (the rotation of
:func:`codec.rotation.rotation_matrix` is a sign flip then one Hadamard block for a
power-of-two D, applied as log2(D) butterfly stages), split into 8-dim blocks, and
write sign ids, packed 3-bit magnitudes and fp16 weights straight to the rows
``slot * Hkv + head`` of the pool, so no [T, Hkv, ...] temporary ever exists. The
kernel knows slots, not requests: retrieval reaches a request's codes through
``req_to_token``, so a radix-cache prefix hit reads the codes another request wrote.

Bit-exactness with :func:`codec.encode.encode_keys`: the arithmetic is the same fp32 formula,
but summation order (norms, the butterflies) differs, so a magnitude within float rounding
of a Lloyd-Max threshold (or a rotated coordinate within rounding of 0) can land on the other
side. tests/test_kernels_encode.py measures and bounds that rate.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from sglang_pariskv.codec.encode import KeyCodes
from sglang_pariskv.codec.levels import magnitude_levels, magnitude_thresholds
from sglang_pariskv.codec.rotation import rotation_signs
from sglang_pariskv.support import check_kernel_head_dim

_FP16_MAX = tl.constexpr(65504.0)
_TINY = tl.constexpr(
    1.1754943508222875e-38
)  # torch.finfo(torch.float32).tiny, what codec clamps with


@lru_cache(maxsize=32)
def _constants(head_dim: int, seed: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(rotation signs fp32 [D], thresholds fp32 [8] (padded), levels fp32 [8]) on
    ``device``."""
    signs = rotation_signs(head_dim, seed).to(torch.float32).to(device)
    thr = torch.full((8,), float("inf"), dtype=torch.float32)
    thr[:7] = magnitude_thresholds(torch.float32)
    return signs, thr.to(device), magnitude_levels(torch.float32, device)


def encode_constants(head_dim: int, seed: int, device) -> tuple[torch.Tensor, ...]:
    """Device constants the encode kernel reads; cache them before CUDA-graph capture."""
    return _constants(head_dim, seed, torch.device(device))


@triton.jit
def _fwht(x, BLOCK_M: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr):
    """Unnormalised Walsh-Hadamard transform (Sylvester order) of each row of x [BM, D]:
    LOG2D butterfly stages (a, b) -> (a + b, a - b) at strides 1, 2, 4, ..."""
    for stage in tl.static_range(LOG2D):
        y = tl.reshape(x, (BLOCK_M, D // (2 << stage), 2, 1 << stage))
        a, b = tl.split(tl.permute(y, (0, 1, 3, 2)))
        y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
        x = tl.reshape(y, (BLOCK_M, D))
    return x


@triton.jit
def _encode_rows(
    key_rows,
    rmask,
    head,
    out_row,
    centre_ptr,
    scale_ptr,
    sgn_ptr,
    thr_ptr,
    lev_ptr,
    signs_ptr,
    mags_ptr,
    w_ptr,
    D: tl.constexpr,
    B: tl.constexpr,
    HAS_CENTRE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RECORDS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    LOG2D: tl.constexpr,
):
    """Encode the keys at pointers ``key_rows`` [BM] (D contiguous values each) of KV heads
    ``head`` [BM] into code rows ``out_row`` [BM]: the sign ids, and with ``RECORDS`` the
    magnitudes and weights."""
    d = tl.arange(0, D)
    k = tl.load(key_rows[:, None] + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    if HAS_CENTRE:  # k - m, m the head's fixed centre (fp32 [H, D], contiguous)
        k = k - tl.load(centre_ptr + head[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
    if HAS_SCALE:  # (k - m) / s, s the head's channel scales (fp32 [H, D], contiguous, > 0)
        k = k / tl.load(scale_ptr + head[:, None] * D + d[None, :], mask=rmask[:, None], other=1.0)
    norm = tl.sqrt(tl.sum(k * k, axis=1))
    unit = k / tl.maximum(norm, _TINY)[:, None]
    # R x = H (s * x) / sqrt(D): D log D adds instead of a D x D product
    sgn = tl.load(sgn_ptr + d)  # the diagonal signs s
    x = _fwht(unit * sgn[None, :], BLOCK_M, D, LOG2D) * (1.0 / tl.sqrt(D * 1.0))
    xb = tl.reshape(x, (BLOCK_M, B, 8))
    r = tl.sqrt(tl.sum(xb * xb, axis=2))  # [BLOCK_M, B]
    u = xb / tl.maximum(r, _TINY)[:, :, None]
    au = tl.abs(u)
    t = tl.zeros((BLOCK_M, B, 8), dtype=tl.int32)
    for i in tl.static_range(7):
        t += (au > tl.load(thr_ptr + i)).to(tl.int32)
    a = tl.zeros((BLOCK_M, B, 8), dtype=tl.float32)
    for i in tl.static_range(8):
        a = tl.where(t == i, tl.load(lev_ptr + i), a)
    alpha = tl.sum(a * au, axis=2)
    w = tl.where(r > 0, norm[:, None] * r / tl.maximum(alpha, _TINY), 0.0)
    w = tl.minimum(w, _FP16_MAX)
    j = tl.arange(0, 8)
    sign = tl.sum((xb >= 0).to(tl.int32) << j[None, None, :], axis=2)  # [BLOCK_M, B]
    word = tl.sum(t << (3 * j)[None, None, :], axis=2)

    b = tl.arange(0, B)
    m2 = rmask[:, None]
    tl.store(signs_ptr + out_row[:, None] * B + b[None, :], sign.to(tl.uint8), mask=m2)
    if RECORDS:  # (else the records' arithmetic is dead code)
        mag_base = mags_ptr + out_row[:, None] * (3 * B) + 3 * b[None, :]
        tl.store(mag_base, (word & 0xFF).to(tl.uint8), mask=m2)
        tl.store(mag_base + 1, ((word >> 8) & 0xFF).to(tl.uint8), mask=m2)
        tl.store(mag_base + 2, ((word >> 16) & 0xFF).to(tl.uint8), mask=m2)
        tl.store(w_ptr + out_row[:, None] * B + b[None, :], w.to(tl.float16), mask=m2)


@triton.jit
def _encode_kernel(
    keys_ptr,
    stride_kt,
    stride_kh,
    centre_ptr,
    scale_ptr,
    slot_ptr,
    sgn_ptr,
    thr_ptr,
    lev_ptr,
    signs_ptr,
    mags_ptr,
    w_ptr,
    num_rows,
    H: tl.constexpr,
    D: tl.constexpr,
    B: tl.constexpr,
    HAS_CENTRE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RECORDS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    LOG2D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < num_rows
    tok = rows // H
    head = rows % H
    key_rows = keys_ptr + tok.to(tl.int64) * stride_kt + head * stride_kh
    slot = tl.load(slot_ptr + tok, mask=rmask, other=0).to(tl.int64)
    _encode_rows(
        key_rows, rmask, head, slot * H + head, centre_ptr, scale_ptr, sgn_ptr, thr_ptr,
        lev_ptr, signs_ptr, mags_ptr, w_ptr, D, B, HAS_CENTRE, HAS_SCALE, RECORDS, BLOCK_M,
        LOG2D,
    )  # fmt: skip


@triton.jit
def _encode_layers_kernel(
    key_table,
    stride_kt,
    stride_kh,
    centres_ptr,
    scales_ptr,
    slot_ptr,
    sgn_ptr,
    thr_ptr,
    lev_ptr,
    signs_table,
    mags_table,
    w_table,
    num_rows,
    KEY_DTYPE: tl.constexpr,
    H: tl.constexpr,
    D: tl.constexpr,
    B: tl.constexpr,
    HAS_CENTRE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RECORDS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    LOG2D: tl.constexpr,
):
    pid = tl.program_id(0)
    layer = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < num_rows
    tok = rows // H
    head = rows % H
    slot = tl.load(slot_ptr + tok, mask=rmask, other=0).to(tl.int64)
    # this layer's K buffer and code tensors, through tables of their addresses
    keys_ptr = tl.load(key_table + layer).to(tl.pointer_type(KEY_DTYPE))
    signs_ptr = tl.load(signs_table + layer).to(tl.pointer_type(tl.uint8))
    mags_ptr = tl.load(mags_table + layer).to(tl.pointer_type(tl.uint8))
    w_ptr = tl.load(w_table + layer).to(tl.pointer_type(tl.float16))
    key_rows = keys_ptr + slot * stride_kt + head * stride_kh  # the key stored at the slot
    _encode_rows(
        key_rows, rmask, head, slot * H + head, centres_ptr + layer * H * D,
        scales_ptr + layer * H * D, sgn_ptr, thr_ptr, lev_ptr, signs_ptr, mags_ptr, w_ptr,
        D, B, HAS_CENTRE, HAS_SCALE, RECORDS, BLOCK_M, LOG2D,
    )  # fmt: skip


def check_head_rows(
    name: str, x: torch.Tensor | None, h: int, d: int, layers: int | None = None
) -> None:
    """A calibration table (centre or channel scales), which the kernels read as raw fp32
    ``[Hkv, D]`` rows: None, or exactly that (``[layers, Hkv, D]`` with ``layers``)."""
    shape = (h, d) if layers is None else (layers, h, d)
    if x is not None and (x.shape != shape or x.dtype != torch.float32 or not x.is_contiguous()):
        dims = ", ".join(map(str, shape))
        raise ValueError(f"{name} must be a contiguous float32 [{dims}] tensor")


def encode_to_pool(
    keys: torch.Tensor,
    slots: torch.Tensor,
    pool: KeyCodes,
    seed: int = 0,
    block_m: int = 16,
    num_warps: int = 4,
    centre: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> None:
    """Encode keys ``[T, Hkv, D]`` into ``pool`` rows ``slots`` (int32/int64 ``[T]``).

    ``centre`` and ``scale``: float32 ``[Hkv, D]`` contiguous, the fixed calibration of this
    layer's heads (the code is that of ``(keys - centre) / scale``); None: 0 and 1.
    Persistent tensors read by the kernel, so a captured CUDA graph keeps reading them.

    pool: :class:`KeyCodes` of pool tensors ``signs [S, Hkv, B]``, ``mags [S, Hkv, 3B]``,
    ``weights [S, Hkv, B]`` (contiguous; mags and weights of width 0: signs only). No host
    sync: safe inside a CUDA graph. The head_dim must be a power of two (64, 128, 256...):
    the rotation is then one Hadamard block, which the kernel applies as butterflies (2.2x
    faster than a D x D product on an H100 at 32K tokens); other head_dims are refused.
    """
    t, h, d = keys.shape
    check_kernel_head_dim(d)
    b = d // 8
    records = pool_has_records(pool, h, b)
    if not pool.signs.is_contiguous():
        raise ValueError(f"pool.signs must be contiguous [slots, {h}, {b}]")
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    if t == 0:
        return
    check_head_rows("centre", centre, h, d)
    check_head_rows("scale", scale, h, d)
    sgn, thr, lev = encode_constants(d, seed, keys.device)
    rows = t * h
    _encode_kernel[(triton.cdiv(rows, block_m),)](
        keys,
        keys.stride(0),
        keys.stride(1),
        centre if centre is not None else sgn,
        scale if scale is not None else sgn,
        slots,
        sgn,
        thr,
        lev,
        pool.signs,
        pool.mags,
        pool.weights,
        rows,
        H=h,
        D=d,
        B=b,
        HAS_CENTRE=centre is not None,
        HAS_SCALE=scale is not None,
        RECORDS=records,
        BLOCK_M=block_m,
        LOG2D=d.bit_length() - 1,
        num_warps=num_warps,
    )


def pool_has_records(pool: KeyCodes, h: int, b: int) -> bool:
    """Whether ``pool`` stores 3-bit records (mags ``[S, h, 3b]``, weights ``[S, h, b]``)
    or the signs only (both of width 0); any other shape is an error."""
    widths = (pool.mags.shape[-1], pool.weights.shape[-1])
    if pool.signs.shape[1:] != (h, b) or widths not in ((3 * b, b), (0, 0)):
        raise ValueError(
            f"pool of signs {tuple(pool.signs.shape)}, mags {tuple(pool.mags.shape)}, weights "
            f"{tuple(pool.weights.shape)}: expected [slots, {h}, {b}], and [slots, {h}, {3 * b}] "
            f"and [slots, {h}, {b}] (or width 0 for a pool without records)"
        )
    return widths[0] > 0


#: torch dtype -> Triton element type of a K buffer :func:`encode_layers_to_pool` reads.
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def address_table(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """int64 [len(tensors)] of the tensors' addresses, for a kernel that reaches one tensor
    per layer. The tensors must outlive the table (a captured CUDA graph reads it)."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


def encode_layers_to_pool(
    key_buffers: list[torch.Tensor],
    slots: torch.Tensor,
    pool: list[KeyCodes],
    tables: tuple[torch.Tensor, ...],
    seed: int = 0,
    centres: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    block_m: int = 16,
    num_warps: int = 4,
) -> None:
    """Encode, for every layer, the key stored at each of ``slots`` [T] into that layer's
    code rows: one launch for all layers (:func:`encode_to_pool` per layer costs one
    launch each, most of a dense decode step's ParisKV work at small batches).

    ``key_buffers``: the KV pool's K buffers, one contiguous ``[S, Hkv, D]`` per layer;
    ``pool``: the code pool's :class:`KeyCodes` per layer; ``tables``: (keys, signs, mags,
    weights) address tables of those (:func:`address_table`), made once and kept, so a
    captured CUDA graph reads the same memory. ``centres`` / ``scales``: float32
    ``[layers, Hkv, D]`` contiguous, or None. No host sync: safe inside a CUDA graph.
    """
    _, h, d = key_buffers[0].shape
    check_kernel_head_dim(d)
    layers, t = len(key_buffers), slots.shape[0]
    if len(pool) != layers or any(len(x) != layers for x in tables):
        raise ValueError(
            f"{layers} K buffers, {len(pool)} code layers, tables of {[len(x) for x in tables]}"
        )
    check_head_rows("centres", centres, h, d, layers)
    check_head_rows("scales", scales, h, d, layers)
    first = key_buffers[0]
    if any(k.shape != first.shape or k.stride() != first.stride() for k in key_buffers):
        raise ValueError("the K buffers of all layers must share one shape and layout")
    if first.stride(-1) != 1 or first.dtype not in _TL_DTYPES:
        raise ValueError(f"K buffers must have contiguous rows of {list(_TL_DTYPES)}")
    records = all(pool_has_records(p, h, d // 8) for p in pool)
    if t == 0:
        return
    sgn, thr, lev = encode_constants(d, seed, first.device)
    rows = t * h
    _encode_layers_kernel[(triton.cdiv(rows, block_m), layers)](
        tables[0],
        first.stride(0),
        first.stride(1),
        centres if centres is not None else sgn,
        scales if scales is not None else sgn,
        slots,
        sgn,
        thr,
        lev,
        tables[1],
        tables[2],
        tables[3],
        rows,
        KEY_DTYPE=_TL_DTYPES[first.dtype],
        H=h,
        D=d,
        B=d // 8,
        HAS_CENTRE=centres is not None,
        HAS_SCALE=scales is not None,
        RECORDS=records,
        BLOCK_M=block_m,
        LOG2D=d.bit_length() - 1,
        num_warps=num_warps,
    )
