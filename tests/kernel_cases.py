"""Scenario builders and the Triton-interpreter guard shared by the kernel tests.

A scenario is what SGLang hands the attention backend at a decode step: a slot-keyed code
pool filled by :func:`encode_to_pool`, a ``req_to_token`` table mapping each request's
positions to scattered slots, and the batch's ``req_pool_indices`` / ``seq_lens``.
:func:`padded_codes` gathers the pool back into the padded per-request layout that
:func:`codec.pipeline.retrieve` takes, so a test feeds the codec exactly the codes the
kernels read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_pariskv.codec.encode import KeyCodes
from sglang_pariskv.kernels.encode import encode_to_pool


@dataclass
class Scenario:
    keys: list[torch.Tensor]  #: per request [seq_len, Hkv, D]
    pool: KeyCodes  #: [slots, Hkv, ...]
    req_to_token: torch.Tensor  #: int32 [max_reqs, max_context]
    req_pool_indices: torch.Tensor  #: int32 [R]
    seq_lens: torch.Tensor  #: int32 [R]
    key_pool: torch.Tensor  #: [slots, Hkv, D]: every key at its slot (the KV pool's K buffer)


def empty_pool(slots: int, num_kv_heads: int, head_dim: int, device) -> KeyCodes:
    b = head_dim // 8
    return KeyCodes(
        signs=torch.zeros(slots, num_kv_heads, b, dtype=torch.uint8, device=device),
        mags=torch.zeros(slots, num_kv_heads, 3 * b, dtype=torch.uint8, device=device),
        weights=torch.zeros(slots, num_kv_heads, b, dtype=torch.float16, device=device),
    )


def make_scenario(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    max_context: int,
    device,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    keys_fn=None,
) -> Scenario:
    """Random keys (or ``keys_fn(r, n, gen)``) for each request, encoded into scattered
    slots (slot 0 stays padding, as in SGLang); request r uses req_pool_index ``2r + 1``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = len(seq_lens)
    total = sum(seq_lens)
    slots_all = torch.randperm(total + 16, generator=gen)[:total] + 1
    pool = empty_pool(total + 17, num_kv_heads, head_dim, device)
    key_pool = torch.zeros(total + 17, num_kv_heads, head_dim, dtype=dtype, device=device)
    max_reqs = 2 * r + 1
    rtt = torch.zeros(max_reqs, max_context, dtype=torch.int32, device=device)
    rpi = torch.arange(r, dtype=torch.int32) * 2 + 1
    keys, off = [], 0
    for i, n in enumerate(seq_lens):
        if keys_fn is None:
            k = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        else:
            k = keys_fn(i, n, gen)
        k = k.to(dtype).to(device)
        slots = slots_all[off : off + n].to(device)
        off += n
        rtt[int(rpi[i]), :n] = slots.to(torch.int32)
        encode_to_pool(k, slots, pool)
        key_pool[slots] = k
        keys.append(k)
    rpi, seq = rpi.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return Scenario(
        keys=keys, pool=pool, req_to_token=rtt, req_pool_indices=rpi, seq_lens=seq,
        key_pool=key_pool,
    )  # fmt: skip


def padded_keys(sc: Scenario) -> torch.Tensor:
    """The requests' keys [R, Nmax, Hkv, D] in float64, zero past each request's length."""
    n = int(sc.seq_lens.max())
    out = torch.zeros(len(sc.keys), n, *sc.keys[0].shape[1:], dtype=torch.float64)
    for i, k in enumerate(sc.keys):
        out[i, : k.shape[0]] = k.double().cpu()
    return out.to(sc.key_pool.device)


def padded_codes(sc: Scenario) -> KeyCodes:
    """Pool codes gathered to [R, Nmax, Hkv, ...] (padding rows are slot 0's codes)."""
    n = int(sc.seq_lens.max())
    slots = sc.req_to_token[sc.req_pool_indices.long(), :n].long()
    return KeyCodes(sc.pool.signs[slots], sc.pool.mags[slots], sc.pool.weights[slots])
