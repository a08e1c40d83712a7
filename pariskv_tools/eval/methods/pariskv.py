"""ParisKV and its ablations, built from the codec's own pieces.

``codec.retrieve`` returns one top-k set per step; the evaluation needs the whole ranking
(to cut it at every budget), so we assemble the same stages into a score:

* collision score per key (``centroid_table`` + ``collision_scores``);
* candidates: the ``ceil(zone * candidate_ratio)`` best collision scores (earlier wins ties);
* rerank estimate ||q|| Σ_b w_b <v_b, q_b> for candidates (``decode_directions`` and the
  weights folded into one "effective key" per token, so the estimate is one matmul).

Candidates rank first by estimate, then the other zone keys by collision score. Cutting this
ranking at k gives exactly ``codec.retrieve`` with ``topk = k``: for k <= C it is the rerank of
the C candidates; for k > C the codec raises C to k, which is the next keys by collision
score (tests/test_eval_methods.py and ``eval.codec_check`` check it against ``codec.retrieve``).

Key calibration: with ``centres`` (and ``scales``) ([layers, Hkv, D], as a calibration file
holds them) the keys of layer ``trace.layer`` are encoded as (k - m) / s and the queries
prepared as s ∘ q with that layer's fixed centres m and channel scales s, as the serving
path does with ``--pariskv-calibration``.

Ablations: stage 1 only (rank by collision score, no rerank), no rotation, and the rerank
by the stored keys themselves (``rerank="keys"``: the candidates ranked by the exact
group-mean q·k, what a rerank reading the bf16 K rows instead of the 3-bit code would
give). The codec always rotates by R; feeding it R^T·x instead of x makes the rotation a no-op
(R·R^T = I), which removes it without touching the codec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pariskv_tools.eval.trace import LayerTrace, StepBatch, group_mean_query
from sglang_pariskv.codec.budget import candidate_ratios, num_candidates
from sglang_pariskv.codec.collision import centroid_table, scores_from_totals
from sglang_pariskv.codec.encode import decode_directions, encode_keys
from sglang_pariskv.codec.query import prepare_query
from sglang_pariskv.codec.rotation import rotation_matrix
from sglang_pariskv.config import ParisKVConfig

# Candidates outrank every non-candidate: collision scores are bytes, estimates
# are |<q, k>| << 1e9 for any real model.
_CANDIDATE_OFFSET = 1e9


@dataclass
class ParisKVState:
    signs: torch.Tensor  #: uint8 [N, H, B]: sign ids (the collision codes)
    eff_keys: torch.Tensor  #: float32 [N, H, D]: w_b * v_b per block, flattened (or the keys)
    scale: torch.Tensor | None = None  #: the layer's key channel scales [H, D] (queries: s ∘ q)


def fast_collision_scores(signs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``codec.collision_scores`` for one shared key set and many steps, one block at a time.

    signs uint8 [N, H, B] (the same keys for every step), table int8 [S, H, B, 256] ->
    int64 [S, H, N] (the codec returns [S, N, H]; tests check they agree). Gathering per
    block from the small [S, H, 256] table avoids the codec's [S, N, H, B] int64
    intermediate, which dominates the evaluation's run time at 8K tokens.
    """
    s, h, b, _ = table.shape
    n = signs.shape[0]
    ids = signs.permute(2, 1, 0).to(torch.int64)  # [B, H, N]
    t = table.to(torch.int32)
    out = torch.zeros(s, h, n, dtype=torch.int32, device=table.device)
    for blk in range(b):
        out += torch.gather(t[:, :, blk], -1, ids[blk][None].expand(s, h, n))
    return scores_from_totals(out.to(torch.int64), b)


def _layer_slice(x: torch.Tensor | None, trace, what: str) -> torch.Tensor | None:
    """Layer ``trace.layer``'s rows [Hkv, D] of a per-layer [L, Hkv, D] tensor (a 2-d
    tensor is already one layer's), on the trace's device."""
    if x is None:
        return None
    dev = trace.queries.device
    if x.dim() == 2:
        return x.to(dev)
    if not 0 <= trace.layer < x.shape[0]:
        raise ValueError(f"no {what} for layer {trace.layer} of this trace")
    return x[trace.layer].to(dev)


