"""The attention hook that records a model's post-RoPE queries, keys, values and outputs.

Why a module of its own: this is the one place that reaches into transformers' attention
dispatch; :mod:`.capture` drives the prefill and decode and only tells the
:class:`Recorder` which rows each forward writes.

How: transformers 5.x dispatches attention through ``AttentionInterface``. We register a
function under :data:`CAPTURE_ATTN` that copies ``query``/``key``/``value`` (shaped
``[batch, heads, seq, head_dim]``, post-RoPE, keys/values already concatenated with the cache)
and then calls the stock ``sdpa`` implementation, and register the ``sdpa`` mask builder under
the same name so it receives exactly the mask ``sdpa`` would. Generation is therefore
bit-identical to plain ``sdpa``. The function records only while :func:`recording` has a
recorder active; otherwise it is plain ``sdpa``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CAPTURE_ATTN = "pariskv_capture"


class Recorder:
    """Preallocated per-layer buffers filled by :func:`_capture_attention`.

    The decode loop tells it which cache rows are new (``kv_start:kv_end``) and which query
    row to keep (``q_row``) before each forward, so nothing depends on the cache class.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv: int,
        n_q: int,
        head_dim: int,
        n_tokens: int,
        n_steps: int,
        dtype: torch.dtype,
    ) -> None:
        def buf(rows: int, heads: int) -> list[Tensor]:
            return [torch.zeros(rows, heads, head_dim, dtype=dtype) for _ in range(n_layers)]

        self.keys = buf(n_tokens, n_kv)
        self.values = buf(n_tokens, n_kv)
        self.queries = buf(n_steps, n_q)
        self.outputs = buf(n_steps, n_q)
        self.kv_start = 0
        self.kv_end = 0
        self.q_row = 0
        self.seen = [0] * n_layers

    def record(self, layer: int, query: Tensor, key: Tensor, value: Tensor, out: Tensor) -> None:
        if query.shape[0] != 1:
            raise ValueError(f"capture supports batch size 1, got {query.shape[0]}")
        if key.shape[2] < self.kv_end:
            raise RuntimeError(
                f"layer {layer}: attention got {key.shape[2]} keys but the cache should hold "
                f"{self.kv_end}; the model's cache is not the one capture() created."
            )
        s, e = self.kv_start, self.kv_end
        self.keys[layer][s:e] = key[0, :, s:e].transpose(0, 1)
        self.values[layer][s:e] = value[0, :, s:e].transpose(0, 1)
        self.queries[layer][self.q_row] = query[0, :, -1]
        self.outputs[layer][self.q_row] = out[0, -1]  # sdpa returns [batch, seq, heads, D]
        self.seen[layer] += 1


_ACTIVE: ContextVar[Recorder | None] = ContextVar("pariskv_capture_recorder", default=None)


def _capture_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """AttentionInterface entry: run sdpa, then copy q/k/v/output if a recorder is active."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    recorder = _ACTIVE.get()
    if recorder is not None:
        recorder.record(module.layer_idx, query, key, value, out)
    return out, weights


def register_capture_attention() -> str:
    """Register :data:`CAPTURE_ATTN` with transformers (idempotent) and return the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTN, _capture_attention)
    # Without a mask function under the same name, transformers passes mask=None to custom
    # attention, which is wrong for any padded or static cache.
    AttentionMaskInterface.register(CAPTURE_ATTN, sdpa_mask)
    return CAPTURE_ATTN


@contextlib.contextmanager
def capture_attention(model: PreTrainedModel) -> Iterator[None]:
    """Temporarily switch ``model`` to the capture attention; restores the previous one."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(register_capture_attention())
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[None]:
    """Make ``recorder`` the one the capture attention fills, for the duration of the block."""
    token = _ACTIVE.set(recorder)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
