"""OffloadFetcher: retrieval indices -> staged rows that equal the host pool's, step after
step, with hot-cache reuse, invalidation on writes, and the real DecodeWorkspace's output.

CPU: the UVA gather runs in Triton's interpreter on a plain-memory pool. `gpu` tests: a
pinned pool, CUDA-graph replay, and FlashInfer over the staging buffer and over the host
pool's CUDA views (zero-copy, no hot cache) vs over a GPU pool."""

import pytest
import torch

from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.kernels import DecodeWorkspace
from sglang_pariskv.kernels.assemble import kv_indptr_for
from sglang_pariskv.offload.fetch import OffloadFetcher
from sglang_pariskv.offload.host_pool import HostKVPool
from sglang_pariskv.offload.hot_cache import HotCache
from tests.hot_cache_oracle import fetch_reference, rewrite
from tests.kernel_cases import make_scenario

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_fetcher(slots, layers, h, d, lines, entries, seed=0, device=DEV):
    pool = HostKVPool(slots, layers, h, d, check_memory=False)
    gen = torch.Generator().manual_seed(seed)
    pool.data.copy_(torch.randn(pool.data.shape, generator=gen).to(pool.dtype))
    cache = HotCache(layers, lines, h, 2 * d, entries, pool.dtype, device)
    return OffloadFetcher(pool, cache)


def synthetic_step(seq, h, cfg, slots_of, tops):
    """Head-as-batch entries of one step: sink + local + top-k per (request, head)."""
    indptr = kv_indptr_for(torch.tensor(seq), cfg, h)
    entries = []
    for r, n in enumerate(seq):
        pos = list(range(cfg.sink)) + list(range(n - cfg.local, n))
        for j in range(h):
            chosen = pos + tops[r][j]
            entries += [int(slots_of[r][p]) * h + j for p in chosen]
    return indptr.to(torch.int32), torch.tensor(entries, dtype=torch.int32)


def assert_staged(fetcher, layer, indptr, indices, staged):
    n = int(indptr[-1])
    want = fetch_reference(fetcher.pool, layer, indptr, indices)
    got = fetcher.cache.data[staged[:n].long()].cpu()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_fetch_over_drifting_steps_stages_exact_rows_and_reuses_them():
    cfg = ParisKVConfig(topk=12, sink=2, local=4, dense_threshold=16)
    h, d, seq = 2, 8, [60, 45]
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(200, generator=gen) + 1
    # request 1 shares request 0's first 10 slots (a radix-cache prefix hit): sink rows
    # are then selected twice per head in one step, and fetched once
    slots_of = [perm[:60], torch.cat([perm[:10], perm[60:95]])]
    capacity = len(seq) * h * cfg.budget + 5
    f = make_fetcher(220, 2, h, d, lines=256, entries=capacity)
    zone = [list(range(cfg.sink, n - cfg.local)) for n in seq]

    def drift(top, zone_r, k):  # replace k of the top-k tokens by new ones of the zone
        fresh = [zone_r[p] for p in torch.randperm(len(zone_r), generator=gen).tolist()]
        fresh = [p for p in fresh if p not in top]
        return top[k:] + fresh[:k]

    def first(zone_r):
        return [zone_r[p] for p in torch.randperm(len(zone_r), generator=gen)[: cfg.topk]]

    tops = [[first(zone[r]) for _ in range(h)] for r in range(len(seq))]
    for step in range(4):
        tops = [[drift(t, zone[r], 2) if step else t for t in tops[r]] for r in range(len(seq))]
        assert all(len(set(t)) == cfg.topk for row in tops for t in row)
        indptr, indices = synthetic_step(seq, h, cfg, slots_of, tops)
        buf = torch.full((capacity,), 7, dtype=torch.int32)
        buf[: indices.numel()] = indices
        buf, indptr = buf.to(DEV), indptr.to(DEV)
        for layer in range(2):
            before = f.cache.stats()
            staged = f.fetch(layer, indptr, buf.clone())
            assert staged.dtype == torch.int32 and bool((staged[int(indptr[-1]) :] == 0).all())
            assert_staged(f, layer, indptr, buf, staged)
            after = f.cache.stats()
            assert after["hits"] + after["misses"] - before["hits"] - before["misses"] == int(
                indptr[-1]
            )
    stats = f.cache.stats()
    assert stats["hit_rate"] > 0.55  # 3 of 4 steps re-select 16 of 18 rows per head
    assert stats["rows_fetched"] < stats["misses"]  # shared sink rows fetched once
    # in place: the staging indices may overwrite kv_indices itself
    staged = f.fetch(0, indptr, buf.clone())
    inplace = buf.clone()
    assert f.fetch(0, indptr, inplace, out=inplace) is inplace
    assert torch.equal(inplace, staged)


