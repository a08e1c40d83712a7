"""Budget arithmetic shared by the torch oracle and the GPU kernels.

Candidate counts are ceilings of products of floats; computed two ways they can disagree
at exact integers. Both paths call these functions (tensor in, tensor out, no host sync),
so they agree by construction.
"""

from __future__ import annotations

import torch

from sglang_pariskv.config import ADAPTIVE_RATIO_TABLE, LONG_ZONE_RATIO, ParisKVConfig

# ceil(x - eps): a product like 100 * 0.5 * 0.3 = 15.000000000000002 must give 15.
_CEIL_EPS = 1e-6


def _ceil(x: torch.Tensor) -> torch.Tensor:
    return torch.ceil(x.to(torch.float64) - _CEIL_EPS).clamp_min(0).to(torch.int64)


def zone_lengths(seq_lens: torch.Tensor, config: ParisKVConfig) -> torch.Tensor:
    """Tokens between the sink and the local window, per request (>= 0)."""
    return (seq_lens.to(torch.int64) - config.sink - config.local).clamp_min(0)


def candidate_ratios(zone_len: torch.Tensor, config: ParisKVConfig) -> torch.Tensor:
    """Per-request candidate ratio, float64: ``config.candidate_ratio``, or by zone length
    from :data:`~sglang_pariskv.config.ADAPTIVE_RATIO_TABLE` when unset."""
    z = zone_len.to(torch.float64)
    if config.candidate_ratio is not None:
        return torch.full_like(z, float(config.candidate_ratio))
    cand = torch.full_like(z, LONG_ZONE_RATIO)
    for upper, c in reversed(ADAPTIVE_RATIO_TABLE):  # shortest band applied last wins
        cand = torch.where(z < upper, c, cand)
    return cand


def num_candidates(
    zone_len: torch.Tensor, candidate_ratio: torch.Tensor, config: ParisKVConfig
) -> torch.Tensor:
    """C = ceil(zone * candidate_ratio), raised to top-k (so the budget is filled) and
    capped at the zone."""
    c = _ceil(zone_len.to(torch.float64) * candidate_ratio)
    return torch.minimum(c.clamp_min(config.topk), zone_len.to(torch.int64))


def dense_mask(seq_lens: torch.Tensor, config: ParisKVConfig) -> torch.Tensor:
    """bool per request: :meth:`ParisKVConfig.is_dense` on a tensor (no host sync)."""
    return seq_lens <= config.dense_limit


def step_dense_mask(seq_lens_cpu: torch.Tensor, config: ParisKVConfig) -> torch.Tensor:
    """bool per request of one decode step: :func:`dense_mask`, or every request when
    those above the threshold hold fewer than ``config.min_sparse_tokens`` tokens in all
    (the step then attends densely; see :class:`ParisKVConfig`). Host tensors: the
    serving planner decides per step before anything is launched."""
    dense = dense_mask(seq_lens_cpu, config)
    if config.min_sparse_tokens and int(seq_lens_cpu[~dense].sum()) < config.min_sparse_tokens:
        return torch.ones_like(dense)
    return dense
