"""The calibration file (key centres and channel scales, dense-layer recommendation): its
format, the flags that read it, the startup checks, and the KV pool's calibrated codes (TP
ranks included)."""

import json
import types

import pytest
import torch

from sglang_pariskv.calibration import load_calibration, save_calibration
from sglang_pariskv.codec import encode_keys
from sglang_pariskv.config import ParisKVConfig, ParisKVConfigError
from sglang_pariskv.index import kv_pool
from sglang_pariskv.server_flags import config_from_args
from tests.test_plugin_flags import parser  # noqa: F401  (the flags fixture)
from tests.test_plugin_pool import make_pool

L, H, D = 2, 4, 16


def scales_for(layers=L, heads=H, d=D, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 100)
    return torch.rand(layers, heads, d, generator=gen) * 4 + 0.25


def write(tmp_path, layers=L, heads=H, d=D, dense=(0,), name="cal.json", seed=0, scales=True):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(layers, heads, d, generator=gen) * 3
    s = scales_for(layers, heads, d, seed) if scales else None
    path = tmp_path / name
    save_calibration(path, centres, list(dense), scales=s, model={"name": "test"})
    return path, centres


def test_round_trip_keeps_centres_scales_and_recommendation(tmp_path):
    path, centres = write(tmp_path, dense=(1, 0))
    cal = load_calibration(path)
    assert cal.centres.shape == (L, H, D) and cal.dense_layers == (0, 1)
    assert torch.allclose(cal.centres, centres, rtol=1e-5, atol=1e-5)
    assert torch.allclose(cal.scales, scales_for(), rtol=1e-5)
    assert cal.extra["model"] == {"name": "test"}
    assert "key_scales" not in cal.extra


def test_a_file_without_scales_means_scale_one(tmp_path):
    cal = load_calibration(write(tmp_path, scales=False)[0])
    assert cal.scales is None
    centres, scales = cal.for_rank(0, 1, H)
    assert scales is None and torch.equal(centres, cal.centres)


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda d: d.update(format="x"), "not a ParisKV calibration file"),
        (lambda d: d.update(version=9), "format version 9"),
        (
            lambda d: d.update(num_kv_heads=3),
            "key_centres has shape (2, 4, 16), the header says (2, 3, 16)",
        ),
        (lambda d: d["key_centres"][0][0].__setitem__(0, "a"), "key_centres must be"),
        (lambda d: d["key_scales"][1][2].__setitem__(3, 0.0), "key_scales must be finite and pos"),
        (lambda d: d["key_scales"][0][0].__setitem__(0, -1.0), "key_scales must be finite and pos"),
        (lambda d: d.update(key_scales=[[1.0]]), "key_scales has shape (1, 1)"),
        (
            lambda d: d.update(dense_layers=[2]),
            "dense_layers must be a list of layer indices in [0, 2)",
        ),
    ],
)
def test_malformed_files_name_the_flag_and_the_fix(tmp_path, mutate, words):
    path, _ = write(tmp_path)
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ParisKVConfigError) as e:
        load_calibration(path)
    msg = str(e.value)
    assert msg.startswith(f"--pariskv-calibration {path}") and words in msg
    assert "pariskv_tools.eval calibrate" in msg


def test_missing_and_non_json_files_are_refused(tmp_path):
    with pytest.raises(ParisKVConfigError, match="no such file"):
        load_calibration(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ParisKVConfigError, match="not valid JSON"):
        load_calibration(bad)


def test_a_file_of_another_model_shape_is_refused(tmp_path):
    cal = load_calibration(write(tmp_path)[0])
    cal.check_model(L, D)
    with pytest.raises(ParisKVConfigError, match="written for 2 layers x head_dim 16, but m has 3"):
        cal.check_model(3, D, "m")


@pytest.mark.parametrize(
    "heads, tp, per, want",
    [
        (4, 2, 2, {0: [0, 1], 1: [2, 3]}),  # sharded
        (2, 4, 1, {0: [0], 1: [0], 2: [1], 3: [1]}),  # replicated: rank r holds r // 2
        (4, 1, 4, {0: [0, 1, 2, 3]}),
    ],
)
def test_each_tp_rank_gets_the_calibration_of_the_heads_it_holds(tmp_path, heads, tp, per, want):
    path, centres = write(tmp_path, heads=heads)
    cal = load_calibration(path)
    for rank, idx in want.items():
        centres, scales = cal.for_rank(rank, tp, per)
        assert torch.equal(centres, cal.centres[:, idx])
        assert torch.equal(scales, cal.scales[:, idx])


