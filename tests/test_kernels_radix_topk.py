"""The multi-program radix top-k against torch.topk: the same set of KV slots, ties at the
k-th estimate taken exactly up to the quota, rows beyond their count untouched."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from sglang_pariskv.kernels.radix_topk import BLOCK, RadixTopK  # noqa: E402
from tests.kernel_cases import fresh_interpreter_fallback  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
_interpreter_guard, test_module_in_fresh_interpreter = fresh_interpreter_fallback(__file__)


def check_row(got: torch.Tensor, est: torch.Tensor, cand: torch.Tensor, n: int) -> None:
    """``got`` holds n distinct slots: every slot whose estimate beats the n-th largest,
    and slots at exactly the n-th estimate for the rest (oracle: float64 torch.topk)."""
    kth = est.double().topk(n).values[-1]
    got = set(got[:n].tolist())
    assert len(got) == n
    above = set(cand[est.double() > kth].tolist())
    at = set(cand[est.double() == kth].tolist())
    assert above <= got <= above | at


def run(est, counts, k, rows=None):
    r, h, cmax = est.shape
    gen = torch.Generator().manual_seed(1)
    cand = torch.randperm(10**6, generator=gen)[: r * h * cmax].view(r, h, cmax).int().to(DEV)
    # a guard after the output: a write past the last row's k slots would land there
    flat = torch.full((r * h * k + 64,), -7, dtype=torch.int32, device=DEV)
    out = flat[: r * h * k].view(r, h, k)
    RadixTopK(rows or r * h, DEV)(est, cand, counts, out)
    assert (flat[r * h * k :] == -7).all()
    return cand, out


@pytest.mark.parametrize("scale", ["mixed", "positive", "negative", "tiny"])
def test_matches_torch_topk_across_chunks_and_counts(scale):
    gen = torch.Generator().manual_seed(0)
    r, h, cmax, k = 3, 2, 2 * BLOCK + 300, 500  # three chunks per row
    est = torch.randn(r, h, cmax, generator=gen) * torch.rand(r, h, 1, generator=gen) * 10
    if scale == "positive":
        est = est.abs() + 3
    elif scale == "negative":
        est = -est.abs() - 1e-3
    elif scale == "tiny":
        est = est * 1e-30  # subnormal-adjacent exponents
    est = est.to(DEV)
    counts = torch.tensor([cmax, 2 * BLOCK + 1, 300], device=DEV)  # > k, > k, < k
    cand, out = run(est, counts, k)
    for i in range(r):
        c = int(counts[i])
        n = min(k, c)
        for j in range(h):
            check_row(out[i, j].cpu(), est[i, j, :c].cpu(), cand[i, j, :c].cpu(), n)
            assert (out[i, j, n:] == -7).all()  # nothing written past min(k, count)


def test_ties_at_the_kth_estimate_fill_exactly_the_quota():
    r, h, cmax, k = 1, 3, BLOCK + 900, 400
    gen = torch.Generator().manual_seed(2)
    est = torch.randn(r, h, cmax, generator=gen)
    est[0, 0] = 1.25  # every key equal
    est[0, 1, ::3] = 0.75  # ties spread over both chunks
    est[0, 2] = -est[0, 2].abs()
    est[0, 2, 100:1100] = 0.5  # 1000 equal keys straddle the cut (last row: guard)
    est[0, 2, :100] = 2.0
    est = est.to(DEV)
    cand, out = run(est, torch.tensor([cmax], device=DEV), k)
    for j in range(h):
        check_row(out[0, j].cpu(), est[0, j].cpu(), cand[0, j].cpu(), k)


def test_rows_with_no_candidates_are_untouched_and_batch_is_checked():
    est = torch.randn(2, 2, 64, device=DEV)
    cand, out = run(est, torch.tensor([0, 64], device=DEV), 16)
    assert (out[0] == -7).all() and (out[1] != -7).all()
    with pytest.raises(ValueError, match="rows"):
        run(est, torch.tensor([0, 64], device=DEV), 16, rows=3)


@pytest.mark.gpu
def test_matches_the_cuda_top_k_at_one_million_candidates(cuda_device):
    """The 1M-token shape (4 KV heads, C = 104826 candidates, k 2048): same slot sets as
    csrc/topk.cu and as torch.topk."""
    from sglang_pariskv.kernels.cuda_ops import topk_cuda

    r, h, cmax, k = 2, 4, 104826, 2048
    est = torch.randn(r, h, cmax, device=cuda_device)
    counts = torch.tensor([cmax, 60000], device=cuda_device)
    cand, out = run(est, counts, k)
    ref = torch.full_like(out, -7)
    topk_cuda(est, cand, counts, ref, cluster=8)
    for i in range(r):
        c = int(counts[i])
        for j in range(h):
            check_row(out[i, j].cpu(), est[i, j, :c].cpu(), cand[i, j, :c].cpu(), k)
            assert torch.equal(out[i, j].sort().values, ref[i, j].sort().values)


def test_serving_picks_the_top_k_from_the_environment(monkeypatch):
    from sglang_pariskv.attention.backend import topk_variant_from_env
    from sglang_pariskv.server_flags import ParisKVConfigError

    monkeypatch.delenv("SGLANG_PARISKV_TOPK", raising=False)
    assert topk_variant_from_env() == "auto"
    monkeypatch.setenv("SGLANG_PARISKV_TOPK", "radix")
    assert topk_variant_from_env() == "radix"
    monkeypatch.setenv("SGLANG_PARISKV_TOPK", "fast")
    with pytest.raises(ParisKVConfigError, match="SGLANG_PARISKV_TOPK='fast'"):
        topk_variant_from_env()
