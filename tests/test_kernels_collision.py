"""Collision scan (scores + score histogram) and candidate selection against codec."""

import pytest
import torch

from sglang_pariskv.codec.collision import SCORE_BINS, collision_scores
from sglang_pariskv.codec.select import select_candidates, zone_mask
from sglang_pariskv.kernels.collision import collision_scan
from sglang_pariskv.kernels.select import (
    CandidateBuffers,
    select_candidates_gpu,
)
from tests.kernel_cases import (
    make_scenario,
    padded_codes,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def random_table(shape, gen=None, device=DEV):
    """An int8 centroid table of random entries in [-127, 127] (the scan only sums them)."""
    t = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int16)
    return t.to(torch.int8).to(device)


def run_scan(sc, table, zone_start, zone_end, nmax, block_n=16, tiles=4):
    r = sc.seq_lens.numel()
    h = sc.pool.signs.shape[1]
    scores = torch.zeros((r, h, nmax), dtype=torch.uint8, device=DEV)  # 0: never a score
    shist = torch.zeros(r, h, SCORE_BINS, dtype=torch.int32, device=DEV)
    collision_scan(
        sc.pool.signs,
        sc.req_to_token,
        sc.req_pool_indices,
        sc.seq_lens,
        zone_end,
        table,
        scores,
        shist,
        zone_start,
        block_n,
        tiles,
    )
    return scores, shist


