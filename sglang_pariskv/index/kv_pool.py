"""SGLang's MHA KV pool with a ParisKV code pool riding along.

Every path that writes, moves or restores KV in ``MHATokenToKVPool`` does the same for the
codes, so the codes of a slot are always those of the key stored there. The plugin swaps
this class in for ``MHATokenToKVPool`` where SGLang builds its KV pool.
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, unwrap_write_loc

from sglang_pariskv.config import ParisKVConfig, ParisKVConfigError
from sglang_pariskv.index.code_pool import CodePool


def tp_position() -> tuple[int, int]:
    """(attention TP rank, attention TP size) of this process; (0, 1) where SGLang's
    parallel state is not set up (a pool built outside a server, as in the CPU tests)."""
    from sglang.srt.runtime_context import get_parallel

    try:
        ps = get_parallel()
        return int(ps.attn_tp_rank), int(ps.attn_tp_size)
    except (AssertionError, AttributeError, RuntimeError):
        return 0, 1


class ParisKVTokenToKVPool(MHATokenToKVPool):
    """``MHATokenToKVPool`` + slot-keyed ParisKV codes (``self.pariskv``)."""

    #: Set by the plugin before SGLang constructs the pool.
    pariskv_config: ParisKVConfig = ParisKVConfig()
    #: K/V must be stored through :meth:`set_kv_buffer` (which writes the codes), never by
    #: a model's fused RoPE kernel writing the buffers directly; an SGLang with ParisKV
    #: built in reads this flag (the plugin patches the models instead).
    requires_set_kv_buffer: bool = True
    #: Set by the backend for a decode step whose codes it writes for all layers at once
    #: after the last layer (``attention.deferred_codes``); False: each write encodes.
    defer_codes: bool = False

    def __init__(self, *args, **kwargs):
        if kwargs.get("post_capture_active"):
            raise ParisKVConfigError(
                "SGLANG_ENABLE_POST_CAPTURE_KV_SIZING=1 resizes the KV pool after CUDA-graph "
                "capture, which the ParisKV code pool does not follow: unset it"
            )
        if kwargs.get("quant_method") is not None:
            raise ParisKVConfigError(
                "quantized (fp4/mxfp8) KV caches are not supported with ParisKV: pass "
                "--kv-cache-dtype auto"
            )
        super().__init__(*args, **kwargs)
        centres, scales = self._key_calibration()
        self.pariskv = CodePool(
            num_slots=self.size + self.page_size,
            num_kv_heads=self.head_num,
            head_dim=self.head_dim,
            num_layers=self.layer_num,
            device=self.device,
            seed=self.pariskv_config.rotation_seed,
            centres=centres,
            scales=scales,
            records=self.pariskv_config.stores_records,
        )

    def _key_calibration(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This rank's key (centres, channel scales), each [layers, KV heads, D] or None,
        from the calibration file, checked against the pool's shape; (None, None) without
        a calibration file."""
        path = self.pariskv_config.calibration
        if path is None:
            return None, None
        from sglang_pariskv.calibration import load_calibration

        cal = load_calibration(path)
        start = getattr(self, "start_layer", 0) or 0
        cal.check_model(start + self.layer_num, self.head_dim)
        rank, size = tp_position()
        centres, scales = cal.for_rank(rank, size, self.head_num)
        mine = slice(start, start + self.layer_num)
        return centres[mine], None if scales is None else scales[mine]

    def written_slots(self, layer, loc_info, kwargs) -> tuple[int, torch.Tensor]:
        """(this pool's layer index, slot ids) of a ``set_kv_buffer`` call."""
        loc, _, _ = unwrap_write_loc(loc_info)
        layer_id = kwargs.get("layer_id_override")
        if layer_id is None:
            layer_id = layer.layer_id
        return layer_id - self.start_layer, loc

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, *args, **kwargs):
        super().set_kv_buffer(layer, loc_info, cache_k, cache_v, *args, **kwargs)
        if self.defer_codes:  # the backend writes them for every layer at the step's end
            return
        local, loc = self.written_slots(layer, loc_info, kwargs)
        self.pariskv.write(local, loc, cache_k)

    def write_deferred_codes(self, loc: torch.Tensor) -> None:
        """The codes of the keys stored at ``loc`` in every layer (after a step that ran
        with :attr:`defer_codes`), in one pass."""
        self.pariskv.write_layers(loc, self.k_buffer)

    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor):
        super().move_kv_cache(tgt_loc, src_loc)
        self.pariskv.move(tgt_loc, src_loc)

    # ``*args, **kwargs``: SGLang's own trailing parameters (``mamba_indices``, and from
    # 0.5.20 ``req_pool_index``), passed through unchanged.
    def get_cpu_copy(self, indices, *args, **kwargs):
        kv = super().get_cpu_copy(indices, *args, **kwargs)
        return {"kv": kv, "pariskv": self.pariskv.get_cpu_copy(indices)}

    def load_cpu_copy(self, kv_cache_cpu, indices, *args, **kwargs):
        super().load_cpu_copy(kv_cache_cpu["kv"], indices, *args, **kwargs)
        self.pariskv.load_cpu_copy(kv_cache_cpu["pariskv"], indices)
