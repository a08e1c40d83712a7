import pytest
import torch

from sglang_pariskv.codec.rotation import hadamard_block_size, rotate, rotation_matrix


@pytest.mark.parametrize("d", [8, 64, 128, 96, 40])
def test_rotation_is_orthonormal_and_preserves_inner_products(d):
    r = rotation_matrix(d, seed=3, dtype=torch.float64)
    assert torch.allclose(r @ r.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(50, d, dtype=torch.float64, generator=gen)
    y = torch.randn(50, d, dtype=torch.float64, generator=gen)
    exact = (x * y).sum(-1)
    rotated = (rotate(x, 3) * rotate(y, 3)).sum(-1)
    assert (exact - rotated).abs().max() < 1e-6


def test_block_sizes_and_seed_dependence():
    assert hadamard_block_size(128) == 128
    assert hadamard_block_size(96) == 32
    assert hadamard_block_size(40) == 8
    a = rotation_matrix(64, seed=0)
    assert torch.equal(a, rotation_matrix(64, seed=0))
    assert not torch.equal(a, rotation_matrix(64, seed=1))


def test_rotation_spreads_an_outlier_channel():
    x = torch.zeros(128, dtype=torch.float64)
    x[7] = 1.0
    y = rotate(x, 0)
    assert torch.allclose(y.abs(), torch.full_like(y, 128**-0.5))
