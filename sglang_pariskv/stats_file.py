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
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("sglang_pariskv")


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


class StatsWriter:
    """Rewrites one process's stats file on a background thread.

    Why: building the snapshot, a JSON dump and an atomic rename cost 0.3-1.3 ms, and the
    counters change every batch; done inline, that host time lands on every decode step
    (at batch 1 it was most of ParisKV's cost over dense). The scheduler only signals a
    change (:meth:`notify`); the thread reads the counters through ``snapshot`` and
    writes at most every ``interval`` seconds, so the file trails them by about that
    much. Counters are plain ints read under the GIL: a snapshot taken mid-batch may mix
    two batches' values, never a half-written number."""

    def __init__(self, path: Path, snapshot: Callable[[], dict], interval: float = 0.02):
        self.path, self.snapshot, self.interval = path, snapshot, interval
        self._requested = self._written = 0
        self._failed = False  # the last write failed (warned once until one succeeds)
        self._changed = threading.Event()
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="pariskv-stats", daemon=True).start()

    def notify(self) -> None:
        self._requested += 1
        self._changed.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the counters as of now are on disk (tests, shutdown)."""
        want = self._requested
        with self._cond:
            return self._cond.wait_for(lambda: self._written >= want, timeout)

    def _run(self) -> None:
        while True:
            self._changed.wait()
            self._changed.clear()
            seen = self._requested
            try:
                write_stats(self.path, self.snapshot())
            except OSError as e:  # a full disk or a removed folder must not end the thread
                if not self._failed:
                    logger.warning("ParisKV stats file %s not written: %s", self.path, e)
                self._failed = True
                time.sleep(self.interval)
                continue  # the next change tries again; flush() keeps waiting for it
            self._failed = False
            with self._cond:
                self._written = seen
                self._cond.notify_all()
            time.sleep(self.interval)  # let changes coalesce


def read_stats_dir(stats_dir: str | Path) -> dict:
    """Summed numeric counters of the rank-0 files in ``stats_dir`` ({}: ParisKV never ran)."""
    total: dict = {}
    for f in sorted(Path(stats_dir).glob("pariskv-tp0-*.json")):
        for k, v in json.loads(f.read_text()).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return total
