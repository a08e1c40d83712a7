"""GPU fast paths of :mod:`sglang_pariskv.codec` (each tested against it).

Write side:
  * :func:`encode_to_pool` — keys ``[T, Hkv, D]`` -> code pool rows ``slots`` (codec's
    ``KeyCodes`` layout: signs uint8 ``[S, Hkv, B]``, mags uint8 ``[S, Hkv, 3B]``, weights
    fp16 ``[S, Hkv, B]``; Triton, one fused pass).
  * :func:`encode_layers_to_pool` — the keys stored at ``slots`` in every layer's K buffer
    -> every layer's code rows, one launch (a dense decode step's codes).

Read side: :class:`DecodeWorkspace` (``plan(seq_lens_cpu)`` once per step on the host,
``run(q, codes, req_to_token, req_pool_indices)`` per layer, CUDA-graph capturable)
returns ``kv_indptr`` / ``kv_indices`` for one FlashInfer decode call in the "head as
batch" layout; ``attention.sparse_decode.HeadAsBatchDecode`` wraps that call. The query
table, collision scan, rerank and top-k have CUDA versions in ``sglang_pariskv/csrc``
(nvcc on first use, :func:`cuda_available`); Triton / torch versions are the fallback.
Without CUDA the Triton kernels run only in Triton's interpreter, which the process must
turn on (``TRITON_INTERPRET=1``) before this package is imported: tests/conftest.py does.
"""

from sglang_pariskv.kernels.assemble import kv_indptr_for, row_lengths
from sglang_pariskv.kernels.cuda_ops import cuda_available
from sglang_pariskv.kernels.encode import encode_layers_to_pool, encode_to_pool
from sglang_pariskv.kernels.workspace import (
    DecodeOutput,
    DecodeWorkspace,
    max_candidates,
)

__all__ = [
    "DecodeOutput",
    "DecodeWorkspace",
    "cuda_available",
    "encode_layers_to_pool",
    "encode_to_pool",
    "kv_indptr_for",
    "max_candidates",
    "row_lengths",
]
