"""The final top-k of a decode step, spread over many programs per row (Triton).

Why: the CUDA top-k (``csrc/topk.cu``) runs one block per (request, KV head) row. At
batch 1 that is 4 blocks on 132 SMs for the Qwen2.5-7B shape, and at 1M tokens each block
walks 100K candidates four times: 146 us per layer, the largest stage of a 1M-token
step's retrieval (benchmarks/results/kernels.json). Here every row is cut into ``S``
chunks and each (row, chunk) is a program, so the grid fills the GPU at any batch.

Method: a radix select on order-preserving int32 keys of the float32 estimates, in three
levels (bits 31-21, 20-10, 9-0), each one launch of all programs:

* level ``L`` histograms, in each program, the keys of its chunk that share the prefix
  selected by the levels before it (``tl.histogram``, then one atomic add per bin into
  the row's global histogram);
* every program of the next launch re-derives the selected bin of each earlier level
  from the row's histograms (a 2K-bin prefix sum, cheaper than a launch of its own);
* the last launch knows the k-th largest key ``T`` exactly: each program writes its keys
  ``> T`` and, while the row's quota lasts, its keys ``== T``, at positions reserved with
  one atomic add per program.

Four launches plus a memset of the histograms. Output is the KV slots of each row's
``min(k, C)`` best estimates, unordered (a set, as FlashInfer attends it); among keys equal
to the k-th, which are taken is arbitrary, as in the CUDA and torch versions. The oracle
is :func:`kernels.rerank.topk_slots` (``torch.topk``).

Measured on the H100 (benchmarks/results/kernels_topk_radix.json): slower than the CUDA
top-k, 177 vs 146 us per layer at 1M x 1 and 963 vs 158 us at 1M x 8, so it is opt-in
(``SGLANG_PARISKV_TOPK=radix``) and the CUDA one stays the default. Not profiled yet; the
global atomics of the histogram launches are the first suspect at batch 8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: bins of the three radix levels (11, 11 and 10 bits of the key)
_NB1, _NB2, _NB3 = 2048, 2048, 1024
HIST_WIDTH = _NB1 + _NB2 + _NB3
_HIST_ROW = tl.constexpr(HIST_WIDTH)  # a row's stride in the histogram buffer, in kernels
#: keys per program step; a program walks its chunk in blocks of this many
BLOCK = 2048


@triton.jit
def _order_key(x):
    """float32 -> int32 whose signed order is the float order (negatives: flip the 31
    magnitude bits, so larger magnitude sorts lower)."""
    i = x.to(tl.int32, bitcast=True)
    return i ^ ((i >> 31) & 0x7FFFFFFF)


@triton.jit
def _select_bin(hist_ptr, need, NB: tl.constexpr):
    """The bin ``b`` holding the ``need``-th largest key: count(> b) < need <= count(>= b).
    Returns (b, count of keys in bins above b)."""
    idx = tl.arange(0, NB)
    h = tl.load(hist_ptr + idx)
    gt = tl.sum(h, 0) - tl.cumsum(h, 0)  # keys in bins above each bin
    ok = (gt < need) & (gt + h >= need)
    b = tl.max(tl.where(ok, idx, -1), 0)
    return b, tl.sum(tl.where(idx > b, h, 0), 0)


@triton.jit
def _thresholds(hist_ptr, kk, LEVELS: tl.constexpr):
    """Bins selected by the first ``LEVELS`` levels, the signed key prefix they fix, and
    the keys strictly above that prefix's range."""
    b1, above = _select_bin(hist_ptr, kk, 2048)
    prefix = b1 - 1024  # the top 11 bits of the signed key
    if LEVELS >= 2:
        b2, a2 = _select_bin(hist_ptr + 2048, kk - above, 2048)
        above += a2
        prefix = (prefix << 11) | b2
    if LEVELS >= 3:
        b3, a3 = _select_bin(hist_ptr + 4096, kk - above, 1024)
        above += a3
        prefix = (prefix << 10) | b3
    return prefix, above


