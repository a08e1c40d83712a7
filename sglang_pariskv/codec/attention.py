"""Attention over an index set (docs/design.md step 10), the reference for the serving path.

GQA layout as in HF and SGLang: query head h reads KV head h // (Hq / Hkv). Computed in
float32 (float64 for float64 inputs) so it can serve as an oracle.
"""

from __future__ import annotations

import torch

from sglang_pariskv.codec.query import group_queries


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode attention of q [R, Hq, D] over keys/values [R, N, Hkv, D] at
    positions [R, Hkv, M] (where valid). Returns [R, Hq, D] in float32/float64."""
    r, hq, d = q.shape
    hkv = k.shape[2]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = d**-0.5 if scale is None else scale
    qg = group_queries(q.to(dt), hkv)  # [R, H, G, D]
    safe = positions.clamp_min(0)
    heads = torch.arange(hkv, device=q.device)[None, :, None].expand_as(safe)
    reqs = torch.arange(r, device=q.device)[:, None, None].expand_as(safe)
    ks = k[reqs, safe, heads].to(dt)  # [R, H, M, D]
    vs = v[reqs, safe, heads].to(dt)
    logits = torch.einsum("rhgd,rhmd->rhgm", qg, ks) * scale
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("rhgm,rhmd->rhgd", probs, vs)
    return out.reshape(r, hq, d)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode attention over each request's first seq_len keys: the dense baseline."""
    r, n, hkv, _ = k.shape
    pos = torch.arange(n, device=k.device)[None, None, :].expand(r, hkv, n)
    return sparse_attention(q, k, v, pos, pos < seq_lens[:, None, None], scale)
