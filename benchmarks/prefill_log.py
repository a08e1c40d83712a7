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

PREFILL_LINE = re.compile(
    r"^\[(?P<stamp>\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})\] Prefill batch,.*?#new-token: (?P<new>\d+)"
)


def prefill_batches(text: str) -> list[tuple[float, int]]:
    """(POSIX seconds, new tokens) of every ``Prefill batch`` line of a server log."""
    out = []
    for line in text.splitlines():
        m = PREFILL_LINE.match(line)
        if m:
            stamp = datetime.strptime(m["stamp"], "%Y-%m-%d %H:%M:%S").timestamp()
            out.append((stamp, int(m["new"])))
    return out


def chunk_progress(text: str, input_len: int) -> dict | None:
    """The prefill of the log's last prompt of ``input_len`` tokens: for each of its
    chunks, the prompt tokens before it and the seconds since its first chunk was
    scheduled. None when the log's last prefill batches do not add up to ``input_len``
    (another request's prefill came after it, or it was not logged)."""
    batches = prefill_batches(text)
    total = 0
    for first in range(len(batches) - 1, -1, -1):
        total += batches[first][1]
        if total >= input_len:
            break
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


def read_chunk_progress(log_path: Path, input_len: int) -> dict | None:
    """:func:`chunk_progress` of a log file; None if there is no such file."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return None
    return chunk_progress(text, input_len)
