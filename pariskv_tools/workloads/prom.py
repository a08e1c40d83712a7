"""Read ParisKV's counters from a running server's ``/metrics`` (Prometheus text format).

Why: a workflow run should show what ParisKV did for it (keys encoded, prefix codes reused
from the radix cache, sparse decode steps), and a benchmark must be able to prove that
ParisKV ran at all. With ``--enable-metrics`` SGLang serves the ``sglang:pariskv_*``
counters at ``/metrics``; a scrape before and after a workload gives the workload's share.
Counters are summed over label sets (one per TP rank / model name), since a workload's
totals are what the examples report. Standard library only, so client-side scripts need
no ``prometheus_client``.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request

PREFIX = "sglang:pariskv_"
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _skip_labels(line: str, i: int) -> int:
    """Index just past the ``{...}`` label block starting at ``line[i]`` (quotes respected)."""
    in_quotes = False
    i += 1
    while i < len(line):
        c = line[i]
        if in_quotes:
            if c == "\\":
                i += 1  # escaped character (\\, \", \n) inside a label value
            elif c == '"':
                in_quotes = False
        elif c == '"':
            in_quotes = True
        elif c == "}":
            return i + 1
        i += 1
    raise ValueError(f"unterminated label set in metrics line: {line!r}")


def parse(text: str, prefix: str = PREFIX) -> dict[str, float]:
    """``{sample name: value summed over label sets}`` for samples whose name starts with
    ``prefix``. ``*_created`` samples (creation timestamps, not counts) are left out."""
    out: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _NAME.match(line)
        if m is None:
            raise ValueError(f"not a metrics sample line: {raw!r}")
        name, i = m.group(0), m.end()
        if not name.startswith(prefix) or name.endswith("_created"):
            continue
        if i < len(line) and line[i] == "{":
            i = _skip_labels(line, i)
        fields = line[i:].split()
        if not fields:
            raise ValueError(f"metrics sample without a value: {raw!r}")
        out[name] = out.get(name, 0.0) + float(fields[0])
    return out


def scrape(endpoint: str, prefix: str = PREFIX, timeout: float = 10.0) -> dict[str, float] | None:
    """Parsed ``<endpoint>/metrics``, or None when the server does not serve metrics
    (started without ``--enable-metrics``)."""
    url = endpoint.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return parse(resp.read().decode("utf-8"), prefix)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
    """``after - before`` per counter (``*_total``; one missing before counts from 0), plus
    the attended fraction of the interval derived from the two token counters.

    Gauges are left out: the difference of two "last batch" values means nothing."""
    if after is None:
        return {}
    before = before or {}
    out = {k: v - before.get(k, 0.0) for k, v in after.items() if k.endswith("_total")}
    attended, context = (out.get(f"{PREFIX}{n}_tokens_total") for n in ("attended", "context"))
    if attended is not None and context:
        out[f"{PREFIX}attended_fraction"] = attended / context
    return out
