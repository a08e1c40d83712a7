"""Key encoding: sign ids, 3-bit magnitudes and per-block weights (docs/design.md steps 1–5).

Keys are first calibrated: k' = (k - m) / s, with m a fixed centre and s fixed positive
channel scales per (layer, KV head) (m = 0 and s = 1 unless a calibration file gives
them, see :mod:`sglang_pariskv.calibration`); the query side multiplies by the same s
(:mod:`.query`). Since (s ∘ q)·((k - m) / s) = q·k - q·m, every query ranks the keys
exactly as q·k does, while the codes see a better-conditioned distribution:

* the centre removes a large common direction, which otherwise fixes most sign bits of
  R·k whatever the key;
* the scales balance channel magnitudes between keys and queries (s_c = √(σ_k,c / ρ_q,c),
  key spread over query RMS per channel): an outlier channel of the keys (or the rotating
  image of a pre-RoPE key bias) otherwise dominates R·k and its signs, although the
  queries barely weigh it.

Attention reads the real keys. m and s never depend on a request, so a slot's code does
not depend on which request wrote it (radix sharing) and nothing is refit as generation
goes on. Below, k stands for the calibrated key.

Per key and 8-dim block b of the rotated unit key k~:
  * ``signs[b]``: one byte, bit j set iff k~_bj >= 0. It is both the coarse (collision)
    code and the sign half of the fine code, so signs are stored once.
  * ``mags[b]``: eight 3-bit indices t_j of |u_bj| (u_b = k~_b / r_b) into the Lloyd–Max
    levels, packed little-endian into 3 bytes.
  * ``weights[b]``: w_b = ||k|| r_b / alpha_b with alpha_b = <v_b, u_b> and
    v_b = sign(u_b) * a[t]. Dividing by alpha_b makes <v_b, q>/alpha_b an unbiased-style
    estimate of <u_b, q> (the quantisation error is orthogonal-ish to u_b), and folding the
    key norm in lets the reranker use one multiply-add per block.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sglang_pariskv.codec.levels import BLOCK, magnitude_levels, magnitude_thresholds
from sglang_pariskv.codec.rotation import rotate
from sglang_pariskv.support import check_head_dim

#: float16 cannot hold more; a larger weight is clamped (keys that large do not occur
#: in practice, and a clamped weight still ranks the key at the top).
_FP16_MAX = 65504.0


class KeyCodes(NamedTuple):
    """ParisKV codes of keys with leading shape ``S`` and B = head_dim / 8 blocks."""

    signs: torch.Tensor  #: uint8 [*S, B]
    mags: torch.Tensor  #: uint8 [*S, 3 * B]
    weights: torch.Tensor  #: float16 [*S, B]

    def index(self, *idx) -> KeyCodes:
        """Apply the same indexing to the leading dims of all three tensors."""
        return KeyCodes(self.signs[idx], self.mags[idx], self.weights[idx])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def split_blocks(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D/8, 8]."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


_BIT_WEIGHTS = torch.tensor([1 << j for j in range(BLOCK)], dtype=torch.int32)


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """bool [..., 8] -> uint8 [...] with bit j = positive[..., j]."""
    w = _BIT_WEIGHTS.to(positive.device)
    return (positive.to(torch.int32) * w).sum(-1).to(torch.uint8)


def unpack_signs(signs: torch.Tensor) -> torch.Tensor:
    """uint8 [...] -> float ±1 [..., 8] (bit set = +1)."""
    w = _BIT_WEIGHTS.to(signs.device)
    bits = (signs.to(torch.int32)[..., None] & w) != 0
    return bits.to(torch.float32) * 2 - 1


def pack_magnitudes(t: torch.Tensor) -> torch.Tensor:
    """int [..., B, 8] values 0..7 -> uint8 [..., 3B] (24-bit little-endian word per block)."""
    shifts = torch.arange(0, 3 * BLOCK, 3, device=t.device, dtype=torch.int32)
    word = (t.to(torch.int32) << shifts).sum(-1)
    b = torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], -1)
    return b.to(torch.uint8).reshape(*t.shape[:-2], 3 * t.shape[-2])


def unpack_magnitudes(mags: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3B] -> int64 [..., B, 8] level indices."""
    by = mags.to(torch.int32).reshape(*mags.shape[:-1], mags.shape[-1] // 3, 3)
    word = by[..., 0] | (by[..., 1] << 8) | (by[..., 2] << 16)
    shifts = torch.arange(0, 3 * BLOCK, 3, device=mags.device, dtype=torch.int32)
    return ((word[..., None] >> shifts) & 7).to(torch.int64)


def encode_keys(
    keys: torch.Tensor,
    seed: int = 0,
    centre: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> KeyCodes:
    """Encode keys ``[..., D]`` (fp16/bf16/fp32/fp64, CPU or CUDA) into :class:`KeyCodes`.

    ``centre`` m and ``scale`` s: the fixed calibration, each broadcastable to ``keys``
    (e.g. ``[Hkv, D]`` for keys ``[T, Hkv, D]``); the code is that of ``(keys - m) / s``.
    None: m = 0, s = 1.
    """
    check_head_dim(keys.shape[-1])
    dt = _compute_dtype(keys)
    k = keys.to(dt)
    if centre is not None:
        k = k - centre.to(device=k.device, dtype=dt)
    if scale is not None:
        k = k / scale.to(device=k.device, dtype=dt)
    norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True)
    unit = k / norm.clamp_min(torch.finfo(dt).tiny)
    blocks = split_blocks(rotate(unit, seed))  # [..., B, 8]
    r = torch.linalg.vector_norm(blocks, dim=-1)  # [..., B]
    u = blocks / r.clamp_min(torch.finfo(dt).tiny)[..., None]
    positive = blocks >= 0
    t = torch.bucketize(u.abs(), magnitude_thresholds(dt, k.device))
    a = magnitude_levels(dt, k.device)[t]
    alpha = (a * u.abs()).sum(-1)  # <v, u> with v = sign(u) a[t]
    w = torch.where(r > 0, norm * r / alpha.clamp_min(torch.finfo(dt).tiny), 0.0)
    return KeyCodes(
        signs=pack_signs(positive),
        mags=pack_magnitudes(t),
        weights=w.clamp(max=_FP16_MAX).to(torch.float16),
    )


def decode_directions(codes: KeyCodes) -> torch.Tensor:
    """The quantised block directions v_b = sign * a[t], float32 [..., B, 8]."""
    levels = magnitude_levels(torch.float32, codes.mags.device)
    return unpack_signs(codes.signs) * levels[unpack_magnitudes(codes.mags)]
