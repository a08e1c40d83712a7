"""Encode-at-write: post-RoPE keys -> ParisKV codes in the slot-keyed pool (docs/design.md 1-5).

One fused pass per block of (token, head) rows: load the key, apply its head's fixed
calibration (centre and channel scales, when the pool has them: ``codec.encode`` explains
why they keep the ranking), normalise, rotate (the rotation of
:func:`codec.rotation.rotation_matrix` is a sign flip then one Hadamard block for a
power-of-two D, applied as log2(D) butterfly stages), split into 8-dim blocks, and
write sign ids, packed 3-bit magnitudes and fp16 weights straight to the rows
``slot * Hkv + head`` of the pool, so no [T, Hkv, ...] temporary ever exists. The same
pass adds each token's sign ids to its request's centroid histogram with atomics, which
is what keeps the histograms incremental as decode appends one token at a time.

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
from sglang_pariskv.config import check_kernel_head_dim

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
def _encode_kernel(
    keys_ptr,
    stride_kt,
    stride_kh,
    centre_ptr,
    scale_ptr,
    slot_ptr,
    req_ptr,
    sgn_ptr,
    thr_ptr,
    lev_ptr,
    signs_ptr,
    mags_ptr,
    w_ptr,
    hist_ptr,
    num_rows,
    H: tl.constexpr,
    D: tl.constexpr,
    B: tl.constexpr,
    HAS_HIST: tl.constexpr,
    HAS_CENTRE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    LOG2D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < num_rows
    tok = rows // H
    head = rows % H
    d = tl.arange(0, D)
    k = tl.load(
        keys_ptr + tok[:, None].to(tl.int64) * stride_kt + head[:, None] * stride_kh + d[None, :],
        mask=rmask[:, None],
        other=0.0,
    ).to(tl.float32)
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

    slot = tl.load(slot_ptr + tok, mask=rmask, other=0).to(tl.int64)
    out_row = slot * H + head
    b = tl.arange(0, B)
    m2 = rmask[:, None]
    tl.store(signs_ptr + out_row[:, None] * B + b[None, :], sign.to(tl.uint8), mask=m2)
    mag_base = mags_ptr + out_row[:, None] * (3 * B) + 3 * b[None, :]
    tl.store(mag_base, (word & 0xFF).to(tl.uint8), mask=m2)
    tl.store(mag_base + 1, ((word >> 8) & 0xFF).to(tl.uint8), mask=m2)
    tl.store(mag_base + 2, ((word >> 16) & 0xFF).to(tl.uint8), mask=m2)
    tl.store(w_ptr + out_row[:, None] * B + b[None, :], w.to(tl.float16), mask=m2)
    if HAS_HIST:
        req = tl.load(req_ptr + tok, mask=rmask, other=-1)
        hrow = (req.to(tl.int64) * H + head) * B
        hptr = hist_ptr + (hrow[:, None] + b[None, :]) * 256 + sign
        tl.atomic_add(hptr, 1, mask=m2 & (req >= 0)[:, None], sem="relaxed")


def check_head_rows(name: str, x: torch.Tensor | None, h: int, d: int) -> None:
    """A layer's calibration table (centre or channel scales), which the kernels read as
    raw fp32 ``[Hkv, D]`` rows: None, or exactly that."""
    if x is not None and (x.shape != (h, d) or x.dtype != torch.float32 or not x.is_contiguous()):
        raise ValueError(f"{name} must be a contiguous float32 [{h}, {d}] tensor")


def encode_to_pool(
    keys: torch.Tensor,
    slots: torch.Tensor,
    pool: KeyCodes,
    hist: torch.Tensor | None = None,
    req_ids: torch.Tensor | None = None,
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
    ``weights [S, Hkv, B]`` (contiguous). When ``hist`` (int32 ``[max_reqs, Hkv, B, 256]``)
    is given, ``req_ids [T]`` names each token's histogram row; a negative id skips the
    token (e.g. a padding token). No host sync: safe inside a CUDA graph. The head_dim
    must be a power of two (64, 128, 256...): the rotation is then one Hadamard block,
    which the kernel applies as butterflies (2.2x faster than a D x D product on an H100
    at 32K tokens); other head_dims are refused.
    """
    t, h, d = keys.shape
    check_kernel_head_dim(d)
    b = d // 8
    for name, x, width in (("signs", pool.signs, b), ("mags", pool.mags, 3 * b)):
        if x.shape[1:] != (h, width) or not x.is_contiguous():
            raise ValueError(f"pool.{name} must be contiguous [slots, {h}, {width}]")
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    if t == 0:
        return
    check_head_rows("centre", centre, h, d)
    check_head_rows("scale", scale, h, d)
    sgn, thr, lev = encode_constants(d, seed, keys.device)
    has_hist = hist is not None
    if has_hist and req_ids is None:
        raise ValueError("encode_to_pool: hist given without req_ids")
    rows = t * h
    _encode_kernel[(triton.cdiv(rows, block_m),)](
        keys,
        keys.stride(0),
        keys.stride(1),
        centre if centre is not None else sgn,
        scale if scale is not None else sgn,
        slots,
        req_ids if has_hist else slots,
        sgn,
        thr,
        lev,
        pool.signs,
        pool.mags,
        pool.weights,
        hist if has_hist else pool.signs,
        rows,
        H=h,
        D=d,
        B=b,
        HAS_HIST=has_hist,
        HAS_CENTRE=centre is not None,
        HAS_SCALE=scale is not None,
        BLOCK_M=block_m,
        LOG2D=d.bit_length() - 1,
        num_warps=num_warps,
    )


