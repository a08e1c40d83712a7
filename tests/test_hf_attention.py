"""The transformers integration against dense attention and hand-computed oracles."""

import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pariskv_tools.hf_attention import ParisKVAttention, install, uninstall
from sglang_pariskv.calibration import Calibration
from sglang_pariskv.codec import encode_keys, retrieve
from sglang_pariskv.config import ParisKVConfig


def tiny_llama():
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@torch.inference_mode()
def run(model, ids, steps):
    out = model(input_ids=ids, use_cache=True)
    past, logits = out.past_key_values, [out.logits[0, -1]]
    for _ in range(steps):
        tok = logits[-1].argmax().view(1, 1)
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[0, -1])
    return torch.stack(logits), past


def test_dense_config_reproduces_sdpa_and_codes_track_the_cache():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(1))
    want, _ = run(model, ids, 5)
    attn = ParisKVAttention(ParisKVConfig(topk=8, sink=4, local=8, dense_threshold=10_000))
    install(model, attn)
    got, past = run(model, ids, 5)
    uninstall(model)
    assert torch.allclose(got, want, atol=1e-5)
    # The incrementally appended codes equal a one-shot encode of the final cache.
    for layer in range(2):
        keys = past.layers[layer].keys.transpose(1, 2)[:, : -0 or None]
        st = attn._layers[layer]
        full = encode_keys(keys[:, : st.codes.signs.shape[1]])
        for a, b in zip(st.codes, full):
            assert torch.equal(a, b)


@pytest.mark.parametrize("calibrated, rerank", [(False, "code"), (True, "code"), (True, "keys")])
def test_sparse_decode_attends_exactly_the_retrieved_set(calibrated, rerank):
    """Also with a calibration: codes of (k - m) / s, queries prepared as s ∘ q; and with
    the rerank by the keys (the codec then reads the layer's keys)."""
    gen = torch.Generator().manual_seed(2)
    hq, hkv, d, n = 6, 2, 16, 700
    q = torch.randn(1, hq, 1, d, generator=gen)
    k = torch.randn(1, hkv, n, d, generator=gen)
    v = torch.randn(1, hkv, n, d, generator=gen)
    cfg = ParisKVConfig(topk=50, sink=4, local=16, dense_threshold=0, rerank=rerank)
    centre = scale = cal = None
    if calibrated:
        centre = torch.randn(hkv, d, generator=gen)
        scale = torch.rand(hkv, d, generator=gen) * 3 + 0.2
        cal = Calibration("mem", centre[None], scale[None], ())
    attn = ParisKVAttention(cfg, calibration=cal)
    module = types.SimpleNamespace(layer_idx=0)
    out, _ = attn(module, q, k, v, None, scaling=0.3)
    codes = encode_keys(k.transpose(1, 2), centre=centre, scale=scale)
    keys = k.transpose(1, 2) if rerank == "keys" else None
    ret = retrieve(q[:, :, 0], codes, torch.tensor([n]), cfg, scale=scale, keys=keys)
    if calibrated:  # the calibration changes the selection (so the test can see it)
        plain = retrieve(
            q[:, :, 0], encode_keys(k.transpose(1, 2)), torch.tensor([n]), cfg, keys=keys
        )
        assert not torch.equal(plain.positions, ret.positions)
    mass = []
    for h in range(hq):
        kv = h // (hq // hkv)
        pos = ret.positions[0, kv][ret.valid[0, kv]]
        assert len(pos) == cfg.budget
        logits = (k[0, kv].double() @ q[0, h, 0].double()) * 0.3
        p_sel = torch.softmax(logits[pos], 0)
        want = p_sel @ v[0, kv, pos].double()
        assert torch.allclose(out[0, 0, h].double(), want, atol=1e-5)
        mass.append(torch.softmax(logits, 0)[pos].sum().item())
    (m,) = attn.metrics
    assert abs(m.mass_recall - sum(mass) / hq) < 1e-5
    assert m.attended == cfg.budget and m.context == n
    assert 0.0 <= m.recall_at_k <= 1.0


def test_exact_retrieval_is_sink_window_and_the_brute_force_top_k():
    """Oracle: float64 scores of every zone key by the group-mean query, ranked by sort."""
    from pariskv_tools.hf_attention import exact_retrieval

    g = torch.Generator().manual_seed(3)
    n, hq, hkv, d = 300, 6, 3, 16
    q = torch.randn(1, hq, d, generator=g)
    keys = torch.randn(1, n, hkv, d, generator=g)
    cfg = ParisKVConfig(topk=20, sink=4, local=8, dense_threshold=0)
    positions, valid = exact_retrieval(q, keys, cfg)
    assert positions.shape == (1, hkv, 4 + 8 + 20) and bool(valid.all())
    qm = q.double().reshape(hkv, hq // hkv, d).mean(1)  # [Hkv, D], HF group order
    for h in range(hkv):
        got = set(positions[0, h].tolist())
        assert set(range(4)) | set(range(n - 8, n)) <= got
        scores = keys[0, 4 : n - 8, h].double() @ qm[h]
        best = (scores.argsort(descending=True)[:20] + 4).tolist()
        assert got - set(range(4)) - set(range(n - 8, n)) == set(best)
    # a zone shorter than top-k: every key once
    short, _ = exact_retrieval(q, keys[:, :30], cfg)
    assert sorted(short[0, 0].tolist()) == list(range(30))


def test_exact_selection_attends_what_exact_retrieval_picks():
    from pariskv_tools.hf_attention import ParisKVAttention, exact_retrieval
    from sglang_pariskv.codec.attention import sparse_attention

    with pytest.raises(ValueError, match="selection"):
        ParisKVAttention(ParisKVConfig(), selection="topk")
    g = torch.Generator().manual_seed(4)
    n, hq, hkv, d = 200, 4, 2, 16
    q = torch.randn(1, hq, 1, d, generator=g)
    k = torch.randn(1, hkv, n, d, generator=g)
    v = torch.randn(1, hkv, n, d, generator=g)
    cfg = ParisKVConfig(topk=16, sink=4, local=8, dense_threshold=0)
    attn = ParisKVAttention(cfg, measure=False, selection="exact")
    module = torch.nn.Module()
    module.layer_idx = 0
    out, _ = attn(module, q, k, v, None, scaling=d**-0.5)
    keys, values = k.transpose(1, 2), v.transpose(1, 2)
    pos, valid = exact_retrieval(q[:, :, 0], keys, cfg)
    want = sparse_attention(q[:, :, 0].double(), keys.double(), values.double(), pos, valid)
    assert torch.allclose(out[:, 0].double(), want, atol=1e-5)
