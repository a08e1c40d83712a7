"""Captured q/k/v must be what SmolLM2 attends with, checked by independent recomputation."""

from __future__ import annotations

import pytest
import torch

from pariskv_tools.workloads import capture as cap_mod
from pariskv_tools.workloads import capture_hook, task_generators, tasks
from pariskv_tools.workloads.smollm2 import load_smollm2

N_DECODE = 8
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_smollm2()


@pytest.fixture(scope="module")
def prompt_ids(model_and_tokenizer):
    _, tok = model_and_tokenizer
    task = task_generators.passkey(tok, 200, depth=0.5, seed=0)
    return torch.tensor(tasks.format_chat(tok, task))


@pytest.fixture(scope="module")
def captured(model_and_tokenizer, prompt_ids):
    model, tok = model_and_tokenizer
    return cap_mod.capture(model, tok, prompt_ids, N_DECODE, progress=False)


@pytest.fixture(scope="module")
def layer_inputs(model_and_tokenizer, captured):
    """Input hidden state of every layer for every token, from one plain full forward."""
    model, _ = model_and_tokenizer
    with torch.no_grad():
        out = model(input_ids=captured.token_ids[None], output_hidden_states=True)
    return [h[0] for h in out.hidden_states]  # hidden_states[l] is the input of layer l


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Half-split (Llama/HF) RoPE written out from scratch; x: [N, H, D]."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.to(torch.float64)[:, None] * inv_freq[None]  # [N, D/2]
    cos, sin = ang.cos()[:, None].float(), ang.sin()[:, None].float()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def test_shapes_and_positions(model_and_tokenizer, prompt_ids, captured):
    model, _ = model_and_tokenizer
    cfg = model.config
    p = prompt_ids.numel()
    n = p + N_DECODE
    assert captured.prompt_len == p and captured.n_decode == N_DECODE
    assert captured.n_layers == cfg.num_hidden_layers
    assert torch.equal(captured.token_ids[:p], prompt_ids)
    assert torch.equal(captured.query_positions, torch.arange(p - 1, n))
    for tensors, rows, heads in (
        (captured.keys, n, 3),
        (captured.values, n, 3),
        (captured.queries, N_DECODE + 1, 9),
        (captured.outputs, N_DECODE + 1, 9),
    ):
        assert all(t.shape == (rows, heads, 64) for t in tensors)


@pytest.mark.parametrize("layer", [0, 14, 29])
def test_keys_values_queries_match_independent_projection(
    model_and_tokenizer, captured, layer_inputs, layer
):
    model, _ = model_and_tokenizer
    cfg = model.config
    blk = model.model.layers[layer]
    theta = cfg.rope_parameters["rope_theta"]
    x = _rms_norm(layer_inputs[layer], blk.input_layernorm.weight, cfg.rms_norm_eps)
    n = x.shape[0]
    pos = torch.arange(n)
    with torch.no_grad():
        k = _rope((x @ blk.self_attn.k_proj.weight.T).view(n, 3, 64), pos, theta)
        v = (x @ blk.self_attn.v_proj.weight.T).view(n, 3, 64)
        q = _rope((x @ blk.self_attn.q_proj.weight.T).view(n, 9, 64), pos, theta)
    torch.testing.assert_close(captured.keys[layer], k, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(captured.values[layer], v, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(
        captured.queries[layer], q[captured.query_positions], atol=2e-4, rtol=1e-4
    )


@pytest.mark.parametrize("layer", [0, 14, 29])
def test_softmax_over_captured_tensors_reproduces_attention_output(captured, layer):
    k, v = captured.keys[layer], captured.values[layer]
    for step, pos in enumerate(captured.query_positions.tolist()):
        q = captured.queries[layer][step]  # [9, 64]
        kk = k[: pos + 1].repeat_interleave(3, dim=1)  # GQA: query head h reads kv head h // 3
        vv = v[: pos + 1].repeat_interleave(3, dim=1)
        scores = torch.einsum("hd,nhd->hn", q, kk) / 64**0.5
        out = torch.einsum("hn,nhd->hd", scores.softmax(-1), vv)
        torch.testing.assert_close(captured.outputs[layer][step], out, atol=1e-5, rtol=1e-4)


def test_generation_identical_to_plain_sdpa(model_and_tokenizer, prompt_ids, captured):
    model, tok = model_and_tokenizer
    assert model.config._attn_implementation == "sdpa"  # restored after capture
    p = prompt_ids.numel()
    ids = prompt_ids[None]
    with torch.no_grad():
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N_DECODE,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )[0, p:]
        # generate() stops at end-of-turn; capture() does not, so compare what both produced.
        assert ref.numel() >= 4
        assert torch.equal(captured.token_ids[p : p + ref.numel()], ref)
        # And every captured token is the argmax of an uncached full forward over the sequence.
        logits = model(input_ids=captured.token_ids[None]).logits[0]
    assert torch.equal(logits[p - 1 : -1].argmax(-1), captured.token_ids[p:])


def test_capture_attention_without_recorder_is_sdpa(model_and_tokenizer, prompt_ids):
    model, _ = model_and_tokenizer
    ids = prompt_ids[None, :64]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with capture_hook.capture_attention(model):
            assert model.config._attn_implementation == capture_hook.CAPTURE_ATTN
            got = model(input_ids=ids).logits
    assert torch.equal(ref, got)


def test_save_load_roundtrip(captured, tmp_path):
    path = tmp_path / "cap.pt"
    captured.save(path)
    back = cap_mod.Capture.load(path)
    assert back.prompt_len == captured.prompt_len and back.text == captured.text
    assert torch.equal(back.token_ids, captured.token_ids)
    assert all(torch.equal(a, b) for a, b in zip(back.keys, captured.keys))
    assert all(torch.equal(a, b) for a, b in zip(back.queries, captured.queries))


def test_rejects_overlong_request(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="max_position_embeddings"):
        cap_mod.capture(model, tok, torch.zeros(8000, dtype=torch.long), 1024, progress=False)