def test_rewritten_and_moved_slots_are_fetched_again_from_the_host():
    """The host-offload KV pool's writers drop what they rewrite from the cache (a store:
    its layer's rows of the slots; a move: every layer's rows of the targets), so the
    next fetch stages the host's new rows instead of hitting the old ones."""
    h, d = 2, 8
    f = make_fetcher(32, 1, h, d, lines=64, entries=8)
    rows = torch.tensor([5 * h, 5 * h + 1, 9 * h, 0, 0, 0, 0, 0], dtype=torch.int32, device=DEV)
    indptr = torch.tensor([0, 3], dtype=torch.int32, device=DEV)
    f.fetch(0, indptr, rows)
    f.fetch(0, indptr, rows)
    assert f.cache.stats()["hits"] == 3
    gen = torch.Generator().manual_seed(2)
    k, v = (torch.randn(1, h, d, generator=gen).bfloat16() for _ in range(2))
    rewrite(f.pool, [f.cache], 0, torch.tensor([5], device=DEV), k.to(DEV), v.to(DEV))
    staged = f.fetch(0, indptr, rows)
    assert f.cache.stats()["hits"] == 3 + 1  # only slot 9 hit
    assert torch.equal(f.cache.data[staged[0]].cpu(), torch.cat([k[0, 0], v[0, 0]]))
    assert_staged(f, 0, indptr, rows, staged)
    f.pool.data[:, :, 9] = f.pool.data[:, :, 5]  # a move: slot 9 now holds slot 5's KV
    f.cache.invalidate(torch.tensor([9], device=DEV))
    staged = f.fetch(0, indptr, rows)
    assert torch.equal(f.cache.data[staged[2]].cpu(), torch.cat([k[0, 0], v[0, 0]]))
    assert_staged(f, 0, indptr, rows, staged)


def test_fetcher_refuses_a_cache_of_other_rows():
    pool = HostKVPool(8, 2, 2, 8, check_memory=False)
    with pytest.raises(ValueError, match="rows"):
        OffloadFetcher(pool, HotCache(2, 8, 2, 8, 4, pool.dtype, DEV))
    with pytest.raises(ValueError, match="layer"):
        OffloadFetcher(pool, HotCache(1, 8, 2, 16, 4, pool.dtype, DEV))


def test_fetch_of_the_real_workspace_indices():
    """DecodeWorkspace (one-token rows for dense requests) -> fetch: staged rows
    equal the host rows the workspace selected; queries drifting a little re-hit."""
    cfg = ParisKVConfig(topk=24, sink=4, local=8, dense_threshold=100)
    h, d = 2, 64
    sc = make_scenario([400, 90], h, d, 420, DEV, dtype=torch.bfloat16, seed=0)
    ws = DecodeWorkspace(
        cfg, 2 * h, h, d, max_batch=2, max_context=420, device=DEV, chunk=64, scan_block=16,
        scan_tiles=4,
    )  # fmt: skip
    slots = sc.pool.signs.shape[0]
    f = make_fetcher(slots, 2, h, d, lines=512, entries=ws.kv_indices.numel(), seed=3)
    gen = torch.Generator().manual_seed(4)
    q0 = torch.randn(2, 2 * h, d, generator=gen)
    for _ in range(3):
        ws.plan(sc.seq_lens.cpu())
        q = (q0 + 0.05 * torch.randn(q0.shape, generator=gen)).bfloat16().to(DEV)
        out = ws.run(q, sc.pool, sc.req_to_token, sc.req_pool_indices)
        staged = f.fetch(0, out.kv_indptr, out.kv_indices)
        assert_staged(f, 0, out.kv_indptr, out.kv_indices, staged)
    assert int(out.kv_indptr[-1]) == h * cfg.budget + h  # sparse rows + 1-token dense rows
    assert f.cache.stats()["hit_rate"] > 0.5
    staged = f.fetch(1, out.kv_indptr, out.kv_indices)  # another layer: its own lines
    assert_staged(f, 1, out.kv_indptr, out.kv_indices, staged)
    assert int(f.cache.counters[1, 0]) == 0


