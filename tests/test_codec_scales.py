"""Key channel scales in the codec: keys are encoded as (k - m) / s and queries prepared as
s ∘ q, so retrieval ranks by q·(k - m) while the codes see balanced channels; checked
against float64 oracles and against the unscaled codec on keys with outlier channels."""

import torch

from sglang_pariskv.codec import encode_keys, estimate_inner_products, prepare_query
from sglang_pariskv.codec.rotation import rotation_matrix
from sglang_pariskv.config import ParisKVConfig
from tests.test_codec_centring import retrieval_recall


def outlier_keys(n: int, h: int, d: int, channels: list[int], factor: float, seed: int):
    """(keys [n, h, d], channel factor [d]): isotropic keys with ``channels`` multiplied by
    ``factor`` (a model whose keys carry outlier channels the queries barely weigh)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, h, d, generator=gen, dtype=torch.float64)
    f = torch.ones(d, dtype=torch.float64)
    f[channels] = factor
    return base * f, f


def test_scaled_query_is_the_scaled_group_mean_rotated():
    """prepare_query with scales: R · (s ∘ mean_g q) / ||s ∘ mean_g q|| per KV head, and
    the norm of s ∘ mean_g q (float64 reference)."""
    d, hkv, g = 64, 2, 3
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, hkv * g, d, generator=gen, dtype=torch.float64)
    s = torch.rand(hkv, d, generator=gen, dtype=torch.float64) * 3 + 0.1
    got = prepare_query(q, hkv, seed=5, scale=s)
    r = rotation_matrix(d, 5, torch.float64)
    for i in range(4):
        for h in range(hkv):
            m = q[i, h * g : (h + 1) * g].mean(0) * s[h]
            want = r @ (m / m.norm())
            assert torch.allclose(got.blocks[i, h].flatten(), want, atol=1e-12)
            assert torch.allclose(got.norm[i, h], m.norm())


def test_scaled_codes_are_the_codes_of_the_scaled_keys():
    d, h = 64, 3
    keys, _ = outlier_keys(50, h, d, [3, 40], 8.0, 1)
    m = keys.mean(0)
    s = keys.std(0) + 0.5
    a = encode_keys(keys, centre=m, scale=s)
    b = encode_keys((keys - m) / s)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_scaled_estimate_tracks_q_dot_k_minus_a_per_query_constant():
    """With outlier key channels, the rerank estimate from calibrated codes (centre m,
    scales s = the outlier factors) tracks q·k - q·m (float64 exact) much better than the
    estimate from centred-only codes: the outliers no longer dominate the 3-bit code."""
    d = 128
    keys, f = outlier_keys(4000, 1, d, [5, 17, 60, 99], 8.0, 2)
    keys = keys[:, 0]
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(d, generator=gen, dtype=torch.float64) / f  # queries weigh outliers less
    m = keys.mean(0)
    exact = (keys - m) @ q
    pq_s = prepare_query(q[None, None], 1, scale=f[None])
    scaled = estimate_inner_products(
        encode_keys(keys, centre=m, scale=f), pq_s.blocks[0, 0], pq_s.norm[0, 0]
    )
    pq = prepare_query(q[None, None], 1)
    centred = estimate_inner_products(encode_keys(keys, centre=m), pq.blocks[0, 0], pq.norm[0, 0])
    err_scaled = (scaled.double() - exact).std() / exact.std()
    err_centred = (centred.double() - exact).std() / exact.std()
    assert err_scaled < 0.25, err_scaled
    assert err_centred > 1.5 * err_scaled, (err_centred, err_scaled)


def _recall(keys, queries, scale, cfg, k):
    return retrieval_recall(
        keys, queries, None, cfg, k, None if scale is None else scale[None].float()
    )


def test_scales_recover_the_top_k_under_outlier_channels():
    """End to end through codec.retrieve: keys with 8 outlier channels (x8, queries x1/8,
    so q·k is unchanged) lose the exact top-k at the collision stage; with the outlier
    factors as channel scales they retrieve as well as the undistorted keys do."""
    n, d = 3000, 64
    cfg = ParisKVConfig(topk=100, sink=16, local=32, dense_threshold=0, candidate_ratio=0.25)
    clean, _ = outlier_keys(n, 1, d, [], 1.0, 4)
    gen = torch.Generator().manual_seed(5)
    picks = torch.randint(0, n, (6,), generator=gen)
    queries = clean[picks] * 4 + torch.randn(6, 1, d, generator=gen, dtype=torch.float64) * 0.1
    channels = torch.randperm(d, generator=gen)[:8].tolist()
    keys, f = outlier_keys(n, 1, d, channels, 8.0, 4)  # the same keys, outliers scaled
    bent = queries / f  # q·k unchanged: the exact top-k is the clean one
    clean_recall = _recall(clean, queries, None, cfg, 100)
    plain = _recall(keys, bent, None, cfg, 100)
    scaled = _recall(keys, bent, f, cfg, 100)
    assert abs(scaled - clean_recall) < 0.02, (scaled, clean_recall)
    assert plain < scaled - 0.2, (plain, scaled)
