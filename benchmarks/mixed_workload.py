"""Mixed traffic's requests: which are short chats and which long documents, their input
lengths, their Poisson arrival times and their prompts, all a function of the seed.

Both servers of a comparison, and every rate, get the same requests, so their numbers
differ by the server alone. Prompts are random token ids from a range inside any
Llama-family vocabulary, so the same requests serve the dummy model and a real checkpoint,
and no two requests share a prefix for the radix cache to reuse. The soak and the
million-token run draw their prompts from :func:`prompt_ids` too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = ("short", "long")
#: Prompt token ids are drawn from this range: inside any Llama-family vocabulary, so the
#: same request list serves the dummy model and a real ``--model-path``.
TOKEN_ID_RANGE = (1000, 32000)


@dataclass(frozen=True)
class Request:
    """One request of a rate's workload: its class, prompt length and send time."""

    index: int
    cls: str
    input_len: int
    arrival_s: float


def make_workload(
    n: int,
    rate: float,
    long_fraction: float,
    short_input: tuple[int, int],
    long_input: tuple[int, int],
    seed: int,
) -> list[Request]:
    """``n`` requests: ``round(n * long_fraction)`` long ones at random positions, input
    lengths uniform in their class's inclusive range, Poisson arrivals (exponential gaps
    of mean ``1 / rate``, the first request at 0).

    Classes and lengths depend on the seed alone, and the gaps are one draw of unit
    exponentials divided by the rate, so every rate replays the same requests, compressed
    in time."""
    if n < 1 or rate <= 0 or not 0 <= long_fraction <= 1:
        raise ValueError(
            f"need n >= 1, rate > 0, 0 <= long_fraction <= 1 (got {n}, {rate}, {long_fraction})"
        )
    for lo, hi in (short_input, long_input):
        if not 1 <= lo <= hi:
            raise ValueError(f"input range {lo}-{hi}: need 1 <= low <= high")
    rng = np.random.default_rng(seed)
    n_long = round(n * long_fraction)
    is_long = np.zeros(n, dtype=bool)
    is_long[rng.permutation(n)[:n_long]] = True
    short_len = rng.integers(short_input[0], short_input[1], size=n, endpoint=True)
    long_len = rng.integers(long_input[0], long_input[1], size=n, endpoint=True)
    gaps = rng.exponential(1.0, size=n) / rate
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    return [
        Request(
            index=i,
            cls="long" if is_long[i] else "short",
            input_len=int(long_len[i] if is_long[i] else short_len[i]),
            arrival_s=float(arrivals[i]),
        )
        for i in range(n)
    ]


def prompt_ids(seed: int, req: Request) -> list[int]:
    """The request's prompt: random token ids, a function of (seed, index) alone, so both
    servers see the same prompts and no two requests share a prefix."""
    rng = np.random.default_rng([seed, req.index])
    return rng.integers(*TOKEN_ID_RANGE, size=req.input_len).tolist()
