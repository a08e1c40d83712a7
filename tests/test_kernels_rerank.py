"""Rerank kernel (3-bit estimator) and the final top-k against codec.select."""

import pytest
import torch

from sglang_pariskv.codec.query import prepare_query
from sglang_pariskv.codec.select import estimate_inner_products, rerank_topk
from sglang_pariskv.kernels.rerank import rerank_estimates, topk_slots
from tests.kernel_cases import (
    make_scenario,
    padded_codes,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rerank_case(lens, h, d, group, cmax, counts, k, seed, device):
    sc = make_scenario(lens, h, d, max(lens), device, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    r = len(lens)
    q = torch.randn(r, h * group, d, generator=gen).to(device)
    qp = prepare_query(q, h)
    cand = torch.zeros(r, h, cmax, dtype=torch.int32)
    for i, n in enumerate(lens):
        for j in range(h):
            cand[i, j] = torch.randperm(n, generator=gen)[:cmax].to(torch.int32)
    cand = cand.to(device)
    rtt = sc.req_to_token[sc.req_pool_indices.long()]  # [R, N]: position -> slot
    cand_slots = torch.gather(rtt[:, None].expand(r, h, -1), 2, cand.long()).to(torch.int32)
    counts = torch.tensor(counts, device=device)
    est = torch.empty(r, h, cmax, dtype=torch.float32, device=device)
    args = (cand_slots, counts, sc.pool.signs, sc.pool.mags, sc.pool.weights)
    qargs = (qp.blocks.contiguous(), qp.norm.contiguous())
    rerank_estimates(*args, *qargs, est)
    keys = est
    codes = padded_codes(sc)
    valid = torch.arange(cmax, device=device)[None, None] < counts[:, None, None]
    valid = valid.expand(r, h, cmax)
    top = topk_slots(est, cand_slots, k)
    want_pos, want_valid = rerank_topk(codes, qp, cand.long(), valid, k)
    want_pos = torch.gather(rtt[:, None].expand(r, h, -1), 2, want_pos).long()  # as slots
    cand = cand_slots
    return sc, qp, cand, counts, keys, est, top, want_pos, want_valid, codes, valid


@pytest.mark.parametrize("d, h, group", [(64, 2, 3), (128, 1, 8), (128, 3, 1)])
def test_rerank_estimates_and_topk_match_codec(d, h, group):
    sc, qp, cand, counts, keys, est, top, want_pos, want_valid, codes, valid = rerank_case(
        [200, 150], h, d, group, 96, [96, 40], 16, d + h, DEV
    )
    r = 2
    heads = torch.arange(h, device=DEV)[None, :, None]
    ref = estimate_inner_products(
        sc.pool.index(cand.long(), heads), qp.blocks[:, :, None], qp.norm[..., None]
    )
    torch.testing.assert_close(est[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert (est[~valid] == float("-inf")).all()
    for i in range(r):
        for j in range(h):
            got = set(top[i, j].tolist())
            want = set(want_pos[i, j][want_valid[i, j]].tolist())
            # Sets agree except where two estimates tie within float rounding of the k-th.
            diff = got ^ want
            if diff:
                kth = ref[i, j][valid[i, j]].sort(descending=True).values[15]
                idx = {int(p): n for n, p in enumerate(cand[i, j].tolist())}
                for p in diff:
                    assert abs(float(ref[i, j, idx[p]]) - float(kth)) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("d", [128, 64])
def test_rerank_at_scale(cuda_device, d):
    sc, qp, cand, counts, _, est, top, want_pos, want_valid, _, valid = rerank_case(
        [131072, 50000], 8, d, 4, 13000, [13000, 5000], 2048, 0, cuda_device
    )
    heads = torch.arange(8, device=cuda_device)[None, :, None]
    ref = estimate_inner_products(
        sc.pool.index(cand.long(), heads), qp.blocks[:, :, None], qp.norm[..., None]
    )
    torch.testing.assert_close(est[valid], ref[valid], rtol=1e-4, atol=1e-4)
    assert (est[~valid] == float("-inf")).all()
    for i in range(2):
        got = top[i].sort(-1).values
        want = want_pos[i].sort(-1).values.to(got.dtype)
        agree = (got[:, :, None] == want[:, None, :]).any(-1).float().mean()
        assert agree >= 0.999  # only float-rounding ties at the k-th estimate may differ


@pytest.mark.gpu
@pytest.mark.parametrize("cluster", [1, 2, 8])
def test_cuda_topk_matches_torch_topk(cuda_device, cluster):
    from sglang_pariskv.kernels.cuda_ops import topk_cuda

    # Row 0 is longer than the registers of one block (16 x 1024 keys) and of an 8-block
    # cluster (8 x 1024 x 8): the tail is re-read.
    r, h, cmax, k = 3, 4, 70000, 2048
    est = torch.randn(r, h, cmax, device=cuda_device)
    est[0, 0, :500] = 1.5  # a block of exact ties, all above the threshold
    est[0, 1, :3000] = est[0, 1].topk(1500).values[-1]  # 3000 ties straddling the cut
    counts = torch.tensor([70000, 9000, 1000], device=cuda_device)
    valid = torch.arange(cmax, device=cuda_device) < counts[:, None, None]
    est = torch.where(valid, est, float("-inf"))
    cand = torch.randperm(10**6, device=cuda_device)[: r * h * cmax].view(r, h, cmax).int()
    flat = torch.full((r * h * k + 64,), -1, dtype=torch.int32, device=cuda_device)
    out = flat[: r * h * k].view(r, h, k)
    topk_cuda(est, cand, counts, out, cluster)
    assert (flat[r * h * k :] == -1).all()  # nothing past the last row
    want = topk_slots(est, cand, k)
    for i in range(r):
        n = min(k, int(counts[i]))
        for j in range(h):
            assert (out[i, j, n:] == -1).all()  # nothing past min(k, C)
            got = out[i, j, :n].sort().values
            assert len(set(got.tolist())) == n
            kth = est[i, j].topk(n).values[-1]
            strictly = set(cand[i, j][est[i, j] > kth].tolist())
            assert strictly <= set(got.tolist())  # everything above the k-th value is in
            at = set(cand[i, j][est[i, j] == kth].tolist())
            assert set(got.tolist()) <= strictly | at
            if n == k and (i, j) != (0, 1):
                assert torch.equal(got, want[i, j].sort().values)
