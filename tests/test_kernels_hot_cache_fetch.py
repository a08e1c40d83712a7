"""The fused hot-cache fetch (four Triton launches) against the tensor-op lookup, gather
and insert of tests/hot_cache_oracle.py: same staging positions, tags, counters and staged
rows, step after step, with conflicts, protected lines, duplicate rows and a partial
valid count.

CPU: Triton's interpreter on a plain-memory pool. `gpu`: a pinned pool over UVA."""

import pytest
import torch

from sglang_pariskv.offload.fetch import OffloadFetcher
from sglang_pariskv.offload.host_pool import HostKVPool
from sglang_pariskv.offload.hot_cache import HotCache
from tests.hot_cache_oracle import TensorOpFetcher, fetch_reference, rewrite

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def twin_fetchers(slots, layers, h, d, lines, entries, seed):
    pool = HostKVPool(slots, layers, h, d, check_memory=False)
    gen = torch.Generator().manual_seed(seed)
    pool.data.copy_(torch.randn(pool.data.shape, generator=gen).to(pool.dtype))
    make = lambda: HotCache(layers, lines, h, 2 * d, entries, pool.dtype, DEV)  # noqa: E731
    return TensorOpFetcher(pool, make()), OffloadFetcher(pool, make())


def steps(gen, n_rows, entries, count):
    """Entry lists that drift: most rows repeat from the last step, a few duplicates."""
    rows = torch.randint(0, n_rows, (entries,), generator=gen)
    for _ in range(count):
        keep = torch.rand(entries, generator=gen) < 0.7
        rows = torch.where(keep, rows, torch.randint(0, n_rows, (entries,), generator=gen))
        dup = torch.rand(entries, generator=gen) < 0.05
        rows = torch.where(dup, rows.roll(1), rows)
        yield rows.to(torch.int32)


@pytest.mark.parametrize("lines", [7, 64])  # 7: heavy conflicts; 64: mostly hits
def test_fused_fetch_equals_the_tensor_op_fetch(lines):
    h, d, slots, layers, entries = 2, 8, 50, 2, 96
    ref, fused = twin_fetchers(slots, layers, h, d, lines, entries, seed=lines)
    gen = torch.Generator().manual_seed(1)
    for t, rows in enumerate(steps(gen, slots * h, entries, 6)):
        layer = t % layers
        valid = entries - 5 * (t % 3)  # some steps leave the tail invalid
        indptr = torch.tensor([0, valid], dtype=torch.int32, device=DEV)
        want = ref.fetch(layer, indptr, rows.to(DEV))
        buf = rows.to(DEV).clone()
        got = fused.fetch(layer, indptr, buf, out=buf)  # in place, as the backend does
        assert torch.equal(got, want), t
        assert torch.equal(fused.cache.tags, ref.cache.tags), t
        assert torch.equal(fused.cache.counters, ref.cache.counters), t
        assert torch.equal(fused.cache.data.view(torch.int16), ref.cache.data.view(torch.int16))
        s = fused.scratch  # idle again for the next layer
        assert bool((s.claim == -1).all()) and not bool(s.prot.any())
        assert bool((s.first == 2**31 - 1).all())
    st = fused.cache.stats()
    assert st["hits"] > 0 and st["misses"] > 0 and st["rows_fetched"] > 0


def test_fused_fetch_refuses_mismatched_staging_rows():
    from sglang_pariskv.kernels.hot_cache_fetch import FetchScratch, hot_cache_fetch

    k = torch.zeros(10, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="do not hold K|V"):
        hot_cache_fetch(
            0, torch.zeros(4, dtype=torch.int32), torch.tensor([4], dtype=torch.int32),
            torch.full((4,), -1), torch.zeros(8, 8, dtype=torch.bfloat16),
            torch.zeros(3, dtype=torch.int64), k, k, torch.zeros(4, dtype=torch.int32),
            FetchScratch(4, 4, "cpu"), 4,
        )  # fmt: skip


def test_fused_fetch_serves_fresh_rows_across_rewrites_and_layers():
    """Serving's pattern: per step, each layer rewrites some slots (new KV, invalidated),
    then fetches; the staged rows must always be the host's current rows."""
    h, d, slots, layers, entries, lines = 2, 8, 40, 3, 64, 16
    ref, fused = twin_fetchers(slots, layers, h, d, lines, entries, seed=3)
    gen = torch.Generator().manual_seed(4)
    for t, rows in enumerate(steps(gen, slots * h, entries, 8)):
        for layer in range(layers):
            new = torch.randperm(slots, generator=gen)[:3]
            k, v = (torch.randn(3, h, d, generator=gen).bfloat16() for _ in range(2))
            rewrite(fused.pool, [ref.cache, fused.cache], layer, new.to(DEV), k.to(DEV), v.to(DEV))
            indptr = torch.tensor([0, entries - t], dtype=torch.int32, device=DEV)
            want = ref.fetch(layer, indptr, rows.to(DEV))
            buf = rows.to(DEV).clone()
            got = fused.fetch(layer, indptr, buf, out=buf)
            assert torch.equal(got, want), (t, layer)
            n = entries - t
            host = fetch_reference(fused.pool, layer, indptr.cpu(), rows)
            staged = fused.cache.data[got[:n].long()].cpu()
            assert torch.equal(staged.view(torch.int16), host.view(torch.int16)), (t, layer)
