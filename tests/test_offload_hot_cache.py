"""The hot cache's rules as tensor ops (tests/hot_cache_oracle.py, the oracle of the fused
fetch) against a plain-Python model, and no stale rows after rewrites.

The data oracle does not depend on the replacement policy: after each step, every valid
entry's staging row must equal the host row it names."""

import math
import random

import pytest
import torch

from sglang_pariskv.offload.hot_cache import HotCache
from tests.hot_cache_oracle import insert, lookup

H, W = 2, 6  # KV heads, row width (elements)


class HotCacheModel:
    """The replacement rules of HotCache, one entry at a time, in plain Python."""

    def __init__(self, layers, lines, max_entries):
        self.lines, self.base = lines, layers * lines
        self.tags = [[-1] * lines for _ in range(layers)]
        self.hits = self.misses = self.fetched = 0

    def step(self, layer, rows, n_valid):
        tags, c = self.tags[layer], self.lines
        valid = [i < n_valid for i in range(len(rows))]
        hit = [v and tags[x % c] == x for v, x in zip(valid, rows)]
        protected = {rows[i] % c for i in range(len(rows)) if hit[i]}
        winner = {}
        for i, x in enumerate(rows):
            if valid[i] and not hit[i] and x % c not in protected:
                winner[x % c] = max(winner.get(x % c, -1), x)
        pos, fill, claimed = [], [], set()
        for i, x in enumerate(rows):
            if not valid[i]:
                pos.append(0)
                fill.append(False)
            elif hit[i]:
                pos.append(layer * c + x % c)
                fill.append(False)
            elif winner.get(x % c) == x:
                pos.append(layer * c + x % c)
                fill.append(x % c not in claimed)  # first entry of the installed row
                claimed.add(x % c)
            else:
                pos.append(self.base + i)
                fill.append(True)
        for line, x in winner.items():
            tags[line] = x
        self.hits += sum(hit)
        self.misses += sum(valid) - sum(hit)
        self.fetched += sum(fill)
        return hit, pos, fill

    def invalidate(self, slots, layer):
        for x in (s * H + h for s in slots for h in range(H)):
            if self.tags[layer][x % self.lines] == x:
                self.tags[layer][x % self.lines] = -1


def host_rows(layers, slots, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(layers, slots * H, W, generator=gen)


def run_step(cache, host, layer, rows, n_valid):
    """lookup -> fetch the fill rows (torch) -> insert; returns the lookup."""
    rows = torch.tensor(rows, dtype=torch.int32)
    valid = torch.arange(rows.numel()) < n_valid
    lk = lookup(cache, layer, rows, valid)
    fill = lk.fill
    cache.data[lk.pos[fill]] = host[layer][lk.rows[fill]]
    insert(cache, layer, lk)
    return lk


def assert_rows_served(cache, host, layer, rows, n_valid, lk):
    for i in range(n_valid):
        assert torch.equal(cache.data[lk.pos[i]], host[layer][rows[i]]), (layer, i, rows[i])


def test_random_access_sequences_match_the_model_and_serve_true_rows():
    rnd = random.Random(0)
    layers, lines, slots, e = 2, 16, 40, 24
    cache = HotCache(layers, lines, H, W, e, torch.float32, "cpu")
    model = HotCacheModel(layers, lines, e)
    host = host_rows(layers, slots, seed=1)
    working = [rnd.randrange(slots * H) for _ in range(14)]
    for step in range(60):
        layer = rnd.randrange(layers)
        # a drifting working set (most rows re-selected), duplicates, garbage past n_valid
        for _ in range(rnd.randrange(4)):
            working[rnd.randrange(len(working))] = rnd.randrange(slots * H)
        n_valid = rnd.randrange(1, e + 1)
        rows = [rnd.choice(working) if rnd.random() < 0.8 else rnd.randrange(slots * H)]
        rows += [rnd.choice(working) for _ in range(n_valid - 1)]
        rows += [rnd.randrange(slots * H) for _ in range(e - n_valid)]
        if step % 7 == 3:  # rewrite a few slots: host rows change, cache must drop them
            rewritten = rnd.sample(range(slots), 3)
            for s in rewritten:
                host[:, s * H : (s + 1) * H] = torch.randn(layers, H, W)
            for lay in range(layers):
                cache.invalidate(torch.tensor(rewritten), lay)
                model.invalidate(rewritten, lay)
        lk = run_step(cache, host, layer, rows, n_valid)
        hit, pos, fill = model.step(layer, rows, n_valid)
        assert lk.hit.tolist() == hit, step
        assert lk.pos.tolist() == pos, step
        assert lk.fill.tolist() == fill, step
        assert cache.tags.tolist() == model.tags, step
        assert_rows_served(cache, host, layer, rows, n_valid, lk)
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["rows_fetched"]) == (
        model.hits,
        model.misses,
        model.fetched,
    )
    assert 0.2 < stats["hit_rate"] < 0.95  # both paths were exercised


