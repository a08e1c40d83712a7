"""The head-widened SmolLM2 used for TP=2 runs computes the same function as SmolLM2."""

import json

import torch
from transformers import AutoModelForCausalLM

from pariskv_tools.workloads.smollm2 import ensure_smollm2
from pariskv_tools.workloads.widen import widen_checkpoint, widen_state_dict


def test_widened_smollm2_gives_the_same_logits(tmp_path):
    src = ensure_smollm2()
    dst = widen_checkpoint(src, tmp_path / "wide")
    cfg = json.loads((dst / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (18, 6, 64)
    ids = torch.randint(100, 40000, (1, 96), generator=torch.Generator().manual_seed(0))
    logits = []
    for path in (src, dst):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(ids).logits.double())
    ref, wide = logits
    assert wide.shape == ref.shape
    assert (wide - ref).abs().max() < 1e-3 * ref.abs().max()
    assert torch.equal(wide.argmax(-1), ref.argmax(-1))


def test_widening_is_not_a_no_op_on_the_weights():
    """Guard against a widening that silently leaves shapes (and so the TP split) as is."""
    state = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(6, 4),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(2, 4),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(4, 6),
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4),
    }
    out = widen_state_dict(state, 2)
    assert out["model.layers.0.self_attn.q_proj.weight"].shape == (12, 4)
    assert out["model.layers.0.self_attn.k_proj.weight"].shape == (4, 4)
    o = out["model.layers.0.self_attn.o_proj.weight"]
    assert o.shape == (4, 12)
    assert torch.allclose(o[:, :6] + o[:, 6:], state["model.layers.0.self_attn.o_proj.weight"])
    assert out["model.layers.0.mlp.up_proj.weight"] is state["model.layers.0.mlp.up_proj.weight"]
