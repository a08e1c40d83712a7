"""Byte layout of one ParisKV record: what a slot's code costs in memory.

Record of one (token, KV head), B = head_dim / 8:
  bytes [0, B)        sign ids, one byte per block
  bytes [B, 4B)       3-bit magnitudes, 3 bytes per block
  bytes [4B, 6B)      weights, float16 little-endian, 2 bytes per block
6B bytes in all: 96 B at head_dim 128, 48 B at head_dim 64. A pool that ranks candidates
by the stored keys (``rerank="keys"``) keeps only the sign ids: B bytes.
"""

from __future__ import annotations

import torch

from sglang_pariskv.codec.encode import KeyCodes
from sglang_pariskv.support import check_head_dim


def record_bytes(head_dim: int) -> int:
    """Bytes of one (token, KV head) record."""
    check_head_dim(head_dim)
    return 6 * (head_dim // 8)


def signature_bytes(head_dim: int) -> int:
    """Bytes of one (token, KV head) sign signature: the part of the record the collision
    stage reads, and all a pool that reranks by the keys stores."""
    check_head_dim(head_dim)
    return head_dim // 8


def codes_to_bytes(codes: KeyCodes) -> torch.Tensor:
    """Pack codes into uint8 records [..., 6B]."""
    w = codes.weights.contiguous().view(torch.uint8)  # [..., 2B], native (little) endian
    return torch.cat([codes.signs, codes.mags, w], dim=-1)


def codes_from_bytes(records: torch.Tensor) -> KeyCodes:
    """Inverse of :func:`codes_to_bytes`."""
    if records.dtype != torch.uint8 or records.shape[-1] % 6:
        raise ValueError(
            f"ParisKV records must be uint8 with a last dim divisible by 6, got "
            f"{records.dtype} {tuple(records.shape)}"
        )
    b = records.shape[-1] // 6
    return KeyCodes(
        signs=records[..., :b],
        mags=records[..., b : 4 * b],
        weights=records[..., 4 * b :].contiguous().view(torch.float16),
    )
