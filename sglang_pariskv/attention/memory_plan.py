"""GPU memory the ParisKV backend allocates, planned before SGLang sizes its KV pool.

SGLang fills the memory it keeps for the KV pool with tokens, then builds the attention
backend from what is left (headroom meant for activations and CUDA graphs). ParisKV's
backend allocates on top of that: the decode retrieval workspace (it grows with batch x
context: about 3.7 GB at 1M tokens x 256 requests) and FlashInfer workspaces. Unplanned,
a pool filled to its advertised capacity could then run out of memory. So the plugin
computes these bytes from the same constructors (built on PyTorch's ``meta`` device, which
allocates nothing) and takes them out of the pool. The backend then measures what it
actually allocated and logs both (``memory_check``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_pariskv.attention.sparse_decode import WORKSPACE_BYTES
from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.kernels.workspace import DecodeWorkspace

#: Device int workspace of each FlashInfer decode wrapper (FlashInfer allocates 8 MiB).
FLASHINFER_INT_WORKSPACE_BYTES = 8 * 1024 * 1024


def tensor_bytes(obj, _seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from ``obj``'s attributes (lists, tuples, dicts and
    plain objects included), each tensor counted once."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    fields = getattr(obj, "__dict__", None)
    return sum(tensor_bytes(v, seen) for v in fields.values()) if fields else 0


@dataclass(frozen=True)
class BackendMemoryPlan:
    """Bytes by owner; ``total`` is what the plugin takes out of SGLang's KV pool."""

    workspace: int
    flashinfer: int
    #: --pariskv-dense-layers' full-length plan (``attention.dense_layers``); 0 without.
    dense_layers: int = 0
    #: the KV pool's key centres and channel scales (``--pariskv-calibration``); 0 without.
    calibration: int = 0

    @property
    def total(self) -> int:
        return self.workspace + self.flashinfer + self.dense_layers + self.calibration


def plan_backend_memory(
    config: ParisKVConfig,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    num_layers: int,
    max_batch: int,
    max_context: int,
    graph_batch_sizes: int,
    max_graph_batch: int | None = None,
    kv_dtype: torch.dtype = torch.bfloat16,
) -> BackendMemoryPlan:
    """What ``ParisKVAttnBackend`` allocates for these sizes: the workspace for
    ``max_batch`` rows of ``max_context`` (plus the query copy its first run makes); one
    shared FlashInfer float workspace, an int workspace for the eager call and each
    captured batch size, and one more per size for the dense-step graph SGLang's
    FlashInfer backend captures beside the sparse-step one. With dense layers, their
    full-length plan: its own indptr, a CUDA-graph ``kv_indices`` buffer of
    ``max_graph_batch`` (default ``max_batch``) x ``max_context`` entries, and an int
    workspace for its eager wrapper and each captured batch size. With a calibration file,
    the code pool's fp32 centres (and channel scales, when the file has them) of this
    rank's layers and KV heads."""
    meta = torch.device("meta")
    ws = DecodeWorkspace(
        config, num_q_heads, num_kv_heads, head_dim, max_batch=max_batch,
        max_context=max_context, device=meta,
    )  # fmt: skip
    query_copy = (
        max_batch * num_q_heads * head_dim * torch.tensor([], dtype=kv_dtype).element_size()
    )
    wrappers = 1 + 2 * graph_batch_sizes
    dense_layers = 0
    if config.dense_layer_set(num_layers):
        graph_rows = max_batch if max_graph_batch is None else max_graph_batch
        int32 = 4
        dense_layers = (
            (max_batch + 1) * int32  # indptr
            + graph_rows * max_context * int32  # CUDA-graph kv_indices
            + (1 + graph_batch_sizes) * FLASHINFER_INT_WORKSPACE_BYTES
        )
    calibration = 0
    if config.calibration is not None:
        from sglang_pariskv.calibration import load_calibration

        tables = 1 if load_calibration(config.calibration).scales is None else 2
        calibration = tables * num_layers * num_kv_heads * head_dim * 4
    return BackendMemoryPlan(
        workspace=tensor_bytes(ws) + query_copy,
        flashinfer=WORKSPACE_BYTES + wrappers * FLASHINFER_INT_WORKSPACE_BYTES,
        dense_layers=dense_layers,
        calibration=calibration,
    )
