"""An exactly equivalent copy of a Llama checkpoint with every attention head duplicated.

Tensor-parallel tests need a real model whose heads divide by the TP size; SmolLM2-135M
has 9 query and 3 KV heads, so ``--tp-size 2`` cannot shard it. Duplicating each head
(query, key and value projections stacked twice, ``o_proj`` input columns stacked twice
and halved) gives 18 query / 6 KV heads computing the same function: query head j < 9
still reads KV head j // 3, query head 9 + j reads KV head 3 + j // 3, the copy of the
same head, and the two halves of ``o_proj`` add back to the original. Under ``--tp-size 2``
each rank then holds a complete copy of the original attention, so TP=1 and TP=2 runs of
the widened model must give the same greedy outputs, with real weights (peaked logits).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def widen_state_dict(state: dict[str, torch.Tensor], factor: int) -> dict[str, torch.Tensor]:
    """Duplicate the heads of every attention projection ``factor`` times."""
    out = {}
    for name, w in state.items():
        proj = next((p for p in _ATTN if f".self_attn.{p}." in name), None)
        if proj is None:
            out[name] = w
        elif proj == "o_proj":
            if name.endswith(".bias"):
                out[name] = w
            else:  # [hidden, Hq*D] -> [hidden, factor*Hq*D], each copy weighted 1/factor
                out[name] = torch.cat([w] * factor, dim=1) / factor
        else:  # [H*D, hidden] (and biases [H*D]) -> heads repeated as a block
            out[name] = torch.cat([w] * factor, dim=0)
    return out


def widen_config(config: dict, factor: int) -> dict:
    cfg = dict(config)
    heads = cfg["num_attention_heads"]
    cfg.setdefault("head_dim", cfg["hidden_size"] // heads)  # keep D when heads change
    cfg["num_attention_heads"] = heads * factor
    cfg["num_key_value_heads"] = cfg.get("num_key_value_heads", heads) * factor
    return cfg


def widen_checkpoint(src: Path, dst: Path, factor: int = 2) -> Path:
    """Write the widened copy of HF directory ``src`` (safetensors) to ``dst``."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    if (dst / "config.json").is_file():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    state = load_file(str(src / "model.safetensors"))
    save_file(widen_state_dict(state, factor), str(tmp / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps(widen_config(cfg, factor), indent=2))
    tmp.rename(dst)
    return dst
