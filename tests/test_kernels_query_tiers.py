"""Fused query prep + tier table + score-histogram reset (the Triton kernel, and its CUDA
twin csrc/query_tiers.cu on the GPU), against its oracles: the codec's query prep (float64
torch) and the codec's tier rule applied to the blocks it wrote."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from sglang_pariskv.codec.budget import tier_thresholds  # noqa: E402
from sglang_pariskv.codec.collision import centroid_tiers  # noqa: E402
from sglang_pariskv.codec.query import PreparedQuery, prepare_query  # noqa: E402
from sglang_pariskv.codec.rotation import rotation_matrix  # noqa: E402
from sglang_pariskv.config import ParisKVConfig  # noqa: E402
from sglang_pariskv.kernels.query_tiers import query_tier_table  # noqa: E402
from tests.kernel_cases import fresh_interpreter_fallback  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

_interpreter_guard, test_module_in_fresh_interpreter = fresh_interpreter_fallback(__file__)


@pytest.mark.parametrize("hq, hkv, d", [(4, 2, 64), (6, 2, 32), (8, 8, 64)])
def test_fused_query_tiers_match_codec(hq, hkv, d):
    gen = torch.Generator().manual_seed(hq * d)
    r, b, nbp = 3, d // 8, 64
    cfg = ParisKVConfig()
    q = torch.randn(r, hq, d, generator=gen).to(torch.bfloat16)
    hist = (torch.rand(5, hkv, b, 256, generator=gen) ** 4 * 100).to(torch.int32)
    rpi = torch.tensor([4, 0, 2], dtype=torch.int32)
    n = hist[rpi.long(), 0, 0].sum(-1)
    thr = tier_thresholds(n, torch.full((r,), 0.05), cfg).contiguous()
    rot = rotation_matrix(d, cfg.rotation_seed, torch.float32, DEV)
    out = PreparedQuery(
        blocks=torch.full((r, hkv, b, 8), float("nan"), device=DEV),
        norm=torch.full((r, hkv), float("nan"), device=DEV),
    )
    tiers = torch.full((r, hkv, b, 256), 99, dtype=torch.uint8, device=DEV)
    shist = torch.full((r, hkv, nbp), 7, dtype=torch.int32, device=DEV)
    query_tier_table(q.to(DEV), rot, hist.to(DEV), rpi.to(DEV), thr.to(DEV), out, tiers, shist)
    want = prepare_query(q.double(), hkv, cfg.rotation_seed)
    torch.testing.assert_close(out.blocks.cpu().double(), want.blocks, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm.cpu().double(), want.norm, atol=1e-5, rtol=1e-5)
    # The tiers are exactly the codec's rule over the blocks the kernel wrote.
    assert torch.equal(tiers.cpu().long(), centroid_tiers(out.blocks.cpu(), hist[rpi.long()], thr))
    assert not shist.any()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "hq, hkv, d, dtype, ties",
    [
        (32, 8, 128, torch.bfloat16, False),  # the Llama-3.1-8B shape
        (9, 3, 64, torch.float16, False),  # SmolLM2's shape, G = 3
        (4, 2, 64, torch.float32, True),  # zeros and repeated values: score ties
        (8, 8, 32, torch.bfloat16, True),
    ],
)
def test_cuda_query_tiers_match_codec(cuda_device, hq, hkv, d, dtype, ties):
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
    query_tier_table_cuda(
        q_dev, rot, hist.to(**dev), rpi.to(**dev), thr.to(**dev), out, tiers, shist, copy
    )
    torch.cuda.synchronize()
    assert torch.equal(copy.cpu(), q)
    mean = q.double().reshape(r, hkv, hq // hkv, d).mean(2)
    norm = mean.norm(dim=-1)
    want = (mean / norm[..., None]) @ rot.cpu().double().T
    torch.testing.assert_close(out.blocks.cpu().double().flatten(2), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm.cpu().double(), norm, atol=1e-5, rtol=1e-5)
    got = tiers.cpu().long()
    assert torch.equal(got, centroid_tiers(out.blocks.cpu(), hist[rpi.long()], thr))
    assert not shist.any()
    if ties:  # the case exercises the tie rule: some block has equal centroid scores
        assert got.unique().numel() > 1
