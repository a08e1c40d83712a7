import json

import pytest
import torch

from sglang_pariskv.codec.budget import candidate_ratios
from sglang_pariskv.config import ParisKVConfig, adaptive_candidate_ratio
from sglang_pariskv.support import check_head_dim


def test_defaults_are_valid_and_round_trip():
    cfg = ParisKVConfig()
    assert cfg.budget == 64 + 256 + 2048
    assert ParisKVConfig.from_dict(cfg.to_dict()) == cfg


def test_min_sparse_tokens_defaults_to_the_crossover_on_the_gpu_pool_only():
    """Unset, a step's long requests need DEFAULT_MIN_SPARSE_TOKENS tokens to retrieve on
    the GPU pool, and none with host offload (a dense step would read over PCIe); a given
    value is kept."""
    from sglang_pariskv.codec.budget import step_dense_mask
    from sglang_pariskv.config import DEFAULT_MIN_SPARSE_TOKENS

    gpu = ParisKVConfig()
    host = ParisKVConfig(offload="host", host_pool_gb=4)
    assert gpu.min_sparse_tokens == DEFAULT_MIN_SPARSE_TOKENS > gpu.dense_limit
    assert host.min_sparse_tokens == 0
    assert ParisKVConfig(min_sparse_tokens=0).min_sparse_tokens == 0
    below = torch.tensor([DEFAULT_MIN_SPARSE_TOKENS - 1])
    assert bool(step_dense_mask(below, gpu).all()) and not bool(step_dense_mask(below, host).any())
    assert not bool(step_dense_mask(below + 1, gpu).any())


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"topk": 0}, ["topk=0", "--pariskv-topk", ">= 1"]),
        ({"topk": 2.5}, ["topk=2.5", "integer"]),
        ({"sink": -1}, ["sink=-1", "--pariskv-sink"]),
        ({"local": True}, ["local=True"]),
        ({"dense_threshold": -5}, ["dense_threshold=-5", "--pariskv-dense-threshold"]),
        ({"min_sparse_tokens": -1}, ["min_sparse_tokens=-1", "--pariskv-min-sparse-tokens"]),
        (
            {"offload": "host", "host_pool_gb": 4, "min_sparse_tokens": 65536},
            ["--pariskv-min-sparse-tokens 65536", "PCIe", "drop"],
        ),
        ({"candidate_ratio": 0.0}, ["candidate_ratio=0.0", "(0, 1]", "--pariskv-candidate-ratio"]),
        ({"candidate_ratio": 1.5}, ["candidate_ratio=1.5", "--pariskv-candidate-ratio"]),
        ({"candidate_ratio": "x"}, ["candidate_ratio='x'"]),
        ({"stats_dir": ""}, ["stats_dir=''", "--pariskv-stats-dir"]),
        ({"offload": "host", "host_pool_gb": float("inf")}, ["host_pool_gb=inf", "finite"]),
        ({"stats_dir": 3}, ["stats_dir=3", "folder"]),
        ({"hot_cache_lines": 8}, ["--pariskv-hot-cache-lines 8", "host offload only"]),
        ({"rerank": "exact"}, ["rerank='exact'", "'code', 'keys'", "--pariskv-rerank"]),
        (
            {"offload": "host", "host_pool_gb": 4, "rerank": "keys"},
            ["--pariskv-rerank keys", "--pariskv-offload host", "--pariskv-rerank code"],
        ),
    ],
)
def test_bad_values_name_the_knob_value_and_range(kwargs, words):
    with pytest.raises(ValueError) as e:
        ParisKVConfig(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*topK"):
        ParisKVConfig.from_dict({"topK": 5})
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"topk": 100, "candidate_ratio": "auto", "sink": 8}))
    cfg = ParisKVConfig.from_json(p)
    assert cfg.topk == 100 and cfg.candidate_ratio is None and cfg.sink == 8
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ParisKVConfig.from_json(p)
    with pytest.raises(ValueError, match="does not exist"):
        ParisKVConfig.from_json(tmp_path / "missing.json")


def test_adaptive_candidate_ratio_follows_the_reference_table():
    assert adaptive_candidate_ratio(4_999) == 0.6
    assert adaptive_candidate_ratio(5_000) == 0.5
    assert adaptive_candidate_ratio(10_000) == 0.2
    assert adaptive_candidate_ratio(30_000) == 0.1
    zones = torch.tensor([4_999, 100_000])
    assert candidate_ratios(zones, ParisKVConfig()).tolist() == [0.6, 0.1]
    assert candidate_ratios(zones, ParisKVConfig(candidate_ratio=0.4)).tolist() == [0.4, 0.4]


def test_dense_below_threshold_or_budget():
    cfg = ParisKVConfig(topk=100, sink=4, local=16, dense_threshold=500)
    assert cfg.is_dense(500) and not cfg.is_dense(501)
    cfg = ParisKVConfig(topk=100, sink=4, local=16, dense_threshold=0)
    assert cfg.is_dense(120) and not cfg.is_dense(121)


@pytest.mark.parametrize("d", [0, 12, 63, -8])
def test_head_dim_must_be_multiple_of_8(d):
    with pytest.raises(ValueError, match="multiple of 8"):
        check_head_dim(d)


def test_tensor_ratios_match_the_scalar_table_at_every_band_edge():
    import torch

    from sglang_pariskv.codec.budget import candidate_ratios

    zones = [0, 4_999, 5_000, 9_999, 10_000, 29_999, 30_000, 10**6]
    cand = candidate_ratios(torch.tensor(zones), ParisKVConfig())
    assert cand.tolist() == [adaptive_candidate_ratio(z) for z in zones]


def test_step_dense_mask_is_the_per_request_rule_unless_the_long_ones_hold_too_few_tokens():
    import random

    import torch

    from sglang_pariskv.codec.budget import step_dense_mask

    rng = random.Random(0)
    for min_tokens in (0, 1, 50_000):
        cfg = ParisKVConfig(
            topk=100, sink=4, local=16, dense_threshold=500, min_sparse_tokens=min_tokens
        )
        for _ in range(200):
            lens = [
                rng.choice([2, 500, 501, rng.randint(2, 60_000)]) for _ in range(rng.randint(1, 6))
            ]
            per_request = [cfg.is_dense(x) for x in lens]
            long_tokens = sum(x for x, d in zip(lens, per_request) if not d)
            want = [True] * len(lens) if long_tokens < min_tokens else per_request
            assert step_dense_mask(torch.tensor(lens), cfg).tolist() == want


def test_sizes_beyond_the_context_are_refused_naming_the_flags():
    ParisKVConfig(topk=2048, sink=64, local=256).check_context(2368)  # exactly fits
    with pytest.raises(ValueError) as e:
        ParisKVConfig(topk=10**7).check_context(131072)
    for w in ("--pariskv-topk 10000000", "--pariskv-local 256", "131072"):
        assert w in str(e.value)
