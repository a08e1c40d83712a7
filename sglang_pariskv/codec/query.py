"""Query side of retrieval (docs/design.md step 6): one rotated unit query per KV head.

All query heads of a GQA group read the same keys, so retrieval runs once per KV head
with the group's mean query: the mean is the query whose inner product with each key is
the group's average logit, which is what the group's attention mass follows on average.

With calibration channel scales s (:mod:`.encode`), the query is s ∘ q: the keys were
divided by s, so the inner products, and the ranking, are those of q and the centred keys.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sglang_pariskv.codec.encode import split_blocks
from sglang_pariskv.codec.rotation import rotate


class PreparedQuery(NamedTuple):
    blocks: torch.Tensor  #: float32 [R, Hkv, B, 8]: rotated unit query, split in blocks
    norm: torch.Tensor  #: float32 [R, Hkv]: norm of the group-mean query


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[R, Hq, D] -> [R, Hkv, G, D] with query head h in KV group h // G (HF/SGLang order)."""
    r, hq, d = q.shape
    if hq % num_kv_heads:
        raise ValueError(
            f"{hq} query heads cannot be grouped over {num_kv_heads} KV heads (GQA needs "
            "the query head count to be a multiple of the KV head count)"
        )
    return q.reshape(r, num_kv_heads, hq // num_kv_heads, d)


def prepare_query(
    q: torch.Tensor, num_kv_heads: int, seed: int = 0, scale: torch.Tensor | None = None
) -> PreparedQuery:
    """Group-mean, scale, normalise, rotate and split decode queries ``[R, Hq, D]``.

    ``scale``: the calibration's channel scales of the keys' heads, ``[Hkv, D]`` (None: 1)."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    mean = group_queries(q.to(dt), num_kv_heads).mean(dim=2)  # [R, Hkv, D]
    if scale is not None:
        mean = mean * scale.to(device=mean.device, dtype=dt)
    norm = torch.linalg.vector_norm(mean, dim=-1)
    unit = mean / norm.clamp_min(torch.finfo(dt).tiny)[..., None]
    return PreparedQuery(blocks=split_blocks(rotate(unit, seed)), norm=norm)
