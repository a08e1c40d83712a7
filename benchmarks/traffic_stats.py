"""Latency statistics of streamed requests as the client timed them: percentiles, time per
output token, and the per-rate, per-class and per-server numbers mixed traffic reports.

Time per output token leaves the first token out, since that one carries the prefill; it
is what a user sees as the speed of an answer. Percentiles interpolate between order
statistics (numpy's default), so they exist for any number of requests.
"""

from __future__ import annotations

import numpy as np
from mixed_workload import CLASSES

from pariskv_tools.workloads.stream_stats import tokens_after_first_chunk

MODES = ("dense", "pariskv")


def percentile(xs: list[float], q: float) -> float | None:
    """The ``q``-th percentile by linear interpolation between order statistics (the
    definition of numpy's default); None for no values."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def tpot_s(rec: dict) -> float | None:
    """(last token time - first token time) / the tokens that came after the first chunk
    (``stream_stats.tokens_after_first_chunk`` of ``first_tokens``: one, or more when the
    server coalesced a lagging client's outputs into it); None when no token came after it."""
    n = tokens_after_first_chunk(rec["tokens"], rec.get("first_tokens", 1))
    return (rec["last_s"] - rec["first_s"]) / n if n > 0 else None


def class_stats(records: list[dict], cls: str, wall_s: float) -> dict:
    """TTFT and TPOT percentiles (ms), output tokens/s and errors of one class's requests."""
    mine = [r for r in records if r["cls"] == cls]
    ok = [r for r in mine if r["error"] is None]
    ttft = [1000 * (r["first_s"] - r["start_s"]) for r in ok]
    tpot = [1000 * t for t in (tpot_s(r) for r in ok) if t is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(mine),
        "input_tokens_mean": float(np.mean([r["input_len"] for r in mine])) if mine else None,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "tpot_p50_ms": percentile(tpot, 50),
        "tpot_p99_ms": percentile(tpot, 99),
        "output_tokens": tokens,
        "output_tok_s": tokens / wall_s if wall_s > 0 else None,
        "errors": len(mine) - len(ok),
    }


def summarize(runs: dict[str, dict], rates: list[float]) -> dict:
    """Per rate: per class, each server's statistics; and each server's total output
    tokens/s. ``runs[mode]["rates"][str(rate)]`` is :func:`run_rate`'s result."""
    out = {}
    for rate in rates:
        key = str(rate)
        per = {cls: {} for cls in CLASSES}
        per["total_output_tok_s"], per["sent"], per["wall_s"] = {}, {}, {}
        for mode in MODES:
            got = runs[mode]["rates"][key]
            for cls in CLASSES:
                per[cls][mode] = class_stats(got["records"], cls, got["wall_s"])
            tokens = sum(r["tokens"] for r in got["records"] if r["error"] is None)
            per["total_output_tok_s"][mode] = tokens / got["wall_s"] if got["wall_s"] else None
            per["sent"][mode], per["wall_s"][mode] = got["sent"], got["wall_s"]
        out[key] = per
    return out