@triton.jit
def _rebuild_hist_kernel(
    signs_ptr,
    rtt_ptr,
    stride_rtt,
    req_ptr,
    start_ptr,
    end_ptr,
    hist_ptr,
    H: tl.constexpr,
    B: tl.constexpr,
    HBP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    r = tl.program_id(1)
    req = tl.load(req_ptr + r).to(tl.int64)
    pos = tl.load(start_ptr + r) + pid * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = pos < tl.load(end_ptr + r)
    slot = tl.load(rtt_ptr + req * stride_rtt + pos, mask=valid, other=0).to(tl.int64)
    hb = tl.arange(0, HBP)
    m = valid[:, None] & (hb < H * B)[None, :]
    sg = tl.load(signs_ptr + slot[:, None] * (H * B) + hb[None, :], mask=m, other=0)
    hptr = hist_ptr + (req * (H * B) + hb[None, :]) * 256 + sg.to(tl.int32)
    tl.atomic_add(hptr, 1, mask=m, sem="relaxed")


def add_to_histograms(
    signs: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    hist: torch.Tensor,
    max_len: int,
    block_n: int = 128,
) -> None:
    """Add the sign ids of positions [start, end) of each request to ``hist``.

    Extend recounts a request from the pool's codes through ``req_to_token``: a
    radix-cache prefix hit's codes are already there (slot-keyed).
    ``max_len`` bounds end - start (it sizes the grid; the kernel masks the rest).
    """
    _, h, b = signs.shape
    r = req_pool_indices.shape[0]
    if r == 0 or max_len <= 0:
        return
    grid = (triton.cdiv(max_len, block_n), r)
    _rebuild_hist_kernel[grid](
        signs,
        req_to_token,
        req_to_token.stride(0),
        req_pool_indices,
        start,
        end,
        hist,
        H=h,
        B=b,
        HBP=triton.next_power_of_2(h * b),
        BLOCK_N=block_n,
    )


@triton.jit
def _count_new_keys_kernel(
    signs_ptr,
    rtt_ptr,
    stride_rtt,
    req_ptr,
    seq_ptr,
    hist_ptr,
    limit,
    H: tl.constexpr,
    B: tl.constexpr,
    HBP: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    r = tl.program_id(0)
    part = tl.program_id(1)
    seq = tl.load(seq_ptr + r)
    # Rows at or below the limit (CUDA-graph padding rows have seq_len 1) count nothing; the
    # step at which a row reaches limit + 1 counts all its tokens, later steps the new one.
    start = tl.where(seq == limit + 1, 0, seq - 1)
    n = tl.where(seq > limit, seq - start, 0)
    req = tl.load(req_ptr + r).to(tl.int64)
    hb = tl.arange(0, HBP)
    for off in range(part * BLOCK_N, n, SPLIT * BLOCK_N):
        pos = start + off + tl.arange(0, BLOCK_N)
        valid = pos < seq
        slot = tl.load(rtt_ptr + req * stride_rtt + pos, mask=valid, other=0).to(tl.int64)
        m = valid[:, None] & (hb < H * B)[None, :]
        sg = tl.load(signs_ptr + slot[:, None] * (H * B) + hb[None, :], mask=m, other=0)
        hptr = hist_ptr + (req * (H * B) + hb[None, :]) * 256 + sg.to(tl.int32)
        tl.atomic_add(hptr, 1, mask=m, sem="relaxed")


def check_count_limit(limit: int) -> None:
    """The dense limit of :func:`count_new_keys` must be >= 1: CUDA-graph padding rows have
    length 1 and must count nothing."""
    if limit < 1:
        raise ValueError(f"limit {limit}: must be >= 1 (CUDA-graph padding rows have length 1)")


def count_new_keys(
    signs: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    hist: torch.Tensor,
    limit: int,
    split: int = 8,
    block_n: int = 32,
) -> None:
    """Bring each decode row's histogram up to date (``RequestHistograms.count_decode``).

    A row whose ``seq_lens`` reaches ``limit + 1`` counts its tokens [0, seq_len) (its
    histogram was zeroed at extend and left alone while it decoded densely); a row above
    that counts its new key, position seq_len - 1; rows at or below ``limit`` count
    nothing. One launch per layer with a grid fixed by the batch size and no host sync, so
    it is CUDA-graph safe; ``split`` programs per row share a catch-up.
    """
    check_count_limit(limit)
    _, h, b = signs.shape
    r = req_pool_indices.shape[0]
    if r == 0:
        return
    _count_new_keys_kernel[(r, split)](
        signs,
        req_to_token,
        req_to_token.stride(0),
        req_pool_indices,
        seq_lens,
        hist,
        limit,
        H=h,
        B=b,
        HBP=triton.next_power_of_2(h * b),
        SPLIT=split,
        BLOCK_N=block_n,
    )
