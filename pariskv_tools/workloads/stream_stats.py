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


def tokens_after_first_chunk(n_out: int | None, first_chunk_tokens: int = 1) -> int:
    """The output tokens of one stream that arrived after its first chunk.

    The first chunk holds the first token (prefill's) and, when the server coalesced
    outputs because its client fell behind (SGLang streams only the newest state of a
    request), the tokens decoded meanwhile: ``first_chunk_tokens``, from the count the
    server reports with that chunk (at least one). Counting them as decoded between the
    first and the last chunk would overstate the decode rate."""
    return (n_out or 0) - max(first_chunk_tokens, 1)


def decode_rate(n_out: int | None, span_s: float, first_chunk_tokens: int = 1) -> float | None:
    """Decode tokens/s of one stream: :func:`tokens_after_first_chunk` over the time from
    the first chunk to the last. None when there is no interval to divide by."""
    n = tokens_after_first_chunk(n_out, first_chunk_tokens)
    return n / span_s if n > 0 and span_s > 0 else None
