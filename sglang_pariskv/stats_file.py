"""ParisKV's counters as JSON files, for benchmarks and debugging (``--pariskv-stats-dir``).

Prometheus (``--enable-metrics``) is the operator's interface; this file is the one a
script can read without a running HTTP server. Each scheduler process rewrites
``pariskv-tp<rank>-<pid>.json`` after every batch. Under tensor parallelism every rank
serves the same requests (over its own KV heads), so the per-request counters of a
server are those of rank 0: :func:`read_stats_dir` sums rank-0 files only (several files
when several servers or engines used the same folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def stats_path(stats_dir: str | Path, tp_rank: int) -> Path:
    """Where this process writes its counters (the folder created once, here, not at
    every batch's write)."""
    Path(stats_dir).mkdir(parents=True, exist_ok=True)
    return Path(stats_dir) / f"pariskv-tp{tp_rank}-{os.getpid()}.json"


def write_stats(path: Path, snapshot: dict) -> None:
    """Atomic rewrite (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(snapshot))
    tmp.replace(path)


def read_stats_dir(stats_dir: str | Path) -> dict:
    """Summed numeric counters of the rank-0 files in ``stats_dir`` ({}: ParisKV never ran)."""
    total: dict = {}
    for f in sorted(Path(stats_dir).glob("pariskv-tp0-*.json")):
        for k, v in json.loads(f.read_text()).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return total
