"""Retrieval-quality evaluation of ParisKV against its peers on captured model traces.

Entry point: ``python -m pariskv_tools.eval retrieval``. Every method turns a decode step
into a *ranking* of the retrieval zone (best first); the attended set at any budget is
sink + local window + the first k ranked tokens. Ranking once and cutting at many k makes the
budget sweep nearly free and guarantees that every method is compared at the same
attended-token budget.
"""
