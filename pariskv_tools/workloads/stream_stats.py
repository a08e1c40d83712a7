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


def decode_rate(n_out: int | None, span_s: float) -> float | None:
    """Decode tokens/s of one stream: (tokens - 1) / (last token time - first token time);
    the first token belongs to prefill. None when there is no interval to divide by."""
    return (n_out - 1) / span_s if n_out and n_out > 1 and span_s > 0 else None
