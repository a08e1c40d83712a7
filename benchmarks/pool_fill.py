"""Fill a server's KV pool to its advertised token capacity with concurrent requests.

The server plans its memory (ParisKV's codes, decode workspace and FlashInfer workspaces)
before it sizes the KV pool; what the plan missed shows up as an out-of-memory error only
when the pool is actually full, at the largest batch and context. The fill sends the fewest
requests that can hold every free token (each at most as long as the server serves a
request, at most ``--max-running-requests`` of them), all at once, each decoding a few
tokens, and records how full the pool got (``/v1/loads`` polled while they run) and whether
every request completed.
"""

from __future__ import annotations

import math
import threading
import time

from mixed_workload import Request, prompt_ids
from server_client import RequestFailed, _check_local, generate, used_tokens

#: Prompt-seed indices of the fill's requests, outside the soak's clients' and probes'.
FILL_INDEX = 2**42
#: Tokens each fill request decodes.
FILL_OUTPUT_LEN = 16
#: Seconds between /v1/loads polls during the fill.
POLL_S = 0.2


def fill_plan(
    free_tokens: int, request_tokens: int, max_running: int | None, output_len: int
) -> list[int]:
    """Input lengths of the requests that together hold ``free_tokens`` tokens (input +
    output), each at most ``request_tokens``: the fewest such requests, capped at
    ``max_running`` (None: no cap), their totals as equal as integers allow."""
    if free_tokens < 1 or request_tokens <= output_len:
        raise ValueError(
            f"no fill of {free_tokens} free tokens with requests of at most "
            f"{request_tokens} tokens and {output_len} output tokens"
        )
    n = math.ceil(free_tokens / request_tokens)
    if max_running is not None:
        n = min(n, max_running)
    totals = [min(free_tokens // n + (i < free_tokens % n), request_tokens) for i in range(n)]
    return [t - output_len for t in totals if t > output_len]


def check_fillable(free_tokens: int, request_tokens: int, max_running: int | None) -> None:
    """Raise ValueError, naming the fix, where ``max_running`` requests of at most
    ``request_tokens`` tokens cannot hold the pool's ``free_tokens``: such a fill would
    not reach the pool's capacity, which is what it is there to test."""
    if max_running is not None and max_running * request_tokens < free_tokens:
        raise ValueError(
            f"the KV pool has {free_tokens} free tokens, but {max_running} running requests "
            f"(--max-running-requests) of at most {request_tokens} tokens hold "
            f"{max_running * request_tokens}: the fill cannot reach the pool's capacity. Cap "
            f"the pool (--server-arg=--max-total-tokens --server-arg=N with N at most "
            f"{max_running * request_tokens}) or allow more running requests"
        )


def fill_pool(
    url: str,
    free_tokens: int,
    request_tokens: int,
    max_running: int | None,
    timeout: float,
    seed: int = 0,
    output_len: int = FILL_OUTPUT_LEN,
) -> dict:
    """Send :func:`fill_plan`'s requests at once and wait for all of them; the result, with
    the largest ``num_used_tokens`` seen (sum over ranks) while they ran."""
    _check_local(url)
    lens = fill_plan(free_tokens, request_tokens, max_running, output_len)
    errors: list[str] = []
    lock = threading.Lock()

    def one(i: int, n: int) -> None:
        req = Request(index=FILL_INDEX + i, cls="fill", input_len=n, arrival_s=0.0)
        try:
            generate(url, prompt_ids(seed, req), output_len, timeout)
        except RequestFailed as e:
            with lock:
                errors.append(f"fill request {i} ({n} tokens): {e}")

    threads = [threading.Thread(target=one, args=(i, n), daemon=True) for i, n in enumerate(lens)]
    for th in threads:
        th.start()
    peak = 0
    deadline = time.monotonic() + timeout
    while any(th.is_alive() for th in threads) and time.monotonic() < deadline:
        try:
            peak = max(peak, used_tokens(url))
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(POLL_S)
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    hung = sum(th.is_alive() for th in threads)
    if hung:
        errors.append(f"{hung} fill requests still running after {timeout:.0f} s")
    tokens = sum(n + output_len for n in lens)
    return {
        "requests": len(lens),
        "input_lens": sorted(set(lens)),
        "output_len": output_len,
        "tokens_requested": tokens,
        "free_tokens": free_tokens,
        "requested_fraction": tokens / free_tokens,
        "peak_used_tokens": peak,
        "peak_used_fraction": peak / free_tokens,
        "errors": len(errors),
        "error_samples": errors[:10],
    }
