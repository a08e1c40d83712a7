"""Key centring in the codec: the code of k is that of k - m, and ranking by the code
follows q·k (the query side is unchanged), checked against float64 oracles."""

import torch

from sglang_pariskv.codec import encode_keys, estimate_inner_products, prepare_query, retrieve
from sglang_pariskv.codec.encode import unpack_magnitudes
from sglang_pariskv.codec.levels import magnitude_thresholds
from sglang_pariskv.codec.rotation import rotation_matrix
from sglang_pariskv.config import ParisKVConfig


def shared_direction_keys(n: int, h: int, d: int, weight: float, seed: int) -> torch.Tensor:
    """Keys [n, h, d] = weight * (a unit common direction per head) + isotropic noise."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.nn.functional.normalize(
        torch.randn(h, d, generator=gen, dtype=torch.float64), dim=-1
    )
    noise = torch.randn(n, h, d, generator=gen, dtype=torch.float64) / d**0.5
    return weight * common + noise


def test_centred_codes_match_a_float64_per_coordinate_reference():
    """Sign bytes and magnitude indices of R·(k - m)/||k - m||, per head's own centre."""
    d, h = 64, 2
    keys = shared_direction_keys(40, h, d, 3.0, 0)
    centre = keys.mean(0)  # [h, d]
    codes = encode_keys(keys, centre=centre)
    r = rotation_matrix(d, 0, torch.float64)
    thr = magnitude_thresholds(torch.float64).tolist()
    for i in range(keys.shape[0]):
        for head in range(h):
            c = keys[i, head] - centre[head]
            kt = r @ (c / c.norm())
            mags = unpack_magnitudes(codes.mags[i, head])
            for b in range(d // 8):
                blk = kt[8 * b : 8 * b + 8]
                assert int(codes.signs[i, head, b]) == sum(1 << j for j in range(8) if blk[j] >= 0)
                u = (blk / blk.norm()).abs().tolist()
                assert mags[b].tolist() == [sum(x > t for t in thr) for x in u]


def test_centred_estimate_is_q_dot_k_minus_a_per_query_constant():
    """The rerank estimate from centred codes tracks q·k - q·m (float64 exact), so its
    ranking is that of q·k; from uncentred codes of the same keys it tracks q·k worse."""
    d, h = 128, 1
    keys = shared_direction_keys(4000, h, d, 6.0, 1)[:, 0]
    centre = keys.mean(0)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(d, generator=gen, dtype=torch.float64)
    pq = prepare_query(q[None, None], 1)
    exact = keys @ q
    centred = estimate_inner_products(
        encode_keys(keys, centre=centre), pq.blocks[0, 0], pq.norm[0, 0]
    )
    plain = estimate_inner_products(encode_keys(keys), pq.blocks[0, 0], pq.norm[0, 0])
    shifted = exact - centre @ q
    err_centred = (centred.double() - shifted).std() / shifted.std()
    err_plain = (plain.double() - exact).std() / shifted.std()
    assert err_centred < 0.25, err_centred
    assert err_plain > 2 * err_centred, (err_plain, err_centred)


def retrieval_recall(keys, queries, centre, cfg, k, scale=None):
    """Mean overlap of codec.retrieve's top-k (codes of (keys - centre) / scale, one KV
    head) with the float64 exact top-k of q·k."""
    n = keys.shape[0]
    codes = encode_keys(keys.float(), centre=centre, scale=scale)
    batched = type(codes)(*(t[None].expand(len(queries), *t.shape) for t in codes))
    seq = torch.full((len(queries),), n)
    out = retrieve(queries.float(), batched, seq, cfg, scale=scale)
    top = out.positions[:, 0, cfg.sink + cfg.local :]
    hits = 0.0
    for i, qv in enumerate(queries):
        scores = keys[cfg.sink : n - cfg.local, 0] @ qv[0]
        truth = set((scores.topk(k).indices + cfg.sink).tolist())
        hits += len(truth & set(top[i].tolist())) / k
    return hits / len(queries)


def test_centring_recovers_the_top_k_when_keys_share_a_direction():
    """End to end through codec.retrieve: with a dominant common direction the collision
    stage ranks by sign patterns of k ≈ m and loses the exact top-k; centred, the same keys
    retrieve as well as their noise alone would (the common part is gone from the code)."""
    n, d = 3000, 64
    gen = torch.Generator().manual_seed(4)
    picks = torch.randint(0, n, (6,), generator=gen)
    jitter = torch.randn(6, 1, d, generator=gen, dtype=torch.float64) * 0.1
    cfg = ParisKVConfig(topk=100, sink=16, local=32, dense_threshold=0, candidate_ratio=0.25)
    recalls = {}
    for weight in (0.0, 8.0):
        keys = shared_direction_keys(n, 1, d, weight, 3)  # same noise, growing common part
        # Queries aligned with a few keys' own (non-common) part, as attention queries are.
        queries = (keys[picks] - keys.mean(0)) * 4 + jitter
        recalls[weight] = (
            retrieval_recall(keys, queries, None, cfg, 100),
            retrieval_recall(keys, queries, keys.mean(0).float(), cfg, 100),
        )
    noise_only = recalls[0.0][0]
    plain, centred = recalls[8.0]
    assert abs(centred - noise_only) < 0.03, (centred, noise_only)
    assert plain < centred - 0.2, (plain, centred)
