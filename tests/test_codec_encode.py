"""Key codes: byte layout, sign ids and the RSQ-IP estimator against float64 brute force."""

import pytest
import torch

from sglang_pariskv.codec import (
    codes_from_bytes,
    codes_to_bytes,
    encode_keys,
    estimate_inner_products,
    prepare_query,
    record_bytes,
)
from sglang_pariskv.codec.encode import (
    pack_magnitudes,
    pack_signs,
    unpack_magnitudes,
    unpack_signs,
)
from sglang_pariskv.codec.levels import magnitude_thresholds
from sglang_pariskv.codec.rotation import rotation_matrix


def synthetic_keys(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Keys shaped like real ones: a shared offset and a few outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n, d, generator=gen)
    scale = torch.ones(d)
    scale[torch.randperm(d, generator=gen)[:4]] = 8.0
    offset = torch.randn(d, generator=gen) * 0.5
    return ((k + offset) * scale).to(dtype)


@pytest.mark.parametrize("d, expected", [(128, 96), (64, 48)])
def test_record_size_and_round_trip(d, expected):
    assert record_bytes(d) == expected
    codes = encode_keys(synthetic_keys(300, d, 0).reshape(100, 3, d))
    rec = codes_to_bytes(codes)
    assert rec.dtype == torch.uint8 and rec.shape == (100, 3, expected)
    back = codes_from_bytes(rec)
    for a, b in zip(codes, back):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_bit_packing_round_trips():
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(0, 8, (57, 16, 8), generator=gen)
    assert torch.equal(unpack_magnitudes(pack_magnitudes(t)), t)
    pos = torch.randint(0, 2, (57, 16, 8), generator=gen).bool()
    assert torch.equal(unpack_signs(pack_signs(pos)) > 0, pos)


def test_codes_match_a_float64_per_coordinate_reference():
    d = 64
    k = synthetic_keys(50, d, 2, torch.float64)
    codes = encode_keys(k)
    r = rotation_matrix(d, 0, torch.float64)
    thr = magnitude_thresholds(torch.float64).tolist()
    for i in range(k.shape[0]):
        kt = r @ (k[i] / k[i].norm())
        for b in range(d // 8):
            blk = kt[8 * b : 8 * b + 8]
            want_sign = sum(1 << j for j in range(8) if blk[j] >= 0)
            assert int(codes.signs[i, b]) == want_sign
            u = (blk / blk.norm()).abs().tolist()
            want_t = [sum(x > c for c in thr) for x in u]
            assert unpack_magnitudes(codes.mags[i])[b].tolist() == want_t


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_encode_like_float32(dtype):
    k = synthetic_keys(2000, 128, 3)
    ref = encode_keys(k)
    low = encode_keys(k.to(dtype))
    assert (ref.signs == low.signs).float().mean() > 0.99
    rel = (ref.weights.float() - low.weights.float()).abs() / ref.weights.float()
    assert rel.median() < 0.01


def _estimator_stats(keys: torch.Tensor, queries: torch.Tensor):
    """Pearson r and bias of the estimate against exact float64 q.k, pooled over queries."""
    codes = encode_keys(keys)
    ests, exacts = [], []
    for q in queries:
        pq = prepare_query(q[None, None].to(torch.float64), 1)
        est = estimate_inner_products(codes, pq.blocks[0], pq.norm[0]).reshape(-1)
        ests.append(est.double())
        exacts.append(keys.double() @ q.double())
    est, exact = torch.cat(ests), torch.cat(exacts)
    r = torch.corrcoef(torch.stack([est, exact]))[0, 1].item()
    err = est - exact
    return r, err.mean().item(), err.std().item()


@pytest.mark.parametrize("d", [64, 128])
def test_estimator_on_10k_synthetic_keys(d):
    keys = synthetic_keys(10_000, d, 4)
    gen = torch.Generator().manual_seed(5)
    queries = torch.randn(8, d, generator=gen) + keys[:8] * 0.2
    r, bias, err_std = _estimator_stats(keys, queries)
    assert r >= 0.97, r
    assert abs(bias) < 0.02 * err_std, (bias, err_std)
