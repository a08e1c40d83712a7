"""How far a long prompt's chunked prefill had got, and when, read from SGLang's server log.

SGLang logs one ``Prefill batch`` line, stamped to the second, for each prefill batch it
schedules, with the batch's new tokens. When one long prompt is the last prefill a server
ran, its chunks are the last such lines, and their new tokens add up to its length. The
seconds from its first chunk's line to each later one are how long the chunks before it
took (to the second; the scheduler may plan one chunk ahead of the GPU): a chunk's time
growing with the prefix it attends to shows attention compute, not the fixed per-token
work, setting the pace.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

#: A log line's stamp, to the second, then SGLang's optional rank tag ("TP0", "DP0 TP0").
STAMP = r"^\[(?P<stamp>\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?: (?P<tag>[^\]]*))?\] "
PREFILL_LINE = re.compile(STAMP + r"Prefill batch,.*?#new-token: (?P<new>\d+)")
FLUSH_LINE = re.compile(STAMP + r"Cache flushed successfully!")


def _first_rank(m: re.Match) -> bool:
    """Whether a line comes from the first tensor-parallel rank (or carries no rank)."""
    return not m["tag"] or "TP0" in m["tag"].split()


def prefill_batches(text: str, after_last_flush: bool = False) -> list[tuple[float, int]]:
    """(POSIX seconds, new tokens) of every ``Prefill batch`` line of a server log (of the
    first rank); with ``after_last_flush``, only those after its last cache flush."""
    out = []
    for line in text.splitlines():
        if after_last_flush and (f := FLUSH_LINE.match(line)) and _first_rank(f):
            out = []
        m = PREFILL_LINE.match(line)
        if m and _first_rank(m):
            stamp = datetime.strptime(m["stamp"], "%Y-%m-%d %H:%M:%S").timestamp()
            out.append((stamp, int(m["new"])))
    return out


def chunk_progress(text: str, input_len: int | None = None) -> dict | None:
    """The chunks of a log's last long prompt: for each, the prompt tokens before it and
    the seconds since the prompt's first chunk was scheduled.

    With ``input_len``, the chunks are the last prefill batches, which must add up to it
    (else None: another prefill came after the prompt, or it was not logged). Without it
    (a run cut short, whose length so far is unknown), the chunks are the prefill batches
    after the server's last cache flush, as the benchmarks flush before a timed prompt;
    None if there are none."""
    if input_len is None:
        chunks = prefill_batches(text, after_last_flush=True)
        if not chunks:
            return None
    else:
        batches = prefill_batches(text)
        total, first = 0, len(batches)
        while first > 0 and total < input_len:
            first -= 1
            total += batches[first][1]
        if total != input_len:
            return None
        chunks = batches[first:]
    t0, before, prefix = chunks[0][0], 0, []
    for _, new in chunks:
        prefix.append(before)
        before += new
    return {
        "chunk_tokens": [new for _, new in chunks],
        "prefix_tokens": prefix,
        "seconds": [t - t0 for t, _ in chunks],
    }


def read_chunk_progress(log_path: Path, input_len: int | None = None) -> dict | None:
    """:func:`chunk_progress` of a log file; None if there is no such file."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return None
    return chunk_progress(text, input_len)
