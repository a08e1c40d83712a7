"""ParisKV as a transformers attention function: the codec driving a real model on CPU.

This is the reference integration used by the demo and by quality tests: prefill attends
densely (as the serving path does) and encodes every key once; each decode step encodes
only the new key, retrieves with ``codec.retrieve`` and attends with
``codec.sparse_attention``; with a calibration file it encodes and retrieves with the
file's per-layer key centres and channel scales, as the serving path does with
``--pariskv-calibration``. It also measures what a decode step lost against dense
attention (recall of the exact top-k, attention mass). Batch size 1 (the demo's case); the
SGLang backend is the batched, GPU path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sglang_pariskv.calibration import Calibration
from sglang_pariskv.codec import KeyCodes, encode_keys, retrieve
from sglang_pariskv.codec.attention import sparse_attention
from sglang_pariskv.codec.query import group_queries
from sglang_pariskv.config import ParisKVConfig

ATTN_NAME = "pariskv"


@dataclass
class StepMetrics:
    """What one decode step of one layer attended and how much of dense it kept."""

    layer: int
    context: int
    attended: float  #: tokens attended per KV head (mean over heads)
    recall_at_k: float  #: |retrieved ∩ exact top-k| / k over the zone (mean over heads)
    mass_recall: float  #: softmax mass (dense) of the attended set (mean over query heads)


@dataclass
class _LayerState:
    codes: KeyCodes | None = None  # [1, N, Hkv, ...]


def exact_retrieval(q: torch.Tensor, keys: torch.Tensor, config: ParisKVConfig):
    """Sink + local window + the zone's top-k by the exact inner product of the GQA
    group-mean query (the query ParisKV's codes approximate), as (positions, valid)
    ``[1, Hkv, M]``: the ceiling of any retrieval at this budget, which tells what the
    budget itself loses from what the codes lose. q: [1, Hq, D]; keys: [1, N, Hkv, D]."""
    n, hkv = keys.shape[1], keys.shape[2]
    lo = min(config.sink, n)
    hi = max(n - config.local, lo)
    qm = group_queries(q.float(), hkv).mean(2)  # [1, Hkv, D]
    scores = torch.einsum("rhd,rnhd->rhn", qm, keys[:, lo:hi].float())
    top = scores.topk(min(config.topk, hi - lo), dim=-1).indices + lo
    fixed = torch.cat([torch.arange(lo), torch.arange(hi, n)]).to(keys.device)
    positions = torch.cat([fixed[None, None].expand(1, hkv, -1), top], -1)
    return positions, torch.ones_like(positions, dtype=torch.bool)


@dataclass
class ParisKVAttention:
    """Callable registered as transformers attention implementation ``"pariskv"``.

    ``selection="exact"`` swaps ParisKV's retrieval for :func:`exact_retrieval` (same
    sink, window and top-k), the reference that bounds what any retrieval can do.
    ``calibration``: a loaded calibration file (its layers and head_dim must be the
    model's; checked at the first call), or None for plain codes."""

    config: ParisKVConfig
    dense_layers: frozenset[int] = frozenset()
    measure: bool = True
    selection: str = "pariskv"
    calibration: Calibration | None = None
    metrics: list[StepMetrics] = field(default_factory=list)
    _layers: dict[int, _LayerState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.selection not in ("pariskv", "exact"):
            raise ValueError(f"selection={self.selection!r}: expected 'pariskv' or 'exact'")

    def reset(self) -> None:
        """Forget cached codes and metrics (call before a new sequence)."""
        self._layers.clear()
        self.metrics.clear()

    def _encode_new(self, layer: int, keys: torch.Tensor) -> _LayerState:
        """Encode keys past the cached count (keys: [1, N, Hkv, D])."""
        st = self._layers.setdefault(layer, _LayerState())
        have = 0 if st.codes is None else st.codes.signs.shape[1]
        if keys.shape[1] < have:
            raise RuntimeError(
                "the KV cache shrank between calls: call ParisKVAttention.reset() before "
                "starting a new sequence"
            )
        if keys.shape[1] > have:
            centre, scale = self._calibration(layer, keys.shape[2])
            new = encode_keys(keys[:, have:], self.config.rotation_seed, centre, scale)
            if st.codes is None:
                st.codes = new
            else:
                st.codes = KeyCodes(*(torch.cat([a, b], 1) for a, b in zip(st.codes, new)))
        return st

    def _calibration(self, layer: int, num_kv_heads: int):
        """(centre, scales) [Hkv, D] of ``layer``, or (None, None) without a calibration."""
        cal = self.calibration
        if cal is None:
            return None, None
        if not 0 <= layer < cal.num_layers or cal.num_kv_heads != num_kv_heads:
            raise ValueError(
                f"calibration {cal.path} has {cal.num_layers} layers x {cal.num_kv_heads} KV "
                f"heads; this model's layer {layer} has {num_kv_heads} KV heads"
            )
        scale = None if cal.scales is None else cal.scales[layer]
        return cal.centres[layer], scale

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if query.shape[0] != 1:
            raise ValueError("ParisKVAttention (transformers) supports batch size 1 only")
        layer = module.layer_idx
        keys = key.transpose(1, 2)  # [1, N, Hkv, D]
        st = self._encode_new(layer, keys)
        n = keys.shape[1]
        if query.shape[2] > 1 or layer in self.dense_layers or self.config.is_dense(n):
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout, scaling, **kwargs
            )
        q = query[:, :, 0, :]  # [1, Hq, D]
        values = value.transpose(1, 2)
        if self.selection == "exact":
            positions, valid = exact_retrieval(q, keys, self.config)
        else:
            scale = self._calibration(layer, keys.shape[2])[1]
            by_keys = keys if self.config.rerank == "keys" else None
            ret = retrieve(q, st.codes, torch.tensor([n]), self.config, scale=scale, keys=by_keys)
            positions, valid = ret.positions, ret.valid
        out = sparse_attention(q, keys, values, positions, valid, scaling)
        if self.measure:
            self.metrics.append(self._measure(layer, q, keys, positions, valid, scaling))
        return out[:, None].to(query.dtype), None

    def _measure(self, layer, q, keys, positions, valid, scaling) -> StepMetrics:
        cfg = self.config
        n, hkv, d = keys.shape[1], keys.shape[2], keys.shape[3]
        scale = d**-0.5 if scaling is None else scaling
        qg = group_queries(q.float(), hkv)[0]  # [Hkv, G, D]
        logits = torch.einsum("hgd,nhd->hgn", qg, keys[0].float()) * scale
        probs = torch.softmax(logits, -1)
        attended = torch.zeros(hkv, n, dtype=torch.bool)
        for h in range(hkv):
            attended[h, positions[0, h][valid[0, h]]] = True
        mass = (probs * attended[:, None]).sum(-1).mean().item()
        zone = slice(cfg.sink, n - cfg.local)
        target = torch.einsum("hd,nhd->hn", qg.mean(1), keys[0, zone].float())
        k = min(cfg.topk, target.shape[1])
        exact = target.topk(k, dim=-1).indices + cfg.sink
        hits = torch.gather(attended, 1, exact).float().sum(-1) / k
        return StepMetrics(
            layer=layer,
            context=n,
            attended=valid[0].sum(-1).float().mean().item(),
            recall_at_k=hits.mean().item(),
            mass_recall=mass,
        )


def install(model: torch.nn.Module, attention: ParisKVAttention) -> None:
    """Route ``model``'s attention through ``attention`` (transformers attention interface)."""
    AttentionInterface.register(ATTN_NAME, attention)
    model.set_attn_implementation(ATTN_NAME)


def uninstall(model: torch.nn.Module) -> None:
    """Back to transformers' SDPA attention."""
    model.set_attn_implementation("sdpa")
