"""Timing statistics of streamed generations, shared by the examples and their benchmark.

Both clients (SGLang frontend forks, OpenAI chat streams) time the same two things, so
they must compute them the same way for dense and ParisKV numbers to compare."""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def median(xs: Iterable[float | None]) -> float | None:
    """Median of the values that exist (None: a request that produced no timing)."""
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def decode_rate(n_out: int | None, span_s: float, first_chunk_tokens: int = 1) -> float | None:
    """Decode tokens/s of one stream: the tokens that arrived after the first chunk, over the
    time from the first chunk to the last.

    The first chunk holds the first token (prefill's) and, when the server coalesced
    outputs because its client fell behind (SGLang streams only the newest state of a
    request), the tokens decoded meanwhile: ``first_chunk_tokens``, from the count the
    server reports with that chunk. Counting them as decoded within the span would
    overstate the rate. None when there is no interval to divide by."""
    n = (n_out or 0) - max(first_chunk_tokens, 1)
    return n / span_s if n > 0 and span_s > 0 else None
