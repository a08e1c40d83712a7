"""The hot-cache fetch of one layer in four Triton launches: lookup, UVA gather, insert.

Why fused: the same rules as tensor ops take ~20 launches of a few µs each (gathers,
compares, three ``scatter_reduce`` over the cache lines, ``where``s): ~0.2 ms per layer,
5-8 ms per 28-layer step on an H100, more than the PCIe reads they save. The rules are
:class:`offload.hot_cache.HotCache`'s; ``tests/hot_cache_oracle.py`` states them as tensor
ops, and ``tests/test_kernels_hot_cache_fetch.py`` compares positions, tags, counters and
the staged rows against it.

Per entry ``i`` (one ``kv_indices`` entry, row ``x = rows[i]``, line ``x mod C``):

1. ``_classify``: hit / miss / invalid into ``state[i]``; a hit protects its line, a miss
   bids for it with ``atomic_max(claim[line], x)``; ``line[i]`` is kept because the
   caller may reuse ``rows`` as the output (it is overwritten in step 3).
2. ``_elect``: a miss whose line is unprotected and whose bid won installs; the first such
   entry of the line (``atomic_min(first[line], i)``) will fetch it.
3. ``_place``: the staging position of every entry, the UVA gather of the fetched rows
   (K into the row's first half, V into its second), the new tag of each installed line,
   the layer's counters.
4. ``_reset``: the scratch of the lines touched goes back to its idle value, so the next
   layer starts clean without a memset over all lines.

Fixed grid (the entry capacity), device-side count, no host sync: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_pariskv.kernels.uva_gather import kernel_arg

#: ``state[i]`` codes written by the kernels: 0 invalid, 1 hit, 2 miss, 3 install.
#: ``first[line]`` when no entry installs into the line:
_IDLE_FIRST = 2**31 - 1


@triton.jit
def _classify(rows, count, tags, state, line_of, claim, prot, n, C, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = (i < n) & (i < tl.load(count).to(tl.int64))
    x = tl.load(rows + i, mask=ok, other=0).to(tl.int64)
    line = x % C
    hit = ok & (tl.load(tags + line, mask=ok, other=-1) == x)
    miss = ok & (hit == 0)
    tl.store(prot + line, tl.full([BLOCK], 1, tl.int32), mask=hit)
    tl.atomic_max(claim + line, x, mask=miss)
    tl.store(state + i, tl.where(hit, 1, tl.where(miss, 2, 0)).to(tl.int8), mask=i < n)
    tl.store(line_of + i, line.to(tl.int32), mask=ok)


@triton.jit
def _elect(rows, state, line_of, claim, prot, first, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = i < n
    st = tl.load(state + i, mask=inb, other=0)
    miss = st == 2
    line = tl.load(line_of + i, mask=miss, other=0).to(tl.int64)
    x = tl.load(rows + i, mask=miss, other=0).to(tl.int64)
    free = tl.load(prot + line, mask=miss, other=1) == 0
    won = tl.load(claim + line, mask=miss, other=-1) == x
    install = miss & free & won
    tl.atomic_min(first + line, i.to(tl.int32), mask=install)
    tl.store(state + i, tl.full([BLOCK], 3, tl.int8), mask=install)


@triton.jit
def _place(
    rows, state, line_of, first, tags, k_src, v_src, data, pos_out, counters,
    n, C, base, overflow, data_stride,
    D: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = i < n
    st = tl.load(state + i, mask=inb, other=0)
    valid = st != 0
    line = tl.load(line_of + i, mask=valid, other=0).to(tl.int64)
    x = tl.load(rows + i, mask=valid, other=0).to(tl.int64)
    install = st == 3
    lead = install & (tl.load(first + line, mask=install, other=-1) == i)
    fill = lead | (st == 2)
    in_line = (st == 1) | install
    pos = tl.where(in_line, base + line, overflow + i)
    pos = tl.where(valid, pos, 0)
    tl.store(tags + line, x, mask=lead)
    d = tl.arange(0, D)
    src = x[:, None] * D + d[None, :]
    dst = pos[:, None] * data_stride + d[None, :]
    m = fill[:, None]
    tl.store(data + dst, tl.load(k_src + src, mask=m), mask=m)
    tl.store(data + dst + D, tl.load(v_src + src, mask=m), mask=m)
    tl.store(pos_out + i, pos.to(tl.int32), mask=inb)
    tl.atomic_add(counters + 0, tl.sum((st == 1).to(tl.int64)))
    tl.atomic_add(counters + 1, tl.sum((valid & (st != 1)).to(tl.int64)))
    tl.atomic_add(counters + 2, tl.sum(fill.to(tl.int64)))


@triton.jit
def _reset(state, line_of, claim, prot, first, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = tl.load(state + i, mask=i < n, other=0) != 0
    line = tl.load(line_of + i, mask=valid, other=0).to(tl.int64)
    tl.store(claim + line, tl.full([BLOCK], -1, tl.int64), mask=valid)
    tl.store(prot + line, tl.zeros([BLOCK], tl.int32), mask=valid)
    tl.store(first + line, tl.full([BLOCK], 2**31 - 1, tl.int32), mask=valid)


class FetchScratch:
    """Per-line and per-entry scratch of :func:`hot_cache_fetch` (idle between calls)."""

    def __init__(self, lines: int, max_entries: int, device):
        self.claim = torch.full((lines,), -1, dtype=torch.int64, device=device)
        self.prot = torch.zeros(lines, dtype=torch.int32, device=device)
        self.first = torch.full((lines,), _IDLE_FIRST, dtype=torch.int32, device=device)
        self.state = torch.zeros(max_entries, dtype=torch.int8, device=device)
        self.line_of = torch.zeros(max_entries, dtype=torch.int32, device=device)


def hot_cache_fetch(
    layer: int,
    rows: torch.Tensor,
    count: torch.Tensor,
    tags: torch.Tensor,
    data: torch.Tensor,
    counters: torch.Tensor,
    k_src: torch.Tensor,
    v_src: torch.Tensor,
    out: torch.Tensor,
    scratch: FetchScratch,
    overflow_base: int,
    block: int = 128,
) -> None:
    """One layer: ``out[i]`` = staging row of entry ``i`` of ``rows`` (int32, entries
    ``i < count[0]`` valid, the rest get 0), with the missing rows gathered from
    ``k_src``/``v_src`` (host ``[rows, D]`` K and V views) into ``data`` ``[L·C + E, 2·D]``.
    ``tags``: this layer's ``[C]`` line tags; ``counters``: this layer's ``[3]`` (hits,
    misses, fetched); entry ``i`` that fits no line goes to ``overflow_base + i``. ``out``
    may be ``rows`` itself."""
    n = rows.numel()
    if n == 0:
        return
    c = tags.numel()
    d = k_src.shape[1]
    if n > scratch.state.numel():
        raise ValueError(f"{n} entries > the scratch's {scratch.state.numel()}")
    if data.element_size() != k_src.element_size() or data.shape[1] != 2 * d:
        raise ValueError(f"staging rows {tuple(data.shape)} {data.dtype} do not hold K|V {d}")
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32}[data.element_size()]
    grid = (triton.cdiv(n, block),)
    s = scratch
    _classify[grid](rows, count, tags, s.state, s.line_of, s.claim, s.prot, n, c, BLOCK=block)
    _elect[grid](rows, s.state, s.line_of, s.claim, s.prot, s.first, n, BLOCK=block)
    on_gpu = data.is_cuda
    _place[grid](
        rows, s.state, s.line_of, s.first, tags,
        kernel_arg(k_src.view(bits), on_gpu), kernel_arg(v_src.view(bits), on_gpu),
        data.view(bits), out, counters,
        n, c, layer * c, overflow_base, data.stride(0),
        D=d, BLOCK=block,
    )  # fmt: skip
    _reset[grid](s.state, s.line_of, s.claim, s.prot, s.first, n, BLOCK=block)
