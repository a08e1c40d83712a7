"""Fused query prep + centroid table + score-histogram reset (the Triton kernel, and its CUDA
twin csrc/query_table.cu on the GPU), against its oracles: the codec's query prep (float64
torch) and the codec's centroid table computed from the blocks the kernel wrote."""

import pytest
import torch

from sglang_pariskv.codec.collision import SCORE_BINS, centroid_table
from sglang_pariskv.codec.query import PreparedQuery, prepare_query
from sglang_pariskv.codec.rotation import rotation_matrix
from sglang_pariskv.kernels.query_table import query_table

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _query(gen, r, hq, d, dtype, special):
    """Random queries; ``special``: coordinates in {0, +-1, +-2} (exact halves after
    scaling, so rounding ties occur), one request's first head all zeros."""
    if special:
        q = torch.randint(-2, 3, (r, hq, d), generator=gen).to(dtype)
        q[0] = 0
        return q
    return torch.randn(r, hq, d, generator=gen).to(dtype)


def _buffers(r, hkv, d, dev):
    out = PreparedQuery(
        blocks=torch.full((r, hkv, d // 8, 8), float("nan"), device=dev),
        norm=torch.full((r, hkv), float("nan"), device=dev),
    )
    table = torch.full((r, hkv, d // 8, 256), 99, dtype=torch.int8, device=dev)
    shist = torch.full((r, hkv, SCORE_BINS), 7, dtype=torch.int32, device=dev)
    return out, table, shist


def _want_blocks(q, hkv, rot, scale=None):
    r, hq, d = q.shape
    mean = q.double().reshape(r, hkv, hq // hkv, d).mean(2)
    if scale is not None:
        mean = mean * scale.double()
    norm = mean.norm(dim=-1)
    unit = mean / norm[..., None].clamp_min(1e-30)
    return (unit @ rot.cpu().double().T).view(r, hkv, d // 8, 8), norm


def _check(out, table, shist, q, hkv, rot, scale=None):
    blocks, norm = _want_blocks(q, hkv, rot, scale)
    torch.testing.assert_close(out.blocks.cpu().double(), blocks, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm.cpu().double(), norm, atol=1e-5, rtol=1e-5)
    # The table is exactly the codec's, over the blocks the kernel wrote.
    assert torch.equal(table.cpu(), centroid_table(out.blocks.cpu()))
    assert not shist.any()


@pytest.mark.parametrize(
    "hq, hkv, d, special",
    [
        (4, 2, 64, False),
        (6, 2, 32, False),
        (8, 8, 64, False),
        (4, 2, 64, True),  # identity rotation: exact rounding ties and a zero query
        (9, 3, 128, False),
    ],
)
def test_query_table_matches_codec(hq, hkv, d, special):
    gen = torch.Generator().manual_seed(hq * d + special)
    r = 3
    q = _query(gen, r, hq, d, torch.bfloat16, special)
    rot = torch.eye(d, device=DEV) if special else rotation_matrix(d, 0, torch.float32, DEV)
    out, table, shist = _buffers(r, hkv, d, DEV)
    query_table(q.to(DEV), rot, out, table, shist)
    _check(out, table, shist, q, hkv, rot)
    if special:
        assert not table[0].any()  # a zero query: every entry 0
        assert table.cpu().abs().max() == 127


@pytest.mark.parametrize("hq, hkv, d", [(6, 2, 64), (9, 3, 128)])
def test_query_table_with_channel_scales_matches_codec(hq, hkv, d):
    """With the calibration's channel scales the kernel prepares s ∘ (group mean), as the
    codec does, and not the unscaled query."""
    gen = torch.Generator().manual_seed(d + hq)
    r = 3
    q = torch.randn(r, hq, d, generator=gen).to(torch.bfloat16)
    scale = (torch.rand(hkv, d, generator=gen) * 4 + 0.1).contiguous()
    rot = rotation_matrix(d, 0, torch.float32, DEV)
    out, table, shist = _buffers(r, hkv, d, DEV)
    args = (q.to(DEV), rot, out, table, shist)
    query_table(*args, scale=scale.to(DEV))
    _check(out, table, shist, q, hkv, rot, scale)
    want = prepare_query(q.double(), hkv, 0, scale=scale.double())
    torch.testing.assert_close(out.blocks.cpu().double(), want.blocks, atol=1e-5, rtol=1e-5)
    plain = prepare_query(q.double(), hkv, 0)
    assert (out.blocks.cpu().double() - plain.blocks).abs().max() > 0.05
    with pytest.raises(ValueError, match=rf"scale must be a contiguous float32 \[{hkv}, {d}\]"):
        query_table(*args, scale=scale.to(DEV).double())


@pytest.mark.gpu
@pytest.mark.parametrize(
    "hq, hkv, d, dtype, special, scaled",
    [
        (32, 8, 128, torch.bfloat16, False, False),  # the Llama-3.1-8B shape
        (32, 8, 128, torch.bfloat16, False, True),  # with calibration channel scales
        (9, 3, 64, torch.float16, False, False),  # SmolLM2's shape, G = 3
        (9, 3, 64, torch.float16, False, True),
        (4, 2, 64, torch.float32, True, False),  # exact rounding ties, a zero query
        (8, 8, 32, torch.bfloat16, True, False),
        (32, 8, 128, torch.bfloat16, False, "misaligned"),  # the warp-per-row rotation
        (9, 3, 64, torch.float16, False, "misaligned"),
    ],
)
def test_cuda_query_table_matches_codec(cuda_device, hq, hkv, d, dtype, special, scaled):
    from sglang_pariskv.kernels.cuda_ops import query_table_cuda

    gen = torch.Generator().manual_seed(hq * d + special)
    r = 3
    q = _query(gen, r, hq, d, dtype, special)
    rot = (
        torch.eye(d, device=cuda_device)
        if special
        else rotation_matrix(d, 0, torch.float32, cuda_device)
    )
    if scaled == "misaligned":  # not 16-byte aligned: the kernel's other rotation loop
        rot = torch.cat([torch.zeros(1, device=cuda_device), rot.flatten()])[1:].view(d, d)
        assert rot.data_ptr() % 16 and rot.is_contiguous()
        scaled = False
    out, table, shist = _buffers(r, hkv, d, cuda_device)
    # A strided query (SGLang's q is a view of the QKV projection) and the copy it yields.
    wide = torch.zeros(r, (hq + 2 * hkv) * d, dtype=dtype)
    wide[:, : hq * d] = q.reshape(r, -1)
    q_dev = wide.to(cuda_device)[:, : hq * d].view(r, hq, d)
    copy = torch.full((r, hq, d), 3.0, dtype=dtype, device=cuda_device)
    scale = torch.rand(hkv, d, generator=gen) * 4 + 0.1 if scaled else None
    dev_scale = None if scale is None else scale.to(cuda_device)
    query_table_cuda(q_dev, rot, out, table, shist, copy, scale=dev_scale)
    torch.cuda.synchronize()
    assert torch.equal(copy.cpu(), q)
    _check(out, table, shist, q, hkv, rot, scale)