@pytest.mark.parametrize("d, h", [(64, 3), (128, 2), (64, 2)])
def test_scan_scores_and_histogram_match_codec(d, h):
    lens = [300, 77, 190]
    nmax = 320
    sc = make_scenario(lens, h, d, nmax, DEV, seed=d)
    gen = torch.Generator().manual_seed(2)
    table = random_table((3, h, d // 8, 256), gen)
    zone_start = 5
    zone_end = torch.tensor([250, 77, 100], dtype=torch.int32)
    scores, shist = run_scan(sc, table, zone_start, zone_end.to(DEV), nmax)
    want = collision_scores(padded_codes(sc).signs.cpu(), table.cpu())  # [R, N, H]
    for r, n in enumerate(lens):
        assert torch.equal(scores[r, :, :n].cpu().long(), want[r, :n].T)
        assert (scores[r, :, n:] == 0).all()  # nothing written past the sequence
        zone = want[r, zone_start : int(zone_end[r])]  # [Z, H]
        for hh in range(h):
            ref = torch.bincount(zone[:, hh], minlength=shist.shape[-1])
            assert torch.equal(shist[r, hh].cpu().long(), ref)


# chunk 4: 150 chunks, so a chunk's offset sums its predecessors over several tiles.
@pytest.mark.parametrize("seed,chunk", [(0, 64), (1, 64), (2, 4)])
def test_selection_is_codec_set_with_stable_ties(seed, chunk):
    gen = torch.Generator().manual_seed(seed)
    r, h, nmax = 3, 3, 600
    # Few distinct scores: many ties at the threshold, so the stable order matters.
    scores = torch.randint(0, 6, (r, h, nmax), generator=gen, dtype=torch.uint8)
    zone_start = 7
    zone_end = torch.tensor([600, 45, 333], dtype=torch.int32)
    counts = torch.tensor([100, 38, 1], dtype=torch.int64)
    in_zone = zone_mask(nmax, zone_start, zone_end.long())
    shist = torch.zeros(r, h, 128, dtype=torch.int32)
    for i in range(r):
        for j in range(h):
            s = scores[i, j][in_zone[i]]
            shist[i, j] = torch.bincount(s.long(), minlength=128).to(torch.int32)
    cand = torch.full((r, h, 128), -1, dtype=torch.int32, device=DEV)
    buf = CandidateBuffers(r * h, nmax, chunk, DEV)
    select_candidates_gpu(
        scores.to(DEV), shist.to(DEV), counts.to(DEV), zone_start, zone_end.to(DEV), cand, buf
    )
    pos, valid = select_candidates(scores.transpose(1, 2), in_zone, counts)
    for i in range(r):
        c = int(counts[i])
        for j in range(h):
            got = cand[i, j, :c].cpu()
            assert sorted(got.tolist()) == sorted(pos[i, j][valid[i, j]].tolist())
            assert (cand[i, j, c:] == -1).all()


@pytest.mark.gpu
def test_scan_and_select_at_scale(cuda_device):
    lens = [70000, 131072, 9000]
    h, d, nmax = 8, 128, 131072
    sc = make_scenario(lens, h, d, nmax, cuda_device, seed=3)
    table = random_table((3, h, 16, 256), device=cuda_device)
    zone_end = torch.tensor([n - 256 for n in lens], dtype=torch.int32, device=cuda_device)
    scores, shist = run_scan(sc, table, 64, zone_end, nmax, 64, 16)
    want = collision_scores(padded_codes(sc).signs, table)
    for r, n in enumerate(lens):
        assert torch.equal(scores[r, :, :n].long(), want[r, :n].T)
        zone = want[r, 64 : int(zone_end[r])]
        for hh in range(h):
            ref = torch.bincount(zone[:, hh], minlength=shist.shape[-1])
            assert torch.equal(shist[r, hh].long(), ref)
    counts = torch.tensor([7000, 13000, 2048], device=cuda_device)
    cand = torch.empty(3, h, 13000, dtype=torch.int32, device=cuda_device)
    buf = CandidateBuffers(3 * h, nmax, 1024, cuda_device)
    select_candidates_gpu(scores, shist, counts, 64, zone_end, cand, buf)
    suffix = shist.flip(-1).cumsum(-1).flip(-1)  # keys scoring >= s
    for r in range(3):
        thr = (suffix[r] >= counts[r]).sum(-1) - 1
        assert torch.equal(buf.thr[r * h : (r + 1) * h].long(), thr)
    in_zone = zone_mask(nmax, 64, zone_end.long())
    pos, valid = select_candidates(scores.transpose(1, 2), in_zone, counts)
    for r in range(3):
        c = int(counts[r])
        got = cand[r, :, :c].sort(-1).values.long()
        assert torch.equal(got, pos[r, :, :c].sort(-1).values)


@pytest.mark.gpu
def test_cuda_scan_matches_triton(cuda_device):
    from sglang_pariskv.kernels.cuda_ops import collision_scan_cuda, cuda_available

    assert cuda_available()
    # Every run length the auto choice (launch_geometry.scan_tokens_per_block) can pick, and
    # longer; head counts with and without a padded staging stride (H even / odd), fewer
    # and more heads than the block's 16 warps; 32 KV heads x 128 (MHA at TP 1), whose
    # shared memory takes shorter chunks.
    shapes = ((128, 8), (64, 4), (128, 2), (128, 8), (64, 3), (128, 5), (64, 6), (128, 32))
    tpbs = (1024, 256, 512, 2048, 256, 1024, 512, 1024)
    for (d, h), tpb in zip(shapes, tpbs, strict=True):
        lens = [50000, 3000, 131072]
        nmax = 131072
        sc = make_scenario(lens, h, d, nmax, cuda_device, seed=d + h)
        table = random_table((3, h, d // 8, 256), device=cuda_device)
        table[0, 0] = 127  # the extreme sums: scores 255 and 1
        table[1, 0] = -127
        zone_end = torch.tensor([n - 256 for n in lens], dtype=torch.int32, device=cuda_device)
        want_s, want_h = run_scan(sc, table, 64, zone_end, nmax, 64, 16)
        scores = torch.zeros_like(want_s)
        shist = torch.zeros_like(want_h)
        collision_scan_cuda(
            sc.pool.signs,
            sc.req_to_token,
            sc.req_pool_indices,
            sc.seq_lens.long(),
            zone_end.long(),
            table,
            scores,
            shist,
            64,
            tpb,
        )
        assert torch.equal(scores, want_s)
        assert torch.equal(shist, want_h)
