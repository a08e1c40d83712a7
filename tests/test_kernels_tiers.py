"""Tier-table kernel: exactly codec.collision.centroid_tiers, ties included."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from sglang_pariskv.codec.budget import tier_thresholds  # noqa: E402
from sglang_pariskv.codec.collision import centroid_tiers  # noqa: E402
from sglang_pariskv.config import ParisKVConfig  # noqa: E402
from sglang_pariskv.kernels.tiers import centroid_tier_table  # noqa: E402
from tests.kernel_cases import fresh_interpreter_fallback  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# A whole-suite run may import Triton (via SGLang) before the interpreter is enabled: then
# this module reruns itself in a fresh subprocess instead.
_interpreter_guard, test_module_in_fresh_interpreter = fresh_interpreter_fallback(__file__)


def check(qb, hist, rpi, thr):
    got = centroid_tier_table(qb.to(DEV), hist.to(DEV), rpi.to(DEV), thr.to(DEV))
    want = centroid_tiers(qb, hist[rpi.long()], thr)
    assert got.dtype == torch.uint8
    assert torch.equal(got.cpu().long(), want)


@pytest.mark.parametrize("b, skew", [(8, 1.0), (16, 5.0)])
def test_tiers_match_codec(b, skew):
    gen = torch.Generator().manual_seed(b)
    r, h = 2, 16 // b
    qb = torch.randn(r, h, b, 8, generator=gen)
    # Skewed histograms: a few centroids hold most keys, like real keys do.
    hist = (torch.rand(4, h, b, 256, generator=gen) ** skew * 200).to(torch.int32)
    rpi = torch.tensor([3, 0], dtype=torch.int32)
    cfg = ParisKVConfig()
    total = hist[rpi.long(), 0, 0].sum(-1)
    thr = tier_thresholds(total, torch.tensor([0.2, 0.5], dtype=torch.float64), cfg)
    check(qb, hist, rpi, thr)


def test_tiers_ties_rank_lower_id_first():
    gen = torch.Generator().manual_seed(5)
    qb = torch.randn(1, 3, 8, 8, generator=gen)
    qb[0, 0, :, 2:5] = 0.0  # zero coordinates: centroids differing there tie exactly
    qb[0, 1, :, :] = 0.25  # all magnitudes equal: massive ties
    qb[0, 2, 0, :] = 0.0  # all-zero block: every centroid ties
    hist = torch.randint(0, 30, (1, 3, 8, 256), generator=gen, dtype=torch.int32)
    thr = torch.tensor([[50, 400, 900, 1500, 2500, 3800]])
    check(qb, hist, torch.tensor([0], dtype=torch.int32), thr)


def test_tiers_more_tiers_and_empty_histograms():
    gen = torch.Generator().manual_seed(9)
    qb = torch.randn(2, 1, 8, 8, generator=gen)
    hist = torch.randint(0, 5, (2, 1, 8, 256), generator=gen, dtype=torch.int32)
    hist[1] = 0
    cfg = ParisKVConfig(tier_ratios=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9))
    total = hist[:, 0, 0].sum(-1)
    thr = tier_thresholds(total, torch.tensor([0.5, 0.5], dtype=torch.float64), cfg)
    check(qb, hist, torch.tensor([0, 1], dtype=torch.int32), thr)


@pytest.mark.gpu
def test_tiers_match_codec_at_scale(cuda_device):
    r, h, b = 32, 8, 16
    qb = torch.randn(r, h, b, 8, device=cuda_device)
    hist = (torch.rand(r, h, b, 256, device=cuda_device) ** 4 * 5000).to(torch.int32)
    rpi = torch.randperm(r, device=cuda_device).to(torch.int32)
    total = hist[rpi.long(), 0, 0].sum(-1)
    thr = tier_thresholds(total, torch.full((r,), 0.2, device=cuda_device), ParisKVConfig())
    got = centroid_tier_table(qb, hist, rpi, thr)
    assert torch.equal(got.long(), centroid_tiers(qb, hist[rpi.long()], thr))
