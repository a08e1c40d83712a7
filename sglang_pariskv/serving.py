"""What SGLang constructs for a ParisKV server: the KV pool class and the attention backend.

Both the plugin's hooks (``plugin.py``) and a natively patched SGLang (``native.py``,
``patches/``) build them here, so the two integrations serve the same objects.
"""

from __future__ import annotations

import logging

from sglang_pariskv.config import ParisKVConfig

logger = logging.getLogger("sglang_pariskv")


def kv_pool_class(cfg: ParisKVConfig) -> type:
    """The KV pool class SGLang should construct for ``cfg``. SGLang builds the pool
    itself, so the config travels as an attribute of a per-config subclass."""
    from sglang_pariskv.index.kv_pool import ParisKVTokenToKVPool

    base = ParisKVTokenToKVPool
    if cfg.offloaded:
        from sglang_pariskv.offload.kv_pool import HostOffloadKVPool

        base = HostOffloadKVPool
    return type(base.__name__, (base,), {"pariskv_config": cfg})


def build_attn_backend(runner, cfg: ParisKVConfig):
    """The ParisKV attention backend for SGLang's model runner, after the checks that need
    the loaded model (MLA, sliding window, head shapes, context length, GPU generation):
    a model ParisKV cannot serve is refused here, before CUDA graphs are captured."""
    from sglang.srt.runtime_context import get_parallel

    from sglang_pariskv.startup_checks import check_model

    mc = runner.model_config
    tp = get_parallel().attn_tp_size
    model_name = getattr(runner.server_args, "model_path", "this model")
    check_model(
        num_q_heads=mc.get_num_attention_heads(tp),
        num_kv_heads=mc.get_num_kv_heads(tp),
        use_mla=bool(runner.use_mla_backend),
        head_dim=mc.head_dim,
        v_head_dim=mc.v_head_dim if getattr(mc, "v_head_dim", None) else mc.head_dim,
        sliding_window=bool(getattr(runner, "sliding_window_size", None))
        or bool(getattr(mc, "is_hybrid_swa", False)),
        model_name=model_name,
    )
    cfg.check_context(int(mc.context_len))
    if cfg.calibration is not None:
        from sglang_pariskv.calibration import load_calibration, rope_signature

        load_calibration(cfg.calibration).check_rope(rope_signature(mc.hf_config), model_name)
    if str(runner.device).startswith("cuda"):
        import torch

        from sglang_pariskv.support import check_compute_capability

        dev = torch.device(runner.device)
        name = torch.cuda.get_device_name(dev)
        check_compute_capability(torch.cuda.get_device_capability(dev), name)
    from sglang_pariskv.attention.backend import ParisKVAttnBackend

    return ParisKVAttnBackend(runner, cfg)
