"""What the ParisKV backend tells operators: counters, retrieval GPU time, stats files.

One :class:`DecodeObserver` per backend. It is fed host-side values the planner already
has (no device sync), so counting stays right when the layer work is a replayed CUDA
graph. Outputs: Prometheus counters with ``--enable-metrics`` (rank 0 only: every TP rank
serves the same requests, as SGLang's own scheduler metrics assume), and per-process JSON
files with ``--pariskv-stats-dir``. Retrieval GPU time is measured when either is on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sglang_pariskv.attention.retrieval_timer import RetrievalTimer
from sglang_pariskv.metrics import BatchCounts, ParisKVMetrics
from sglang_pariskv.stats_file import StatsWriter, stats_path


@dataclass
class DecodeStats:
    """Counters an operator reads: steps, plus the summed per-batch counts."""

    decode_steps: int = 0
    sparse_steps: int = 0  #: decode steps that ran the retrieval path
    retrieval_steps_timed: int = 0  #: steps whose retrieval GPU time was read back
    retrieval_seconds: float = 0.0  #: their summed retrieval GPU time
    totals: BatchCounts = dataclasses.field(default_factory=BatchCounts)


class DecodeObserver:
    """Counters, Prometheus export, retrieval timing and the stats file of one backend.

    ``extra_snapshot`` adds fields of other parts (host offload's pool and hot cache)."""

    def __init__(
        self,
        *,
        num_layers: int,
        tp_rank: int,
        metrics: ParisKVMetrics | None = None,
        stats_dir: str | None = None,
        timed: bool = False,
        extra_snapshot: Callable[[], dict[str, Any]] | None = None,
        config_dict: dict[str, Any] | None = None,
    ):
        self.stats = DecodeStats()
        self.metrics = metrics
        self.timer = RetrievalTimer(num_layers) if timed else None
        self.extra_snapshot = extra_snapshot
        self.config_dict = config_dict or {}
        self.path: Path | None = stats_path(stats_dir, tp_rank) if stats_dir else None
        # last: the writer thread reads every field above through snapshot()
        self.writer = StatsWriter(self.path, self.snapshot) if self.path is not None else None

    @classmethod
    def for_server(
        cls,
        *,
        num_layers: int,
        tp_rank: int,
        server_args,
        config,
        on_cuda: bool,
        extra_snapshot=None,
    ) -> DecodeObserver:
        """The observer a serving backend wants: metrics per ``--enable-metrics``, files
        per ``--pariskv-stats-dir``, timing (CUDA only) when either is on."""
        metrics_on = bool(getattr(server_args, "enable_metrics", False))
        metrics = None
        if metrics_on and tp_rank == 0:
            from sglang_pariskv.metrics import process_metrics

            name = getattr(server_args, "served_model_name", None) or server_args.model_path
            metrics = process_metrics({"model_name": str(name), "tp_rank": str(tp_rank)})
        return cls(
            num_layers=num_layers,
            tp_rank=tp_rank,
            metrics=metrics,
            stats_dir=config.stats_dir,
            timed=on_cuda and (metrics_on or config.stats_dir is not None),
            extra_snapshot=extra_snapshot,
            config_dict=config.to_dict(),
        )

    # -- decode steps --------------------------------------------------------------------
    def decode_step(
        self, seq_lens_cpu, dense, budget: int, *, sparse: bool, timer_key: Any, served: bool
    ) -> None:
        """One planned decode step, from its host-side lengths ``seq_lens_cpu``, ``dense``
        (bool) its rows that attend densely, and ``budget`` tokens per sparse row: the
        retrieval timer armed for its layers iff it runs the retrieval path (the previous
        armed step is read back), and its counts unless it is a CUDA-graph capture
        (``served`` False), which serves no request."""
        if self.timer is not None:
            timer = self.timer
            self._observe_retrieval(timer.begin_step(timer_key) if sparse else timer.disarm())
        if not served:
            return
        self.stats.decode_steps += 1
        self.stats.sparse_steps += int(sparse)
        real = seq_lens_cpu > 1  # CUDA-graph padding rows have seq_len 1; a real decode >= 2
        sparse_rows = ~dense
        self.emit(
            BatchCounts(
                tokens_encoded=int(real.sum()),
                dense_request_steps=int((dense & real).sum()),
                sparse_request_steps=int(sparse_rows.sum()),
                attended_tokens=int(sparse_rows.sum()) * budget,
                context_tokens=int(seq_lens_cpu[sparse_rows].sum()),
            )
        )

    def _observe_retrieval(self, seconds: float | None) -> None:
        if seconds is None:
            return
        self.stats.retrieval_steps_timed += 1
        self.stats.retrieval_seconds += seconds
        if self.metrics is not None:
            self.metrics.observe_retrieval(seconds)

    def extend(self, forward_batch) -> None:
        """Extend encodes its new tokens; its prefix tokens' codes are reused, not redone."""
        new = forward_batch.extend_seq_lens_cpu
        prefix = forward_batch.extend_prefix_lens_cpu
        self.emit(
            BatchCounts(
                tokens_encoded=int(sum(new)) if new is not None else 0,
                prefix_tokens_reused=int(sum(prefix)) if prefix is not None else 0,
            )
        )

    def poll(self, offload=None) -> None:
        """Read back the counters kept on the GPU (host offload's hot cache) when anything
        reads counters; no sync: the copies run behind the queue."""
        if not self.wants_counters:
            return
        if offload is not None:
            self.hot_cache(offload.poll())

    def hot_cache(self, delta: dict[str, int]) -> None:
        if self.metrics is not None:
            self.metrics.add_hot_cache(delta)

    def prefill_staging(self, delta: dict[str, int]) -> None:
        """What one extend's plan added to host offload's prefill staging counters (the
        stats file reads the totals through ``extra_snapshot``)."""
        if not any(delta.values()):
            return
        if self.metrics is not None:
            self.metrics.add_prefill_staging(delta)
        self.dump()

    def emit(self, counts: BatchCounts) -> None:
        self.stats.totals.accumulate(counts)
        if self.metrics is not None:
            self.metrics.add(counts)
        self.dump()

    # -- retrieval timing, per layer (device side) -----------------------------------------
    def start(self, layer: int) -> None:
        if self.timer is not None:
            self.timer.start(layer)

    def stop(self, layer: int) -> None:
        if self.timer is not None:
            self.timer.stop(layer)

    # -- snapshots ---------------------------------------------------------------------------
    @property
    def wants_counters(self) -> bool:
        """Whether anything reads counters (a reader may skip work otherwise)."""
        return self.metrics is not None or self.path is not None

    def snapshot(self) -> dict[str, Any]:
        """Counters for operators: decode steps, attended fraction, encode work."""
        st = dataclasses.asdict(self.stats.totals)
        st.update(
            decode_steps=self.stats.decode_steps,
            sparse_steps=self.stats.sparse_steps,
            retrieval_steps_timed=self.stats.retrieval_steps_timed,
            retrieval_seconds=self.stats.retrieval_seconds,
        )
        st["attended_fraction"] = st["attended_tokens"] / max(st["context_tokens"], 1)
        st["config"] = self.config_dict
        if self.extra_snapshot is not None:
            st.update(self.extra_snapshot())
        return st

    def dump(self) -> None:
        """Tell the stats file's writer thread the counters changed (no snapshot, no file
        I/O here: this runs in every batch's planning)."""
        if self.writer is not None:
            self.writer.notify()
