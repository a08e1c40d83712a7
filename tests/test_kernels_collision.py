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


def sliced_reference(old, new, seq_lens, fresh, slices):
    """[R, N, H] scores after a sliced scan: ``new`` on the step's slice of granules (all
    of a fresh row), ``old`` elsewhere."""
    from sglang_pariskv.kernels.collision import SCAN_GRANULE

    pos = torch.arange(old.shape[1])
    out = old.clone()
    for r, n in enumerate(seq_lens.tolist()):
        take = (pos // SCAN_GRANULE) % slices == n % slices
        take = take | bool(fresh[r])
        out[r, take] = new[r, take]
    return out


def scan_rows(sc, table, buf, rows, fresh, slices, zone_start, zone_end, run):
    h = sc.pool.signs.shape[1]
    r = sc.seq_lens.numel()
    shist = torch.zeros(r, h, SCORE_BINS, dtype=torch.int32, device=buf.device)
    run(
        sc.pool.signs, sc.req_to_token, sc.req_pool_indices, sc.seq_lens, zone_end, table,
        buf, shist, zone_start, rows=rows, fresh=fresh, slices=slices,
    )  # fmt: skip
    return shist


def check_sliced_scan(run, device, lens, h, d, nmax, zone_start, window):
    """Two steps into a buffer whose rows are not the batch order: the first re-scores
    everything with one query's table, the second (rows 1 fresh, the others not) one
    slice with another's, keeping the first's scores elsewhere; the histogram counts
    the zone's mixed scores, and rows of no request are never written."""
    sc = make_scenario(lens, h, d, nmax, device, seed=h + d)
    sc.seq_lens = sc.seq_lens.long()
    r = len(lens)
    gen = torch.Generator().manual_seed(5)
    t1, t2 = (random_table((r, h, d // 8, 256), gen, device) for _ in range(2))
    buf = torch.zeros(r + 2, h, nmax, dtype=torch.uint8, device=device)
    rows = torch.tensor([r + 1, 0] + list(range(2, r)), dtype=torch.int32, device=device)
    zone_end = torch.tensor([n - window for n in lens], device=device)
    i32 = dict(dtype=torch.int32, device=device)
    scan_rows(sc, t1, buf, rows, torch.ones(r, **i32), 2, zone_start, zone_end, run)
    signs = padded_codes(sc).signs
    first = collision_scores(signs.cpu(), t1.cpu())  # [R, N, H]
    for i, n in enumerate(lens):
        assert torch.equal(buf[int(rows[i]), :, :n].cpu().long(), first[i, :n].T)
    fresh = torch.tensor([0, 1] + [0] * (r - 2), **i32)
    shist = scan_rows(sc, t2, buf, rows, fresh, 2, zone_start, zone_end, run)
    second = collision_scores(signs.cpu(), t2.cpu())
    want = sliced_reference(first, second, sc.seq_lens.cpu(), fresh.cpu(), 2)
    assert not torch.equal(want, second) and not torch.equal(want, first)
    for i, n in enumerate(lens):
        assert torch.equal(buf[int(rows[i]), :, :n].cpu().long(), want[i, :n].T), i
        zone = want[i, zone_start : n - window]
        for hh in range(h):
            ref = torch.bincount(zone[:, hh], minlength=SCORE_BINS)
            assert torch.equal(shist[i, hh].cpu().long(), ref), (i, hh)
    unused = set(range(r + 2)) - set(rows.tolist())
    assert all((buf[u] == 0).all() for u in unused)


def test_sliced_scan_rescores_one_slice_and_keeps_the_rest():
    def run(*args, **kw):
        collision_scan(*args[:9], 64, 4, **kw)

    # lengths of each parity and over two granules; a short one inside the first granule
    check_sliced_scan(run, DEV, [2301, 1500, 1700, 900], 2, 64, 2304, 5, 40)


@pytest.mark.gpu
@pytest.mark.parametrize("tpb", [1024, 512, 256])
def test_cuda_sliced_scan(cuda_device, tpb):
    from sglang_pariskv.kernels.cuda_ops import collision_scan_cuda

    def run(*args, **kw):
        collision_scan_cuda(*args, tokens_per_block=tpb, **kw)

    check_sliced_scan(run, cuda_device, [70001, 5000, 131072, 40000], 8, 128, 131072, 64, 256)


def test_selection_reads_each_requests_own_row():
    """Candidates from a permuted score buffer are those of the batch-ordered scores."""
    gen = torch.Generator().manual_seed(7)
    r, h, nmax = 3, 2, 300
    scores = torch.randint(0, 9, (r, h, nmax), generator=gen, dtype=torch.uint8)
    zone_end = torch.tensor([300, 120, 200], dtype=torch.int32)
    counts = torch.tensor([40, 11, 70], dtype=torch.int64)
    in_zone = zone_mask(nmax, 3, zone_end.long())
    shist = torch.zeros(r, h, 128, dtype=torch.int32)
    for i in range(r):
        for j in range(h):
            shist[i, j] = torch.bincount(scores[i, j][in_zone[i]].long(), minlength=128)
    rows = torch.tensor([4, 0, 2], dtype=torch.int32)
    # 255, the top score: rows read in batch order would pick those positions first
    buf_scores = torch.full((5, h, nmax), 255, dtype=torch.uint8)
    buf_scores[rows.long()] = scores
    cand = torch.full((r, h, 128), -1, dtype=torch.int32, device=DEV)
    buf = CandidateBuffers(r * h, nmax, 64, DEV)
    args = (shist.to(DEV), counts.to(DEV), 3, zone_end.to(DEV), cand, buf)
    select_candidates_gpu(buf_scores.to(DEV), *args, rows=rows.to(DEV))
    pos, valid = select_candidates(scores.transpose(1, 2), in_zone, counts)
    for i in range(r):
        c = int(counts[i])
        for j in range(h):
            assert sorted(cand[i, j, :c].cpu().tolist()) == sorted(pos[i, j][valid[i, j]].tolist())