def test_a_rank_head_count_that_does_not_match_is_refused(tmp_path):
    cal = load_calibration(write(tmp_path)[0])
    with pytest.raises(ParisKVConfigError, match="has 4 KV heads, but this model holds 3"):
        cal.for_rank(0, 1, 3)


def test_dense_layers_config_rules(tmp_path):
    with pytest.raises(ParisKVConfigError, match="auto reads the per-layer recommendation"):
        ParisKVConfig(dense_layers="auto")
    with pytest.raises(ParisKVConfigError, match="expected distinct layer indices"):
        ParisKVConfig(dense_layers=(1, 1))
    with pytest.raises(ParisKVConfigError, match="expected distinct layer indices"):
        ParisKVConfig(dense_layers=(-1,))
    cfg = ParisKVConfig(dense_layers=(2, 0))
    assert cfg.dense_layers == (0, 2) and cfg.dense_layer_set(3) == (0, 2)
    with pytest.raises(ParisKVConfigError, match=r"layer\(s\) \[2\] do not exist, the model has 2"):
        cfg.dense_layer_set(2)
    path, _ = write(tmp_path, dense=(1,))
    auto = ParisKVConfig(calibration=str(path), dense_layers="auto")
    assert auto.dense_layer_set(L) == (1,)
    assert ParisKVConfig.from_dict(json.loads(json.dumps(auto.to_dict()))) == auto
    assert ParisKVConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_flags_read_and_check_the_file_before_any_model_work(parser, tmp_path):  # noqa: F811
    path, _ = write(tmp_path)
    base = ["--model-path", "m", "--enable-pariskv", "--pariskv-calibration", str(path)]
    cfg = config_from_args(parser.parse_args([*base, "--pariskv-dense-layers", "1,0"]))
    assert cfg.calibration == str(path) and cfg.dense_layers == (0, 1)
    cfg = config_from_args(parser.parse_args([*base, "--pariskv-dense-layers", "auto"]))
    assert cfg.dense_layers == "auto"
    with pytest.raises(ParisKVConfigError, match="the model has 2 layers"):
        config_from_args(parser.parse_args([*base, "--pariskv-dense-layers", "5"]))
    with pytest.raises(ParisKVConfigError, match="is not a list of layer indices"):
        config_from_args(parser.parse_args([*base, "--pariskv-dense-layers", "a,b"]))
    missing = ["--model-path", "m", "--enable-pariskv", "--pariskv-calibration", "/no/such"]
    with pytest.raises(ParisKVConfigError, match="--pariskv-calibration /no/such: no such file"):
        config_from_args(parser.parse_args(missing))
    with pytest.raises(ParisKVConfigError, match="given without --enable-pariskv"):
        config_from_args(parser.parse_args(["--model-path", "m", "--pariskv-dense-layers", "0"]))


def pool_with(cfg: ParisKVConfig, heads: int):
    cls = type("Pool", (kv_pool.ParisKVTokenToKVPool,), {"pariskv_config": cfg})
    return make_pool(64, heads=heads, head_dim=D, layers=L, cls=cls)


