"""Controlled distortions of real keys and queries for the retrieval stress suite.

Each case turns one layer of a real capture into a trace with a key distribution unlike
the model's own. A distortion is a property of a (hypothetical) model, so its magnitudes
come from a reference trace (the calibration text's, :func:`apply_case`'s ``ref``) and
are applied alike to that trace and to the evaluated one; a calibration of the distorted
model is then what the calibrate tool measures on the distorted reference. Most maps
leave every q·k up to a per-query constant (so the exact top-k and the dense attention are
those of the real trace) and change only what the codes see:

* ``common``: a fixed direction per KV head of weight ``w`` (times the head's RMS key
  norm) added to every key: q·k shifts by a per-query constant. Mean cosine of the unit
  keys to their mean direction goes from SmolLM2's 0.4–0.8 to 0.7 (w 1) … 0.99 (w 8).
* ``bias``: the same direction added *before* RoPE (a k_proj bias, as Qwen2 has): after
  RoPE it turns with the position, fast in high-frequency channel pairs, so no fixed
  centre removes it all. q·k changes by q·RoPE(b, pos), as in a model with a key bias.
* ``outliers``: ``n`` channels of the keys scaled by 8 and the queries' by 1/8 (q·k
  unchanged): outlier channels, which the rotation must spread.
* ``group``: GQA group of ``g`` query heads per KV head: a KV head's own query heads
  first, then the other heads' (real queries of the same step, foreign to these keys).
* ``widen``: head_dim 2·D: KV head j is the concatenation of real KV heads j and j+1 (and
  each query the concatenation of the matching query heads), so q·k is the sum of two
  real heads' logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pariskv_tools.eval.trace import LayerTrace

#: Scale of the outlier channels in the keys (queries get the inverse).
OUTLIER_SCALE = 8.0


@dataclass(frozen=True)
class Case:
    """One stress case; the defaults leave the real trace as it is."""

    name: str
    common: float = 0.0
    bias: float = 0.0
    outliers: int = 0
    group: int | None = None
    widen: bool = False
    #: "all": every stride-th decode step; "late": the last quarter of the steps only.
    steps: str = "all"


def default_cases() -> list[Case]:
    """The suite: each distortion alone at growing strength, then combinations."""
    return [
        Case("real"),
        *(Case(f"common_w{w:g}", common=w) for w in (1, 2, 4, 8)),
        *(Case(f"bias_w{w:g}", bias=w) for w in (2, 8)),
        *(Case(f"outliers_{n}", outliers=n) for n in (4, 16)),
        *(Case(f"gqa_{g}", group=g) for g in (1, 2, 4, 7, 8)),
        Case("head_dim_128", widen=True),
        Case("head_dim_128_common_w4", widen=True, common=4.0),
        Case("gqa_7_common_w4_outliers_4", group=7, common=4.0, outliers=4),
        Case("long_generation_late", steps="late"),
        Case("long_generation_late_common_w4", steps="late", common=4.0),
    ]


def _regroup(queries: torch.Tensor, hkv: int, g: int) -> torch.Tensor:
    """[S, Hq, D] -> [S, hkv * g, D]: KV head h's own query heads first, then the others."""
    s, hq, d = queries.shape
    own = hq // hkv
    if g > hq:
        raise ValueError(f"GQA group {g} needs at least {g} query heads, the trace has {hq}")
    rows = []
    for h in range(hkv):
        order = [(h * own + i) % hq for i in range(hq)]
        rows.extend(order[:g])
    return queries[:, rows]


def _widen(keys, values, queries):
    """Pair KV head j with j+1 (cyclic) into head_dim 2·D: keys, values, and each query
    head with the same member of the next head's group."""
    hkv = keys.shape[1]
    group = queries.shape[1] // hkv
    nxt = [(j + 1) % hkv for j in range(hkv)]
    q_rows = torch.arange(queries.shape[1]).reshape(hkv, group)[nxt].reshape(-1)
    return (
        torch.cat([keys, keys[:, nxt]], -1),
        torch.cat([values, values[:, nxt]], -1),
        torch.cat([queries, queries[:, q_rows]], -1),
    )


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """HF-style RoPE (rotate_half pairs i, i + D/2) of x [H, D] at each position: [N, H, D]."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.to(torch.float64)[:, None] * inv[None]  # [N, D/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x = x.to(torch.float64)
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x[None] * cos[:, None] + rot[None] * sin[:, None]


def _structure(case: Case, trace: LayerTrace, ch: torch.Tensor | None):
    """The shape-changing and channel maps of ``case`` (group, widen, outlier channels
    ``ch``) on one trace: float64 (keys, values, queries)."""
    keys, queries, values = trace.keys.double(), trace.queries.double(), trace.values
    if case.group is not None:
        queries = _regroup(queries, keys.shape[1], case.group)
    if case.widen:
        keys, values, queries = _widen(keys, values, queries)
    if ch is not None:
        keys, queries = keys.clone(), queries.clone()
        keys[..., ch] *= OUTLIER_SCALE
        queries[..., ch] /= OUTLIER_SCALE
    return keys, values, queries


def apply_case(
    case: Case,
    trace: LayerTrace,
    rope_theta: float,
    seed: int = 0,
    ref: LayerTrace | None = None,
) -> LayerTrace:
    """The distorted trace of ``case``. Random choices (outlier channels, the common
    direction) depend on ``seed`` and the layer only; magnitudes (the RMS key norm that
    ``common`` and ``bias`` scale) come from ``ref`` under the same maps (default: the
    trace itself), so two traces of one layer get the same distortion."""
    gen = torch.Generator().manual_seed(seed * 1000 + max(trace.layer, 0))
    d = trace.keys.shape[-1] * (2 if case.widen else 1)
    ch = torch.randperm(d, generator=gen)[: case.outliers] if case.outliers else None
    keys, values, queries = _structure(case, trace, ch)
    ref_keys = keys if ref is None else _structure(case, ref, ch)[0]
    hkv = keys.shape[1]
    direction = torch.nn.functional.normalize(
        torch.randn(hkv, d, generator=gen, dtype=torch.float64), dim=-1
    )
    rms = ref_keys.pow(2).sum(-1).mean(0).sqrt()[:, None]  # [H, 1]
    if case.common:
        keys = keys + case.common * rms * direction
    if case.bias:
        keys = keys + rope(case.bias * rms * direction, torch.arange(keys.shape[0]), rope_theta)
    return LayerTrace(
        keys.float(), values, queries.float(), trace.seq_lens, trace.prompt_len, trace.layer
    )


def common_cosine(keys: torch.Tensor, start: int = 0) -> float:
    """Mean over KV heads of the mean cosine of unit keys (positions >= start) to their
    mean direction: how much one direction dominates the keys (1: all keys parallel)."""
    unit = torch.nn.functional.normalize(keys[start:].double(), dim=-1)
    mean_dir = torch.nn.functional.normalize(unit.mean(0), dim=-1)
    return float((unit * mean_dir[None]).sum(-1).mean())