@pytest.mark.gpu
def test_gpu_fetch_in_a_cuda_graph_matches_eager_and_the_pool():
    """Pinned pool, fetch captured once in a CUDA graph, replayed over new indices: the
    same positions, counters and staged rows as an eager twin; rows equal the pool's."""
    h, d, slots, n = 4, 128, 1 << 16, 3 * 4 * 2368
    lines = 1 << 17  # ~4.6 lines per entry: ~90% of re-selected rows keep their line
    eager = make_fetcher(slots, 2, h, d, lines=lines, entries=n, seed=5)
    graphed = OffloadFetcher(eager.pool, HotCache(2, lines, h, 2 * d, n, eager.pool.dtype, "cuda"))
    assert eager.pool.pinned
    gen = torch.Generator().manual_seed(6)
    indptr = (torch.arange(3 * h + 1, dtype=torch.int32) * 2368).cuda()
    base = torch.randint(0, slots * h, (n,), generator=gen, dtype=torch.int32)
    idx = base.clone().cuda()
    out = torch.empty(n, dtype=torch.int32, device="cuda")
    graphed.fetch(1, indptr, idx, out=out)  # warm-up (Triton compile) outside capture
    graphed.cache.reset()
    graphed.cache.counters.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.fetch(1, indptr, idx, out=out)
    graphed.cache.reset()
    graphed.cache.counters.zero_()
    for _ in range(4):
        keep = torch.rand(n, generator=gen) < 0.9
        base = torch.where(keep, base, torch.randint(0, slots * h, (n,), generator=gen).int())
        idx.copy_(base)
        graph.replay()
        want = eager.fetch(1, indptr, base.cuda())
        assert torch.equal(out, want)
        assert_staged(graphed, 1, indptr.cpu(), base, out.cpu())
    assert torch.equal(graphed.cache.counters, eager.cache.counters)
    assert graphed.cache.stats()["hit_rate"] > 0.5


@pytest.mark.gpu
def test_gpu_flashinfer_over_staging_equals_flashinfer_over_the_pool():
    """The non-offloaded sparse call (pool [slots*Hkv, 1, 1, D], index slot*Hkv + head) vs
    the offloaded one (staging [rows, 2, 1, 1, D], staged index): bit-identical output."""
    from flashinfer import BatchDecodeWithPagedKVCacheWrapper

    h, group, d, slots, r, m = 4, 7, 128, 1 << 15, 2, 2368
    f = make_fetcher(slots, 1, h, d, lines=1 << 14, entries=r * h * m, seed=7)
    k_pool, v_pool = f.pool.data[0].cuda()  # [2, slots, Hkv, D]: a GPU pool, same KV
    gen = torch.Generator().manual_seed(8)
    indptr = torch.arange(r * h + 1, dtype=torch.int32) * m
    indices = torch.cat(
        [torch.randperm(slots, generator=gen)[:m] * h + j for _ in range(r) for j in range(h)]
    ).to(torch.int32)
    staged = f.fetch(0, indptr.cuda(), indices.cuda())
    q = torch.randn(r * h, group, d, generator=gen).bfloat16().cuda()
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    outs = []
    k_host, v_host = f.pool.cuda_views("cuda")  # the host pool read directly over UVA
    for idx, cache in (
        (indices, (k_pool.view(-1, 1, 1, d), v_pool.view(-1, 1, 1, d))),
        (staged.cpu(), f.staging_kv()),
        (indices, (k_host[0].view(-1, 1, 1, d), v_host[0].view(-1, 1, 1, d))),
    ):
        w = BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
        w.plan(
            indptr, idx.cuda(), torch.ones(r * h, dtype=torch.int32), num_qo_heads=group,
            num_kv_heads=1, head_dim=d, page_size=1, q_data_type=torch.bfloat16,
            kv_data_type=torch.bfloat16,
        )  # fmt: skip
        outs.append(w.run(q, cache))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