def test_the_pool_writes_calibrated_codes_per_rank(tmp_path, monkeypatch):
    """Every rank's codes are the codec's codes of its heads' (keys - centres) / scales,
    i.e. the tp=1 codes restricted to its heads, and its scales are its heads' (retrieval
    reads them for the queries); without calibration, plain codes and no scales."""
    path, _ = write(tmp_path)
    cal = load_calibration(path)
    centres, scales = cal.centres, cal.scales
    cfg = ParisKVConfig(calibration=str(path))
    gen = torch.Generator().manual_seed(1)
    keys = [torch.randn(10, H, D, generator=gen).to(torch.bfloat16) for _ in range(L)]
    loc = torch.arange(1, 11)
    full = pool_with(cfg, H)
    plain = pool_with(ParisKVConfig(), H)
    for li in range(L):
        full.set_kv_buffer(types.SimpleNamespace(layer_id=li), loc, keys[li], keys[li])
        plain.set_kv_buffer(types.SimpleNamespace(layer_id=li), loc, keys[li], keys[li])
        want = encode_keys(keys[li], centre=centres[li], scale=scales[li])
        for got, w in zip(full.pariskv.layers[li], want):
            assert torch.equal(got[loc], w)
        assert torch.equal(full.pariskv.calibration(li)[1], scales[li])
        assert not torch.equal(plain.pariskv.layers[li].signs[loc], want.signs)
        assert plain.pariskv.calibration(li) == (None, None)
    for rank in range(2):
        monkeypatch.setattr(kv_pool, "tp_position", lambda r=rank: (r, 2))
        part = pool_with(cfg, H // 2)
        heads = slice(2 * rank, 2 * rank + 2)
        for li in range(L):
            k = keys[li][:, heads].contiguous()
            part.set_kv_buffer(types.SimpleNamespace(layer_id=li), loc, k, k)
            for got, w in zip(part.pariskv.layers[li], full.pariskv.layers[li]):
                assert torch.equal(got[loc], w[loc][:, heads])
            assert torch.equal(part.pariskv.calibration(li)[1], scales[li][heads])


def test_a_pool_of_another_shape_refuses_the_file(tmp_path):
    path, _ = write(tmp_path, heads=3)
    with pytest.raises(ParisKVConfigError, match="has 3 KV heads, but this model holds 4"):
        pool_with(ParisKVConfig(calibration=str(path)), H)


def test_rope_signature_reads_both_config_spellings():
    from transformers import LlamaConfig

    from sglang_pariskv.calibration import rope_signature

    plain = {"rope_theta": 100000.0}
    v5 = {"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    assert (
        rope_signature(plain)
        == rope_signature(v5)
        == {
            "rope_theta": 100000.0,
            "rope_type": "default",
        }
    )
    legacy = {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4}}
    new = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 4.0}}
    want = {"rope_theta": 5e5, "rope_type": "linear", "factor": 4.0}
    assert rope_signature(legacy) == rope_signature(new) == want
    assert rope_signature(types.SimpleNamespace(**legacy, rope_parameters=None)) == want
    cfg = LlamaConfig(num_hidden_layers=2, **new)  # what the tools and SGLang hold
    assert rope_signature(cfg) == want
    assert rope_signature({"hidden_size": 8}) is None


def test_a_file_measured_under_another_rope_is_refused(tmp_path):
    from sglang_pariskv.calibration import rope_signature

    path = tmp_path / "cal.json"
    rope = rope_signature({"rope_theta": 1e5})
    save_calibration(path, torch.zeros(L, H, D), [], model={"name": "t"}, rope=rope)
    cal = load_calibration(path)
    cal.check_rope(rope, "m")
    cal.check_rope(None, "m")  # the model's RoPE unknown: nothing to compare
    stretched = rope_signature({"rope_theta": 1e5, "rope_scaling": {"type": "linear", "factor": 4}})
    with pytest.raises(ParisKVConfigError) as e:
        cal.check_rope(stretched, "m")
    msg = str(e.value)
    assert "--pariskv-calibration" in msg and "'factor': 4.0" in msg and "calibrate" in msg
    load_calibration(write(tmp_path)[0]).check_rope(stretched)  # a file that does not say


def test_serving_refuses_a_calibration_of_another_rope_before_the_backend(tmp_path, monkeypatch):
    """``serving.build_attn_backend`` (the scheduler, once the model is loaded) checks the
    file against the model's own RoPE before building anything."""
    import sglang.srt.runtime_context as rc

    from sglang_pariskv import serving
    from sglang_pariskv.attention import backend as backend_mod
    from sglang_pariskv.calibration import rope_signature

    path = tmp_path / "cal.json"
    rope = rope_signature({"rope_theta": 1e5})
    save_calibration(path, torch.zeros(L, H, D), [], rope=rope)
    monkeypatch.setattr(rc, "get_parallel", lambda: types.SimpleNamespace(attn_tp_size=1))
    monkeypatch.setattr(backend_mod, "ParisKVAttnBackend", lambda runner, cfg: "built")

    def runner(hf_config):
        mc = types.SimpleNamespace(
            get_num_attention_heads=lambda tp: 8,
            get_num_kv_heads=lambda tp: H,
            head_dim=64,
            v_head_dim=64,
            context_len=32768,
            hf_config=hf_config,
        )
        args = types.SimpleNamespace(model_path="stretched-model")
        return types.SimpleNamespace(
            model_config=mc, use_mla_backend=False, server_args=args, device="cpu"
        )

    cfg = ParisKVConfig(calibration=str(path))
    same = {"rope_theta": 1e5}
    assert serving.build_attn_backend(runner(same), cfg) == "built"
    other = {"rope_theta": 1e5, "rope_scaling": {"type": "linear", "factor": 4.0}}
    with pytest.raises(ParisKVConfigError, match="stretched-model uses"):
        serving.build_attn_backend(runner(other), cfg)
