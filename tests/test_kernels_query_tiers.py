"""Fused query prep + tier table + score-histogram reset (the Triton kernel, and its CUDA
twin csrc/query_tiers.cu on the GPU), against its oracles: the codec's query prep (float64
torch) and the codec's tier rule applied to the blocks it wrote."""

import pytest
import torch

from sglang_pariskv.codec.budget import tier_thresholds
from sglang_pariskv.codec.collision import centroid_tiers
from sglang_pariskv.codec.query import PreparedQuery, prepare_query
from sglang_pariskv.codec.rotation import rotation_matrix
from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.kernels.query_tiers import query_tier_table

DEV = "cuda" if torch.cuda.is_available() else "cpu"


NINE_TIERS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@pytest.mark.parametrize(
    "hq, hkv, d, ties, tier_ratios",
    [
        (4, 2, 64, False, None),
        (6, 2, 32, False, None),
        (8, 8, 64, False, None),
        (4, 2, 64, True, None),  # zeros and repeated values: ties rank the lower id first
        (2, 1, 64, False, NINE_TIERS),  # more tiers; one request's histogram is empty
    ],
)
def test_fused_query_tiers_match_codec(hq, hkv, d, ties, tier_ratios):
    gen = torch.Generator().manual_seed(hq * d + ties)
    r, b, nbp = 3, d // 8, 64
    cfg = ParisKVConfig() if tier_ratios is None else ParisKVConfig(tier_ratios=tier_ratios)
    if ties:  # identity rotation, coordinates in {0, +-1, +-2}: many equal scores
        q = torch.randint(-2, 3, (r, hq, d), generator=gen).to(torch.bfloat16)
        q[0, :, :8] = 0  # an all-zero block: every centroid ties
        rot = torch.eye(d, device=DEV)
    else:
        q = torch.randn(r, hq, d, generator=gen).to(torch.bfloat16)
        rot = rotation_matrix(d, cfg.rotation_seed, torch.float32, DEV)
    hist = (torch.rand(5, hkv, b, 256, generator=gen) ** 4 * 100).to(torch.int32)
    rpi = torch.tensor([4, 0, 2], dtype=torch.int32)
    if tier_ratios is not None:
        hist[0] = 0
    n = hist[rpi.long(), 0, 0].sum(-1)
    thr = tier_thresholds(n, torch.full((r,), 0.05 if ties else 0.2), cfg).contiguous()
    out = PreparedQuery(
        blocks=torch.full((r, hkv, b, 8), float("nan"), device=DEV),
        norm=torch.full((r, hkv), float("nan"), device=DEV),
    )
    tiers = torch.full((r, hkv, b, 256), 99, dtype=torch.uint8, device=DEV)
    shist = torch.full((r, hkv, nbp), 7, dtype=torch.int32, device=DEV)
    query_tier_table(q.to(DEV), rot, hist.to(DEV), rpi.to(DEV), thr.to(DEV), out, tiers, shist)
    if ties:
        mean = q.double().reshape(r, hkv, hq // hkv, d).mean(2)
        norm = mean.norm(dim=-1)
        blocks = ((mean / norm[..., None].clamp_min(1e-30)) @ rot.cpu().double().T).view(
            r, hkv, b, 8
        )
    else:
        want = prepare_query(q.double(), hkv, cfg.rotation_seed)
        blocks, norm = want.blocks, want.norm
    torch.testing.assert_close(out.blocks.cpu().double(), blocks, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm.cpu().double(), norm, atol=1e-5, rtol=1e-5)
    # The tiers are exactly the codec's rule over the blocks the kernel wrote.
    got = tiers.cpu().long()
    assert torch.equal(got, centroid_tiers(out.blocks.cpu(), hist[rpi.long()], thr))
    assert not shist.any()
    if ties:  # the case exercises the tie rule: some block has equal centroid scores
        assert got.unique().numel() > 1


@pytest.mark.parametrize("hq, hkv, d", [(6, 2, 64), (9, 3, 128)])
def test_fused_query_tiers_with_channel_scales_match_codec(hq, hkv, d):
    """With the calibration's channel scales the kernel prepares s ∘ (group mean), as the
    codec does, and not the unscaled query."""
    gen = torch.Generator().manual_seed(d + hq)
    r, b, nbp = 3, d // 8, 64
    cfg = ParisKVConfig()
    q = torch.randn(r, hq, d, generator=gen).to(torch.bfloat16)
    scale = (torch.rand(hkv, d, generator=gen) * 4 + 0.1).contiguous()
    rot = rotation_matrix(d, cfg.rotation_seed, torch.float32, DEV)
    hist = (torch.rand(4, hkv, b, 256, generator=gen) ** 4 * 100).to(torch.int32)
    rpi = torch.tensor([3, 0, 1], dtype=torch.int32)
    thr = tier_thresholds(hist[rpi.long(), 0, 0].sum(-1), torch.full((r,), 0.2), cfg)
    out = PreparedQuery(
        blocks=torch.empty((r, hkv, b, 8), device=DEV), norm=torch.empty((r, hkv), device=DEV)
    )
    tiers = torch.empty((r, hkv, b, 256), dtype=torch.uint8, device=DEV)
    shist = torch.full((r, hkv, nbp), 7, dtype=torch.int32, device=DEV)
    args = (q.to(DEV), rot, hist.to(DEV), rpi.to(DEV), thr.contiguous().to(DEV), out, tiers, shist)
    query_tier_table(*args, scale=scale.to(DEV))
    want = prepare_query(q.double(), hkv, cfg.rotation_seed, scale=scale.double())
    torch.testing.assert_close(out.blocks.cpu().double(), want.blocks, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm.cpu().double(), want.norm, atol=1e-5, rtol=1e-5)
    assert torch.equal(tiers.cpu().long(), centroid_tiers(out.blocks.cpu(), hist[rpi.long()], thr))
    plain = prepare_query(q.double(), hkv, cfg.rotation_seed)
    assert (out.blocks.cpu().double() - plain.blocks).abs().max() > 0.05
    with pytest.raises(ValueError, match=rf"scale must be a contiguous float32 \[{hkv}, {d}\]"):
        query_tier_table(*args, scale=scale.to(DEV).double())


@pytest.mark.gpu
@pytest.mark.parametrize(
    "hq, hkv, d, dtype, ties, scaled",
    [
        (32, 8, 128, torch.bfloat16, False, False),  # the Llama-3.1-8B shape
        (32, 8, 128, torch.bfloat16, False, True),  # with calibration channel scales
        (9, 3, 64, torch.float16, False, False),  # SmolLM2's shape, G = 3
        (9, 3, 64, torch.float16, False, True),
        (4, 2, 64, torch.float32, True, False),  # zeros and repeated values: score ties
        (8, 8, 32, torch.bfloat16, True, False),
    ],
)
def test_cuda_query_tiers_match_codec(cuda_device, hq, hkv, d, dtype, ties, scaled):
    from sglang_pariskv.kernels.cuda_ops import query_tier_table_cuda

    gen = torch.Generator().manual_seed(hq * d + ties)
    r, b, nbp = 3, d // 8, 97
    cfg = ParisKVConfig()
    if ties:  # identity rotation, coordinates in {0, +-1, +-2}: many equal scores
        q = torch.randint(-2, 3, (r, hq, d), generator=gen).to(dtype)
        rot = torch.eye(d, device=cuda_device)
    else:
        q = torch.randn(r, hq, d, generator=gen).to(dtype)
        rot = rotation_matrix(d, cfg.rotation_seed, torch.float32, cuda_device)
    hist = (torch.rand(5, hkv, b, 256, generator=gen) ** 4 * 100).to(torch.int32)
    rpi = torch.tensor([4, 0, 2], dtype=torch.int32)
    n = hist[rpi.long(), 0, 0].sum(-1)
    thr = tier_thresholds(n, torch.full((r,), 0.2), cfg).contiguous()
    out = PreparedQuery(
        blocks=torch.full((r, hkv, b, 8), float("nan"), device=cuda_device),
        norm=torch.full((r, hkv), float("nan"), device=cuda_device),
    )
    tiers = torch.full((r, hkv, b, 256), 99, dtype=torch.uint8, device=cuda_device)
    shist = torch.full((r, hkv, nbp), 7, dtype=torch.int32, device=cuda_device)
    dev = dict(device=cuda_device)
    # A strided query (SGLang's q is a view of the QKV projection) and the copy it yields.
    wide = torch.zeros(r, (hq + 2 * hkv) * d, dtype=dtype)
    wide[:, : hq * d] = q.reshape(r, -1)
    q_dev = wide.to(**dev)[:, : hq * d].view(r, hq, d)
    copy = torch.full((r, hq, d), 3.0, dtype=dtype, device=cuda_device)
    scale = torch.rand(hkv, d, generator=gen) * 4 + 0.1 if scaled else None
    query_tier_table_cuda(
        q_dev,
        rot,
        hist.to(**dev),
        rpi.to(**dev),
        thr.to(**dev),
        out,
        tiers,
        shist,
        copy,
        scale=None if scale is None else scale.to(**dev),
    )
    torch.cuda.synchronize()
    assert torch.equal(copy.cpu(), q)
    mean = q.double().reshape(r, hkv, hq // hkv, d).mean(2)
    if scale is not None:
        mean = mean * scale.double()
    norm = mean.norm(dim=-1)
    want = (mean / norm[..., None]) @ rot.cpu().double().T
    torch.testing.assert_close(out.blocks.cpu().double().flatten(2), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm.cpu().double(), norm, atol=1e-5, rtol=1e-5)
    got = tiers.cpu().long()
    assert torch.equal(got, centroid_tiers(out.blocks.cpu(), hist[rpi.long()], thr))
    assert not shist.any()
    if ties:  # the case exercises the tie rule: some block has equal centroid scores
        assert got.unique().numel() > 1
