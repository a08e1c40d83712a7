"""Per-layer ParisKV codes, indexed by the same slot ids as SGLang's KV pool.

A slot's code is written whenever its key is, so it is exactly as valid as the KV: radix
cache prefix hits hand out slot ids whose codes are already there, and a reused slot is
overwritten by its next writer together with its KV. Nothing here tracks requests.

Keys are encoded relative to a fixed calibration per (layer, KV head) when one is given
(centres and channel scales from a calibration file, see
:mod:`sglang_pariskv.calibration`): tensors made at construction and never replaced, so
the codes do not depend on the writing request and captured CUDA graphs keep reading the
same memory. Retrieval reads the same scales for its queries (:attr:`CodePool.scales`).

A pool for the rerank by the keys (``records=False``) stores the sign signatures only: its
magnitude and weight tensors have zero width, the kernels write no records, and a token
costs B bytes per KV head instead of 6B.
"""

from __future__ import annotations

import torch

from sglang_pariskv.codec.encode import KeyCodes, encode_keys
from sglang_pariskv.codec.layout import record_bytes, signature_bytes


def code_bytes_per_token(
    num_kv_heads: int, head_dim: int, num_layers: int, records: bool = True
) -> int:
    """Code bytes one token costs across all layers (counted in SGLang's cell size):
    whole records, or (``records=False``) the sign signatures only."""
    per_head = record_bytes(head_dim) if records else signature_bytes(head_dim)
    return num_kv_heads * per_head * num_layers


class CodePool:
    """signs / mags / weights tensors per layer, shaped ``[num_slots, kv_heads, ...]`` (mags
    and weights of width 0 without records)."""

    def __init__(
        self,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        num_layers: int,
        device: torch.device | str,
        seed: int = 0,
        centres: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        records: bool = True,
    ):
        """``centres`` and ``scales``: float ``[num_layers, num_kv_heads, head_dim]`` key
        centres and channel scales (copied to ``device`` as float32), or None for 0 and 1.
        ``records``: store the 3-bit records the code rerank reads (False: the signs only,
        for the rerank by the keys)."""
        b = head_dim // 8
        record_bytes(head_dim)  # validates head_dim
        self.num_slots, self.num_kv_heads, self.head_dim = num_slots, num_kv_heads, head_dim
        self.seed = seed
        # On CUDA the fused Triton kernel writes codes in place (encoder None); elsewhere
        # (CPU tests) the codec encodes and the codes are scattered.
        self.encoder = None if torch.device(device).type == "cuda" else encode_keys
        want = (num_layers, num_kv_heads, head_dim)
        for name, x in (("centres", centres), ("channel scales", scales)):
            if x is not None and tuple(x.shape) != want:
                raise ValueError(
                    f"key {name} of shape {tuple(x.shape)} for a pool of {num_layers} "
                    f"layers x {num_kv_heads} KV heads x head_dim {head_dim}"
                )
        if scales is not None and not bool((scales > 0).all()):
            raise ValueError("key channel scales must be positive")

        def on_device(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device=device, dtype=torch.float32).contiguous()

        #: float32 [layers, Hkv, D] on the pool's device, or None (0: no centring).
        self.centres = on_device(centres)
        #: float32 [layers, Hkv, D] on the pool's device, or None (1: no scaling).
        self.scales = on_device(scales)
        rb = b if records else 0  # blocks of the 3-bit records stored per row
        shape = (num_slots, num_kv_heads)
        self.layers: list[KeyCodes] = [
            KeyCodes(
                signs=torch.zeros(*shape, b, dtype=torch.uint8, device=device),
                mags=torch.zeros(*shape, 3 * rb, dtype=torch.uint8, device=device),
                weights=torch.zeros(*shape, rb, dtype=torch.float16, device=device),
            )
            for _ in range(num_layers)
        ]
        #: address tables of :meth:`write_layers` (K buffers, signs, mags, weights)
        self._tables: tuple[torch.Tensor, ...] | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

    def write(self, layer: int, loc: torch.Tensor, keys: torch.Tensor) -> None:
        """Encode ``keys`` [T, H, D] and store them at slots ``loc`` [T] of ``layer``."""
        if keys.shape[0] == 0:
            return
        keys = keys.reshape(keys.shape[0], self.num_kv_heads, self.head_dim)
        dst = self.layers[layer]
        centre, scale = self.calibration(layer)
        if self.encoder is None:
            from sglang_pariskv.kernels.encode import encode_to_pool

            # fused Triton pass, in place
            encode_to_pool(keys, loc, dst, seed=self.seed, centre=centre, scale=scale)
        else:
            for d, s in zip(dst, self.encoder(keys, self.seed, centre, scale)):
                if d.shape[-1]:  # (a pool without records keeps the signs only)
                    d[loc] = s

    def write_layers(self, loc: torch.Tensor, key_buffers: list[torch.Tensor]) -> None:
        """Encode, for every layer, the key stored at slots ``loc`` [T] of that layer's K
        buffer (``key_buffers``: the KV pool's, one ``[S, H, D]`` per layer): what
        :meth:`write` per layer would store, in one kernel launch on CUDA."""
        if self.encoder is not None:
            for layer, k in enumerate(key_buffers):
                self.write(layer, loc, k[loc])
            return
        from sglang_pariskv.kernels.encode import encode_layers_to_pool

        encode_layers_to_pool(
            key_buffers,
            loc,
            self.layers,
            self.address_tables(key_buffers),
            self.seed,
            self.centres,
            self.scales,
        )

    def address_tables(self, key_buffers: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The (K buffers, signs, mags, weights) address tables of :meth:`write_layers`,
        made on first use and kept: a captured CUDA graph reads these addresses, so call
        it before capture (it copies to the device)."""
        if self._tables is None:
            from sglang_pariskv.kernels.encode import address_table

            device = key_buffers[0].device
            per_layer = (key_buffers, *([c[i] for c in self.layers] for i in range(3)))
            self._tables = tuple(address_table(ts, device) for ts in per_layer)
        return self._tables

    def calibration(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(centre, channel scales) of ``layer``'s heads, each fp32 [Hkv, D] or None."""
        return (
            None if self.centres is None else self.centres[layer],
            None if self.scales is None else self.scales[layer],
        )

    def move(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
        """Copy codes between slots (mirrors ``KVCache.move_kv_cache``)."""
        for layer in self.layers:
            for t in layer:
                t[tgt_loc] = t[src_loc]

    def get_cpu_copy(self, indices: torch.Tensor) -> list[KeyCodes]:
        return [KeyCodes(*(t[indices].to("cpu") for t in layer)) for layer in self.layers]

    def load_cpu_copy(self, copy: list[KeyCodes], indices: torch.Tensor) -> None:
        for layer, saved in zip(self.layers, copy):
            for t, s in zip(layer, saved):
                t[indices] = s.to(t.device)
