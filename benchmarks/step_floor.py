"""The byte floor of a decode step: the bytes it must read, over the copy bandwidth
measured on the device in the same run.

A decode step is bound by memory traffic, so the least time it can take is the bytes it
must read (the weights, then per request the whole KV, or ParisKV's sign scan, rerank codes
and attended rows) at the device's copy bandwidth; a measured step is reported as a
multiple of that floor. Shapes are HF-style config dicts; :data:`LLAMA_8B` is the one the
throughput benchmarks serve with dummy weights.
"""

from __future__ import annotations

#: Llama-3.1-8B's architecture (weights are random: ``--load-format dummy``).
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072 + 1024,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def hbm_bandwidth_gbs(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth (read + write bytes / s), measured here and now."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    stop.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(stop) / 1000 / iters
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds / 1e9


def head_dim(shape: dict) -> int:
    """head_dim of an HF-style config dict (``hidden_size / heads`` where not given)."""
    return shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]


def layer_weights(shape: dict) -> int:
    """Weights (elements) of one decoder layer's projections in an HF-style config dict:
    Q, K, V and O, and the gated MLP (gate, up, down)."""
    h, d = shape["hidden_size"], head_dim(shape)
    q_dim = shape["num_attention_heads"] * d
    kv_dim = shape.get("num_key_value_heads", shape["num_attention_heads"]) * d
    return h * (q_dim + 2 * kv_dim) + q_dim * h + 3 * h * shape["intermediate_size"]


def kv_bytes_per_token(shape: dict) -> int:
    """Bytes of one token's K and V in every layer (bf16)."""
    heads = shape.get("num_key_value_heads", shape["num_attention_heads"])
    return 2 * 2 * head_dim(shape) * heads * shape["num_hidden_layers"]


def step_bytes(shape: dict, input_len: int, batch: int, cfg: dict | None) -> dict:
    """Bytes one decode step must read at least: weights, then per request either the
    whole KV (dense) or ParisKV's sign scan + rerank codes + attended KV rows.

    The rerank reads magnitudes and weights (5 B per 8-dim block) of each candidate, or
    with ``rerank="keys"`` its bf16 key (2 B per dim); candidates follow the config's
    ratio (the adaptive one when unset)."""
    import torch

    from sglang_pariskv.codec.budget import candidate_ratios, num_candidates, zone_lengths
    from sglang_pariskv.config import ParisKVConfig

    layers, kv_heads, d = shape["num_hidden_layers"], shape["num_key_value_heads"], head_dim(shape)
    # bf16; the embedding is a gather
    weights = 2 * (layers * layer_weights(shape) + shape["vocab_size"] * shape["hidden_size"])
    kv_row = kv_bytes_per_token(shape)
    c = None if cfg is None else ParisKVConfig.from_dict(cfg)
    # short requests, or a step whose long ones hold too few tokens, attend densely
    if c is None or c.is_dense(input_len) or input_len * batch < c.min_sparse_tokens:
        return {"weights": weights, "per_request": kv_row * input_len}
    zone = zone_lengths(torch.tensor([input_len]), c)
    cand = int(num_candidates(zone, candidate_ratios(zone, c), c)[0])  # as the server counts
    heads = kv_heads * layers
    signs = input_len * heads * (d // 8)
    rerank = cand * heads * (2 * d if c.rerank == "keys" else 5 * (d // 8))
    attended = c.budget * kv_row
    return {"weights": weights, "per_request": signs + rerank + attended}