@triton.jit
def _row_chunk(counts_ptr, CHUNK, K, H: tl.constexpr):
    """This program's row, the row's min(k, count), and its chunk [lo, hi) of the row."""
    row = tl.program_id(0)
    c = tl.load(counts_ptr + row // H).to(tl.int32)
    lo = tl.program_id(1) * CHUNK
    return row, tl.minimum(K, c), lo, tl.minimum(lo + CHUNK, c)


@triton.jit
def _histogram_kernel(
    est_ptr,
    counts_ptr,
    hist_ptr,
    CMAX,
    CHUNK,
    K,
    H: tl.constexpr,
    LEVEL: tl.constexpr,
    NB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, kk, lo, hi = _row_chunk(counts_ptr, CHUNK, K, H)
    if (kk > 0) & (lo < hi):
        hrow = hist_ptr + row.to(tl.int64) * _HIST_ROW
        out = hrow + (LEVEL - 1) * 2048
        prefix = 0
        if LEVEL > 1:
            prefix, _ = _thresholds(hrow, kk, LEVEL - 1)
        acc = tl.zeros((NB,), dtype=tl.int32)
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < hi
            key = _order_key(tl.load(est_ptr + row.to(tl.int64) * CMAX + offs, mask=m))
            if LEVEL == 1:
                bins = (key >> 21) + 1024
            elif LEVEL == 2:
                m = m & ((key >> 21) == prefix)
                bins = (key >> 10) & 2047
            else:
                m = m & ((key >> 10) == prefix)
                bins = key & 1023
            acc += tl.histogram(tl.where(m, bins, 0), NB, mask=m)
        idx = tl.arange(0, NB)
        tl.atomic_add(out + idx, acc, mask=acc > 0)


@triton.jit
def _emit_kernel(
    est_ptr,
    cand_ptr,
    counts_ptr,
    hist_ptr,
    fill_ptr,
    out_ptr,
    CMAX,
    CHUNK,
    K,
    H: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, kk, lo, hi = _row_chunk(counts_ptr, CHUNK, K, H)
    if (kk > 0) & (lo < hi):
        kth, above = _thresholds(hist_ptr + row.to(tl.int64) * _HIST_ROW, kk, 3)
        ties = kk - above  # keys equal to the k-th that make the cut
        base = row.to(tl.int64) * CMAX
        orow = out_ptr + row.to(tl.int64) * K
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < hi
            key = _order_key(tl.load(est_ptr + base + offs, mask=m))
            slot = tl.load(cand_ptr + base + offs, mask=m)
            win = m & (key > kth)
            n = tl.sum(win.to(tl.int32), 0)
            first = tl.atomic_add(fill_ptr + 2 * row, n)
            pos = first + tl.cumsum(win.to(tl.int32), 0) - 1
            tl.store(orow + pos, slot, mask=win)
            tie = m & (key == kth)
            n = tl.sum(tie.to(tl.int32), 0)
            first = tl.atomic_add(fill_ptr + 2 * row + 1, n)
            pos = first + tl.cumsum(tie.to(tl.int32), 0) - 1
            tl.store(orow + above + pos, slot, mask=tie & (pos < ties))


class RadixTopK:
    """Preallocated histograms and fill counters for rows of one workspace."""

    def __init__(self, max_rows: int, device: torch.device | str):
        # histograms [rows, 5120] then fill counters [rows, 2]: one memset clears both
        self.scratch = torch.zeros(max_rows * (HIST_WIDTH + 2), dtype=torch.int32, device=device)
        self.max_rows = max_rows
        dev = torch.device(device)
        self.num_sms = (
            torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 8
        )

    def parts(self, rows: int, cmax: int) -> int:
        """Chunks per row: about four programs per SM, none shorter than one block."""
        want = -(-4 * self.num_sms // max(rows, 1))
        return max(1, min(want, -(-cmax // BLOCK)))

    def __call__(
        self, est: torch.Tensor, cand: torch.Tensor, counts: torch.Tensor, out: torch.Tensor
    ) -> None:
        """``out`` int32 [R, Hkv, k] receives the KV slots (from ``cand`` [R, Hkv, C]) of
        each row's min(k, count) largest ``est`` [R, Hkv, C] (unordered); rows with a
        count of 0 are untouched. ``counts`` int64 [R] (per request)."""
        r, h, cmax = est.shape
        rows, k = r * h, out.shape[-1]
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows > the {self.max_rows} this top-k was built for")
        if rows == 0:
            return
        if not (est.is_contiguous() and cand.is_contiguous() and out.is_contiguous()):
            raise ValueError("est, cand and out must be contiguous [R, Hkv, *] tensors")
        used = self.scratch[: rows * (HIST_WIDTH + 2)]
        used.zero_()  # one memset: histograms [rows, 5120], then fill counters [rows, 2]
        hist, fill = used[: rows * HIST_WIDTH], used[rows * HIST_WIDTH :]
        s = self.parts(rows, cmax)
        chunk = -(-cmax // s)
        chunk = -(-chunk // BLOCK) * BLOCK
        s = -(-cmax // chunk)
        grid = (rows, s)
        for level, nb in ((1, _NB1), (2, _NB2), (3, _NB3)):
            _histogram_kernel[grid](
                est, counts, hist, cmax, chunk, k, H=h, LEVEL=level, NB=nb, BLOCK=BLOCK,
                num_warps=8,
            )  # fmt: skip
        _emit_kernel[grid](
            est, cand, counts, hist, fill, out, cmax, chunk, k, H=h, BLOCK=BLOCK, num_warps=8
        )