class ParisKV:
    """ParisKV retrieval scores; ``outputs`` picks which of the family to report.

    outputs: names among {"full", "stage1"}, mapped to ``name`` and ``name + "_stage1"``.
    rotate: False removes the Hadamard rotation (ablation).
    centres, scales: fixed key centres and channel scales [layers, Hkv, D] (see the module
    docstring), [Hkv, D] for one layer's traces, or None (0 and 1).
    gqa: "mean" (the codec: one group-mean query per KV head), "max" (every query head
    retrieves on its own; a key's collision score and estimate are the group maximum) or
    "shared" (one token set for all KV heads of the layer: scores summed over KV heads).
    rerank: "code" (the 3-bit estimate, served) or "keys" (the exact group-mean q·k of the
    candidates; with gqa "mean" only).
    """

    zone_dependent = True

    def __init__(
        self,
        config: ParisKVConfig | None = None,
        name: str = "pariskv",
        outputs: tuple[str, ...] = ("full", "stage1"),
        rotate: bool = True,
        gqa: str = "mean",
        centres: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        rerank: str = "code",
    ) -> None:
        if gqa not in ("mean", "max", "shared"):
            raise ValueError(f"gqa must be 'mean', 'max' or 'shared', got {gqa!r}")
        if rerank not in ("code", "keys") or (rerank == "keys" and gqa != "mean"):
            raise ValueError(f"rerank must be 'code', or 'keys' with gqa 'mean', got {rerank!r}")
        self.config = config or ParisKVConfig()
        self.rotate, self.gqa, self.rerank = rotate, gqa, rerank
        self.centres, self.scales = centres, scales
        self._out = {"full": name, "stage1": name + "_stage1"}
        self.names = tuple(self._out[o] for o in outputs)
        self.outputs = outputs

    def _unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """R^T x (as x @ R): the codec's rotation of it gives back x."""
        if self.rotate:
            return x
        r = rotation_matrix(x.shape[-1], self.config.rotation_seed, torch.float64, x.device)
        return (x.to(torch.float64) @ r).to(x.dtype)

    def key_centre(self, trace: LayerTrace) -> torch.Tensor | None:
        """This layer's fixed key centres [Hkv, D], or None without centring."""
        return _layer_slice(self.centres, trace, "key centres")

    def key_scale(self, trace: LayerTrace) -> torch.Tensor | None:
        """This layer's fixed key channel scales [Hkv, D], or None without scaling."""
        return _layer_slice(self.scales, trace, "key channel scales")

    def prepare(self, trace: LayerTrace) -> ParisKVState:
        centre, scale = self.key_centre(trace), self.key_scale(trace)
        keys = trace.keys if centre is None else trace.keys - centre
        if scale is not None:
            keys = keys / scale
        codes = encode_keys(self._unrotate(keys), self.config.rotation_seed)
        n, h, b = codes.signs.shape
        if self.rerank == "keys":
            return ParisKVState(signs=codes.signs, eff_keys=trace.keys.float(), scale=scale)
        eff = decode_directions(codes) * codes.weights.float()[..., None]  # [N, H, B, 8]
        return ParisKVState(signs=codes.signs, eff_keys=eff.reshape(n, h, b * 8), scale=scale)

    def step_config(self) -> ParisKVConfig:
        """The codec config for scoring: never dense (we evaluate retrieval itself), top-k
        irrelevant (the ranking serves every k). Sink and window come per row from the
        batch; the candidate count only reads the config's ratio knob."""
        return dataclasses.replace(self.config, topk=1, dense_threshold=0)

    def _prepared(self, queries: torch.Tensor, state: ParisKVState, heads: int):
        """The codec's prepared query (s ∘ q with the layer's channel scales, if any)."""
        h = state.signs.shape[1]
        if state.scale is not None:  # each head of a group takes its KV head's scales
            queries = queries * state.scale.repeat_interleave(queries.shape[1] // h, 0)
        return prepare_query(self._unrotate(queries), heads, self.config.rotation_seed)

    def scores(
        self,
        state: ParisKVState,
        batch: StepBatch,
        candidate_queries: torch.Tensor | None = None,
    ) -> dict:
        """``candidate_queries`` [S, Hq, D]: the queries the collision stage picks the
        candidates with (default: the batch's own); the rerank always uses the batch's."""
        coll, est = self.stage_scores(state, batch, candidate_queries)
        out = {}
        if "stage1" in self.outputs:
            out[self._out["stage1"]] = coll
        if "full" in self.outputs:
            out[self._out["full"]] = self.ranking(coll, est, batch)
        return out

    def ranking(self, coll: torch.Tensor, est: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """The full method's ranking of keys scored by the two stages of
        :meth:`stage_scores` (which may come from different steps' queries)."""
        cfg = self.step_config()
        zone = (batch.seq_lens.to(torch.int64) - batch.sink - batch.local).clamp_min(0)
        counts = num_candidates(zone, candidate_ratios(zone, cfg), cfg)
        return self._rerank(coll, est, counts, batch)

    def stage_scores(
        self,
        state: ParisKVState,
        batch: StepBatch,
        candidate_queries: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(collision scores int64 [S, H, N], rerank estimates float32 [S, H, N]) of every
        key for the batch's queries (the collision stage's: ``candidate_queries``, if
        given)."""
        n, h, b = state.signs.shape
        s = batch.seq_lens.shape[0]

        heads = batch.queries.shape[1] if self.gqa == "max" else h
        group = heads // h
        q = self._prepared(batch.queries, state, heads)
        qc = q if candidate_queries is None else self._prepared(candidate_queries, state, heads)
        signs = state.signs
        if group > 1:
            signs = signs.repeat_interleave(group, dim=1)
        coll = fast_collision_scores(signs, centroid_table(qc.blocks))
        eff = state.eff_keys.repeat_interleave(group, dim=1) if group > 1 else state.eff_keys
        if self.rerank == "keys":
            est = torch.einsum("shd,nhd->shn", group_mean_query(batch.queries, h), eff)
        else:
            est = torch.einsum("shd,nhd->shn", q.blocks.flatten(-2).float(), eff)
            est = est * q.norm[..., None]
        if group > 1:
            coll = coll.reshape(s, h, group, n).amax(2)
            est = est.reshape(s, h, group, n).amax(2)
        if self.gqa == "shared":
            coll = coll.sum(1, keepdim=True).expand(s, h, n)
            est = est.sum(1, keepdim=True).expand(s, h, n)
        return coll, est

    @staticmethod
    def _rerank(
        coll: torch.Tensor,
        est: torch.Tensor,
        counts: torch.Tensor,
        batch: StepBatch,
    ) -> torch.Tensor:
        """Candidates (top-``counts`` zone keys by collision score, earlier first on ties)
        scored by estimate above every non-candidate, which keeps its collision order."""
        s, h, n = coll.shape
        pos = torch.arange(n, device=coll.device)
        end = batch.seq_lens - batch.local
        in_zone = (pos[None] >= batch.sink[:, None]) & (pos[None] < end[:, None])
        cand = top_count_mask(torch.where(in_zone[:, None], coll, -1), counts)
        key = coll.to(torch.float64) - pos.to(torch.float64) / (n + 1)
        return torch.where(cand, _CANDIDATE_OFFSET + est.to(torch.float64), key)


def top_count_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """bool [S, H, N]: the ``counts[s]`` highest small-integer scores per row, earlier
    position first among equals (``select_candidates``' stable order); scores < 0 never.

    Scores are collision scores (bytes), so a per-row histogram finds the threshold score
    in one pass instead of sorting N keys."""
    s, h, n = scores.shape
    top = int(scores.max()) + 1 if scores.numel() else 1
    clipped = scores.clamp_min(-1) + 1  # -1 (out of zone) -> bin 0
    hist = torch.zeros(s, h, top + 1, dtype=torch.int64, device=scores.device)
    hist.scatter_add_(-1, clipped, torch.ones_like(clipped))
    hist[..., 0] = 0  # out-of-zone keys are never candidates
    at_or_above = torch.flip(torch.cumsum(torch.flip(hist, [-1]), -1), [-1])  # [S, H, top+1]
    need = counts[:, None, None].to(torch.int64)
    # Threshold bin: the highest bin b with at_or_above[b] >= need (bin 0 if none).
    ok = at_or_above >= need
    thr = (ok * torch.arange(top + 1, device=scores.device)).amax(-1, keepdim=True)
    above = torch.gather(at_or_above, -1, (thr + 1).clamp_max(top)) * (thr < top)
    tie = clipped == thr
    tie_rank = torch.cumsum(tie.to(torch.int32), -1)
    return (clipped > thr) | (tie & (tie_rank <= need - above) & (thr > 0))
