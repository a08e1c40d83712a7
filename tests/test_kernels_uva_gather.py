"""UVA row gather/scatter kernel against the plain-torch reference, bit for bit.

On CPU the kernel runs in Triton's interpreter over CPU tensors; the `gpu` tests run it
over a pinned HostKVPool through UVA (the path serving will use)."""

import pytest
import torch

from sglang_pariskv.kernels.uva_gather import gather_rows, kernel_arg, scatter_rows
from sglang_pariskv.offload.host_pool import HostKVPool

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def copy_rows_reference(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_rows: torch.Tensor | None = None,
    dst_rows: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    num_valid: torch.Tensor | None = None,
) -> None:
    """Plain-torch ``uva_gather.copy_rows`` (the oracle; bounds-checked by torch indexing)."""
    rows = src_rows if src_rows is not None else dst_rows
    n = rows.numel() if rows is not None else src.shape[0]
    sel = torch.ones(n, dtype=torch.bool)
    if num_valid is not None:
        sel &= torch.arange(n) < int(num_valid.reshape(-1)[0])
    if mask is not None:
        sel &= mask.cpu().bool()
    ident = torch.arange(n)
    s = (src_rows.cpu().long() if src_rows is not None else ident)[sel]
    d = (dst_rows.cpu().long() if dst_rows is not None else ident)[sel]
    dst[d.to(dst.device)] = src[s.to(src.device)].to(dst.device)


def gather_rows_reference(src, rows, dst, dst_rows=None, mask=None, num_valid=None) -> None:
    """Plain-torch :func:`gather_rows`."""
    copy_rows_reference(src, dst, rows, dst_rows, mask, num_valid)


