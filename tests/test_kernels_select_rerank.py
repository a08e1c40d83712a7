"""CUDA candidate write + rerank (csrc/select_rerank.cu) against the Triton candidate write
(the same array, exactly) and the codec's float estimator (the estimates)."""

import pytest
import torch

from sglang_pariskv.codec.select import estimate_inner_products, zone_mask
from sglang_pariskv.kernels.launch_geometry import SELECT_RERANK_CHUNK
from sglang_pariskv.kernels.rerank import levels
from sglang_pariskv.kernels.select import (
    CandidateBuffers,
    count_candidates,
    select_candidates_gpu,
)
from tests.kernel_cases import make_scenario

pytestmark = pytest.mark.gpu


def score_histogram(scores, zone_start, zone_end, bins=256):
    r, h, nmax = scores.shape
    in_zone = zone_mask(nmax, zone_start, zone_end.long())
    hist = torch.zeros(r, h, bins, dtype=torch.int32, device=scores.device)
    for i in range(r):
        for j in range(h):
            s = scores[i, j][in_zone[i]].long()
            hist[i, j] = torch.bincount(s, minlength=bins).to(torch.int32)
    return hist


@pytest.mark.parametrize(
    "d, h, distinct, nmax",
    [
        (128, 8, 6, 70001),  # few distinct scores: long runs of ties at the threshold;
        (64, 3, 40, 40000),  # an odd NMAX takes the unaligned score loads
        (128, 2, 200, 131072),
    ],
)
def test_fused_write_and_rerank_match_triton_write_and_codec(cuda_device, d, h, distinct, nmax):
    from sglang_pariskv.codec.query import prepare_query
    from sglang_pariskv.kernels.cuda_ops import select_rerank_cuda

    lens = [nmax, nmax // 2 + 17, 5000, 3000]
    sc = make_scenario(lens, h, d, nmax, cuda_device, seed=d + h)
    r = len(lens)
    gen = torch.Generator(device="cpu").manual_seed(distinct)
    scores = torch.randint(0, distinct, (r, h, nmax), generator=gen, dtype=torch.uint8)
    scores = scores.to(cuda_device)
    zone_start = 64
    zone_end = torch.tensor([n - 256 for n in lens], dtype=torch.int64, device=cuda_device)
    zone_end[3] = 600  # a zone shorter than one chunk (and C = 0: a dense row)
    shist = score_histogram(scores, zone_start, zone_end)
    # row 2 takes its whole zone (5000 - 256 - 64 = 4680 keys): the threshold is its lowest score
    counts = torch.tensor([9000, 4000, 4680, 0], dtype=torch.int64, device=cuda_device)
    cmax = 9100
    q = torch.randn(r, h * 4, d, generator=gen).to(cuda_device)
    qp = prepare_query(q, h)
    qb, qn = qp.blocks.contiguous().float(), qp.norm.contiguous().float()

    want = torch.full((r, h, cmax), -1, dtype=torch.int32, device=cuda_device)
    buf = CandidateBuffers(r * h, nmax, SELECT_RERANK_CHUNK, cuda_device)
    args = (scores, shist, counts, zone_start, zone_end)
    select_candidates_gpu(*args, want, buf, sc.req_to_token, sc.req_pool_indices)

    got = torch.full((r, h, cmax), -1, dtype=torch.int32, device=cuda_device)
    est = torch.full((r, h, cmax), 7.0, dtype=torch.float32, device=cuda_device)
    buf2 = CandidateBuffers(r * h, nmax, SELECT_RERANK_CHUNK, cuda_device)
    count_candidates(*args, buf2)
    select_rerank_cuda(
        scores, buf2, counts, zone_start, zone_end, sc.req_to_token, sc.req_pool_indices,
        sc.pool.signs, sc.pool.mags, sc.pool.weights, qb, qn, levels(cuda_device), got, est,
    )  # fmt: skip
    torch.cuda.synchronize()
    valid = torch.arange(cmax, device=cuda_device)[None, None] < counts[:, None, None]
    assert torch.equal(got[valid.expand_as(got)], want[valid.expand_as(want)])
    assert (got[~valid.expand_as(got)] == -1).all()  # nothing written past C
    heads = torch.arange(h, device=cuda_device)[None, :, None]
    ref = estimate_inner_products(
        sc.pool.index(got.clamp(min=0).long(), heads), qb[:, :, None], qn[..., None]
    )
    v = valid.expand_as(est)
    torch.testing.assert_close(est[v], ref[v].float(), rtol=1e-4, atol=1e-4)
    assert (est[~v] == float("-inf")).all()


@pytest.mark.parametrize(
    "d, h, group, key_dtype, q_dtype",
    [
        (128, 8, 4, torch.bfloat16, torch.bfloat16),
        (64, 3, 3, torch.float16, torch.float16),
        (128, 2, 7, torch.float16, torch.bfloat16),  # a KV cache dtype unlike the model's
    ],
)
def test_fused_write_and_rerank_by_keys_match_triton_write_and_exact_scores(
    cuda_device, d, h, group, key_dtype, q_dtype
):
    """--pariskv-rerank keys: the same candidate array as the Triton write, each scored by
    its stored key times the group-mean query (float64 here), from a pool without
    records; the Triton rerank by the keys gives the same scores."""
    from sglang_pariskv.codec.encode import KeyCodes
    from sglang_pariskv.kernels.cuda_ops import select_rerank_cuda
    from sglang_pariskv.kernels.rerank import rerank_by_keys

    nmax = 70001
    lens = [nmax, 30000, 5000]
    sc = make_scenario(lens, h, d, nmax, cuda_device, dtype=key_dtype, seed=d + group)
    r = len(lens)
    gen = torch.Generator(device="cpu").manual_seed(group)
    scores = torch.randint(0, 30, (r, h, nmax), generator=gen, dtype=torch.uint8).to(cuda_device)
    zone_start = 64
    zone_end = torch.tensor([n - 256 for n in lens], dtype=torch.int64, device=cuda_device)
    shist = score_histogram(scores, zone_start, zone_end)
    counts = torch.tensor([7000, 3000, 0], dtype=torch.int64, device=cuda_device)
    cmax = 7100
    q = torch.randn(r, h * group, d, generator=gen).to(cuda_device, q_dtype)

    want = torch.full((r, h, cmax), -1, dtype=torch.int32, device=cuda_device)
    buf = CandidateBuffers(r * h, nmax, SELECT_RERANK_CHUNK, cuda_device)
    args = (scores, shist, counts, zone_start, zone_end)
    select_candidates_gpu(*args, want, buf, sc.req_to_token, sc.req_pool_indices)

    bare = KeyCodes(sc.pool.signs, sc.pool.mags[..., :0], sc.pool.weights[..., :0])
    got = torch.full((r, h, cmax), -1, dtype=torch.int32, device=cuda_device)
    est = torch.full((r, h, cmax), 7.0, dtype=torch.float32, device=cuda_device)
    buf2 = CandidateBuffers(r * h, nmax, SELECT_RERANK_CHUNK, cuda_device)
    count_candidates(*args, buf2)
    unused = torch.empty(1, device=cuda_device)
    select_rerank_cuda(
        scores, buf2, counts, zone_start, zone_end, sc.req_to_token, sc.req_pool_indices,
        bare.signs, bare.mags, bare.weights, unused, unused, levels(cuda_device), got, est,
        keys=sc.key_pool, query=q,
    )  # fmt: skip
    torch.cuda.synchronize()
    valid = (torch.arange(cmax, device=cuda_device)[None, None] < counts[:, None, None]).expand(
        r, h, cmax
    )
    assert torch.equal(got[valid], want[valid])
    mean = q.double().view(r, h, group, d).mean(2)  # [R, H, D]
    heads = torch.arange(h, device=cuda_device)[None, :, None]
    ref = (sc.key_pool[got.clamp(min=0).long(), heads].double() * mean[:, :, None]).sum(-1)
    torch.testing.assert_close(est[valid].double(), ref[valid], rtol=1e-4, atol=1e-3)
    assert (est[~valid] == float("-inf")).all()

    triton_est = torch.full_like(est, 7.0)
    rerank_by_keys(want, counts, sc.key_pool, q, triton_est)
    torch.testing.assert_close(triton_est[valid].double(), ref[valid], rtol=1e-4, atol=1e-3)
    assert (triton_est[~valid] == float("-inf")).all()
