"""The retrieval methods compared at equal attended budget (see ``default_methods``)."""

from __future__ import annotations

from pariskv_tools.eval.methods.base import Method
from pariskv_tools.eval.methods.exact import ExactTopK
from pariskv_tools.eval.methods.pariskv import ParisKV
from pariskv_tools.eval.methods.pq import ProductQuantization
from pariskv_tools.eval.methods.quest import Quest
from pariskv_tools.eval.methods.simhash import SimHash
from pariskv_tools.eval.methods.streaming import StreamingLLM

__all__ = [
    "ExactTopK",
    "Method",
    "ParisKV",
    "ProductQuantization",
    "Quest",
    "SimHash",
    "StreamingLLM",
    "default_methods",
]

#: Methods that see the exact scores: excluded from "ParisKV beats every baseline".
ORACLES = ("exact_topk",)


def default_methods(seed: int = 0) -> list[Method]:
    """Every method of the comparison, with the parameters the quality targets
    (``eval.retrieval.check_targets``) are stated for."""
    return [
        ParisKV(outputs=("full", "stage1")),
        ParisKV(name="pariskv_norot", outputs=("full",), rotate=False),
        ExactTopK(),
        StreamingLLM(),
        Quest(page_size=16),
        SimHash(bits=10, tables=150, seed=seed),
        ProductQuantization(subvectors=2, centroids=64, seed=seed),
    ]