def random_bits(rows, w, dtype, seed):
    """Random bit patterns (NaNs and infs included) in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    size = torch.empty((), dtype=dtype).element_size()
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[size]
    hi = 255 if size == 1 else 2 ** (8 * size - 1) - 1
    lo = 0 if size == 1 else -(2 ** (8 * size - 1))
    return torch.randint(lo, hi, (rows, w), generator=gen, dtype=torch.int64).to(bits).view(dtype)


def bits_equal(a, b):
    size = a.element_size()
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[size]
    return torch.equal(a.cpu().view(as_int), b.cpu().view(as_int))


def workspace_like_indices(r, h, m, slots, gen):
    """Head-as-batch entries (slot * Hkv + head) for R requests x Hkv heads x M tokens."""
    per_row = [torch.randperm(slots, generator=gen)[:m] * h + j for _ in range(r) for j in range(h)]
    indices = torch.cat(per_row).to(torch.int32)
    indptr = torch.arange(r * h + 1, dtype=torch.int32) * m
    return indptr, indices


@pytest.mark.parametrize(
    "dtype, w, idx_dtype",
    [
        (torch.bfloat16, 256, torch.int32),
        (torch.float16, 40, torch.int64),
        (torch.float32, 8, torch.int32),
    ],
)
def test_gather_matches_reference_bit_exact(dtype, w, idx_dtype):
    src = random_bits(500, w, dtype, seed=w)
    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 500, (123,), generator=gen).to(idx_dtype)  # repeats included
    got = torch.zeros(123, w, dtype=dtype, device=DEV)
    want = torch.zeros(123, w, dtype=dtype)
    gather_rows(src.to(DEV), rows.to(DEV), got)
    gather_rows_reference(src, rows, want)
    assert bits_equal(got, want)
    assert bits_equal(got, src[rows.long()])  # and the reference is what it says


def test_gather_workspace_shaped_with_count_mask_and_positions():
    """R x Hkv x M entries like DecodeWorkspace.kv_indices: only [0, kv_indptr[-1]) and the
    masked entries are copied, into the given staging rows; the rest stays untouched."""
    gen = torch.Generator().manual_seed(2)
    r, h, m, slots, d = 3, 2, 20, 64, 16
    pool = HostKVPool(slots, 1, h, d, check_memory=False)
    pool.data.copy_(random_bits(slots * h * 2, d, torch.bfloat16, seed=3).view(pool.data.shape))
    indptr, indices = workspace_like_indices(r, h, m, slots, gen)
    capacity = indices.numel() + 17  # workspace buffers are capacity-sized
    buf = torch.zeros(capacity, dtype=torch.int32)
    buf[: indices.numel()] = indices
    buf[indices.numel() :] = 5  # garbage past the valid entries
    count = indptr[-1:] - m  # the last row is not valid this step
    mask = torch.rand(capacity, generator=gen) < 0.7
    pos = torch.randperm(capacity + 10, generator=gen)[:capacity]
    sentinel = random_bits(capacity + 10, d, torch.bfloat16, seed=4)
    got, want = sentinel.clone().to(DEV), sentinel.clone()
    src = pool.layer_rows(0, 1)
    gather_rows(src, buf.to(DEV), got, pos.to(DEV), mask.to(DEV), count.to(DEV))
    gather_rows_reference(src, buf, want, pos, mask, count)
    assert bits_equal(got, want)
    copied = mask & (torch.arange(capacity) < int(count))
    assert copied.sum() > 10 and (~copied).sum() > 10  # both kinds of entries were exercised
    assert bits_equal(want[pos[~copied]], sentinel[pos[~copied]])
    assert bits_equal(want[pos[copied]], src[buf[copied].long()])


def test_scatter_rows_and_pool_kernel_write_equal_torch_write():
    gen = torch.Generator().manual_seed(5)
    dst = random_bits(300, 24, torch.float16, seed=6)
    if DEV == "cuda":  # the GPU kernel writes host memory over UVA: it must be pinned
        dst = dst.pin_memory()
    want = dst.clone()
    src = random_bits(50, 24, torch.float16, seed=7).to(DEV)
    rows = torch.randperm(300, generator=gen)[:50]
    scatter_rows(src, dst, rows.to(DEV))
    copy_rows_reference(src.cpu(), want, None, rows)
    assert bits_equal(dst, want)
    # HostKVPool's GPU write path (the kernel) against its torch path
    a = HostKVPool(64, 2, 4, 8, check_memory=False)
    b = HostKVPool(64, 2, 4, 8, check_memory=False)
    b.data.copy_(a.data)
    slots = torch.randperm(64, generator=gen)[:30]
    k, v = random_bits(30, 32, torch.bfloat16, 8), random_bits(30, 32, torch.bfloat16, 9)
    a.write(1, slots.to(DEV), k.to(DEV), v.to(DEV), use_kernel=True)
    b.write(1, slots, k, v, use_kernel=False)
    assert bits_equal(a.data.view(-1, 8), b.data.view(-1, 8))


def test_host_tensor_must_be_pinned_for_a_gpu_launch():
    t = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="not pinned"):
        kernel_arg(t, on_gpu=True)
    assert kernel_arg(t, on_gpu=False) is t


@pytest.mark.gpu
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_gpu_pinned_pool_gather_bit_exact_and_graph_replay(idx_dtype):
    """Pinned HostKVPool (UVA) -> gather into device staging: bit-exact vs the reference,
    eager and CUDA-graph replay with new indices."""
    slots, h, d = 1 << 17, 4, 128  # 128K slots x 1 layer = 128 MiB
    pool = HostKVPool(slots, 1, h, d)
    assert pool.pinned
    pool.data.view(torch.int16).copy_(
        torch.randint(-32768, 32767, pool.data.shape, dtype=torch.int16)
    )
    src = pool.layer_rows(0, 0)
    gen = torch.Generator().manual_seed(0)
    indptr, indices = workspace_like_indices(2, h, 2368, slots, gen)
    n = indices.numel()
    idx = indices.to(idx_dtype).cuda()
    count = indptr[-1:].cuda()
    dst = torch.zeros(n, d, dtype=torch.bfloat16, device="cuda")
    gather_rows(src, idx, dst, num_valid=count)
    want = torch.zeros(n, d, dtype=torch.bfloat16)
    gather_rows_reference(src, indices, want)
    assert bits_equal(dst, want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gather_rows(src, idx, dst, num_valid=count)
    _, indices2 = workspace_like_indices(2, h, 2368, slots, gen)
    idx.copy_(indices2.to(idx_dtype))
    graph.replay()
    gather_rows_reference(src, indices2, want)
    assert bits_equal(dst, want)
    with pytest.raises(ValueError, match="not pinned"):
        gather_rows(torch.zeros(16, d, dtype=torch.bfloat16), idx[:4], dst)
    pool.close()
