"""Triton fast paths of :mod:`sglang_pariskv.codec` (each tested against it).

Write side: :func:`encode_to_pool` (keys -> pool codes + histogram counts),
:func:`add_to_histograms` (prefix hits). Read side: :class:`DecodeWorkspace` runs one
decode step's retrieval (tiers, collision scan, candidate selection, rerank, top-k, index
assembly) with fixed shapes so it can be captured in a CUDA graph; its output feeds one
FlashInfer decode call in the "head as batch" layout (see :mod:`.assemble`).
"""

from sglang_pariskv.kernels.assemble import kv_indptr_for, row_lengths
from sglang_pariskv.kernels.encode import add_to_histograms, encode_to_pool
from sglang_pariskv.kernels.workspace import DecodeOutput, DecodeWorkspace, max_candidates

__all__ = [
    "DecodeOutput",
    "DecodeWorkspace",
    "add_to_histograms",
    "encode_to_pool",
    "kv_indptr_for",
    "max_candidates",
    "row_lengths",
]