def test_invalidate_on_slot_reuse_never_serves_stale_rows():
    cache = HotCache(1, 64, H, W, 8, torch.float32, "cpu")
    host = host_rows(1, 32, seed=2)
    rows = [3 * H, 3 * H + 1, 7 * H]  # slot 3 (both heads), slot 7 head 0
    run_step(cache, host, 0, rows, 3)
    assert run_step(cache, host, 0, rows, 3).hit.all()  # cached
    host[0, 3 * H : 4 * H] = torch.randn(H, W)  # slot 3 reused: new KV written
    # negative control: without invalidation the cache would serve the old rows
    stale = HotCache(1, 64, H, W, 8, torch.float32, "cpu")
    stale.tags.copy_(cache.tags)
    stale.data.copy_(cache.data)
    lk = run_step(stale, host, 0, rows, 3)
    assert lk.hit.all() and not torch.equal(stale.data[lk.pos[0]], host[0, rows[0]])
    cache.invalidate(torch.tensor([3]))  # all layers
    lk = run_step(cache, host, 0, rows, 3)
    assert lk.hit.tolist() == [False, False, True]  # slot 7 untouched
    assert_rows_served(cache, host, 0, rows, 3, lk)


def test_invalidate_keeps_a_colliding_row_of_another_slot():
    cache = HotCache(1, 8, H, W, 4, torch.float32, "cpu")
    host = host_rows(1, 32, seed=3)
    run_step(cache, host, 0, [5], 1)  # row 5 (slot 2, head 1) in line 5
    cache.invalidate(torch.tensor([6, 6]))  # rows 12, 13 -> lines 4, 5: not row 5
    assert cache.tags[0, 5] == 5


def test_steady_state_hit_rate_is_the_occupied_line_fraction():
    """n distinct rows re-selected every step: hits from step 2 on = lines they occupy,
    close to the docstring's C (1 - exp(-n / C)) / n."""
    lines, n = 1024, 256
    cache = HotCache(1, lines, H, W, n, torch.float32, "cpu")
    host = host_rows(1, 8192, seed=4)
    rows = random.Random(5).sample(range(8192 * H), n)
    run_step(cache, host, 0, rows, n)
    hits = int(run_step(cache, host, 0, rows, n).hit.sum())
    assert hits == len({x % lines for x in rows})
    expected = lines * (1 - math.exp(-n / lines))
    assert abs(hits - expected) < 0.05 * n


def test_duplicate_rows_share_one_line_and_one_fetch():
    cache = HotCache(2, 16, H, W, 6, torch.float32, "cpu")
    host = host_rows(2, 16, seed=6)
    rows = [9, 25, 9, 9, 25, 4]  # 9 and 25 collide in line 9; 25 wins (larger)
    lk = run_step(cache, host, 1, rows, 6)
    assert lk.pos.tolist()[:5] == [32 + 0, 16 + 9, 32 + 2, 32 + 3, 16 + 9]  # overflow at 2 x 16
    assert lk.fill.tolist() == [True, True, True, True, False, True]
    assert_rows_served(cache, host, 1, rows, 6, lk)
    lk = run_step(cache, host, 1, rows, 6)  # 25 and 4 hit; 9 stays in overflow
    assert lk.hit.tolist() == [False, True, False, False, True, True]


def test_counter_reader_reports_increments_once():
    from sglang_pariskv.offload.counters import HotCacheCounterReader

    cache = HotCache(2, 8, H, W, 16, torch.float32, "cpu")
    reader = HotCacheCounterReader(cache)
    cache.counters += torch.tensor([[3, 1, 1], [2, 2, 1]])
    assert reader.poll() == {"hits": 5, "misses": 3, "rows_fetched": 2}
    assert reader.poll() == {"hits": 0, "misses": 0, "rows_fetched": 0}
    cache.counters[1, 0] += 4
    assert reader.poll()["hits"] == 4 and reader.totals["hits"] == 9


@pytest.mark.gpu
def test_gpu_counter_reader_never_syncs_and_catches_up():
    from sglang_pariskv.offload.counters import HotCacheCounterReader

    cache = HotCache(2, 8, H, W, 16, torch.float32, "cuda")
    reader = HotCacheCounterReader(cache)
    cache.counters += 1
    first = reader.poll()  # enqueues the copy; nothing readable yet
    assert first == {"hits": 0, "misses": 0, "rows_fetched": 0}
    torch.cuda.synchronize()
    assert reader.poll() == {"hits": 2, "misses": 2, "rows_fetched": 2}
