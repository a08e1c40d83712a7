"""ParisKV in plain torch: the executable spec and the oracle of every kernel.

Read in pipeline order: ``rotation`` -> ``levels`` -> ``encode`` / ``layout`` (write side);
``query`` -> ``collision`` -> ``budget`` -> ``select`` -> ``attention`` (read side);
``pipeline.retrieve`` ties the read side together.
"""

from sglang_pariskv.codec.attention import dense_attention, sparse_attention
from sglang_pariskv.codec.collision import centroid_table, collision_scores
from sglang_pariskv.codec.encode import KeyCodes, decode_directions, encode_keys
from sglang_pariskv.codec.layout import codes_from_bytes, codes_to_bytes, record_bytes
from sglang_pariskv.codec.levels import magnitude_levels, magnitude_thresholds
from sglang_pariskv.codec.pipeline import Retrieval, retrieve
from sglang_pariskv.codec.query import PreparedQuery, prepare_query
from sglang_pariskv.codec.rotation import rotate, rotation_matrix
from sglang_pariskv.codec.select import (
    estimate_inner_products,
    rerank_topk,
    rerank_topk_by_keys,
    select_candidates,
)

__all__ = [
    "KeyCodes",
    "PreparedQuery",
    "Retrieval",
    "centroid_table",
    "codes_from_bytes",
    "codes_to_bytes",
    "collision_scores",
    "decode_directions",
    "dense_attention",
    "encode_keys",
    "estimate_inner_products",
    "magnitude_levels",
    "magnitude_thresholds",
    "prepare_query",
    "record_bytes",
    "rerank_topk",
    "rerank_topk_by_keys",
    "retrieve",
    "rotate",
    "rotation_matrix",
    "select_candidates",
    "sparse_attention",
]
