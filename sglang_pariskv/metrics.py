"""ParisKV's counters for operators, exported the way SGLang exports its own metrics.

With ``--enable-metrics`` SGLang runs prometheus_client in multiprocess mode: metrics made
in the scheduler process (where the attention backend lives) are written to
``PROMETHEUS_MULTIPROC_DIR`` and served by the HTTP server's ``/metrics``. The backend
feeds these counters once per batch from host-side values it already has (no device sync;
counting on the host also stays right when the layer work is a replayed CUDA graph).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

#: Help text of each counter ``sglang:pariskv_<field>_total``.
COUNTER_HELP = {
    "tokens_encoded": "Keys encoded into ParisKV codes.",
    "prefix_tokens_reused": "Extend prefix tokens (radix-cache hits, earlier chunks) whose "
    "codes were reused instead of re-encoded.",
    "sparse_request_steps": "Decode steps of requests served by ParisKV retrieval.",
    "dense_request_steps": "Decode steps of requests served densely (at or below the dense "
    "threshold, or in a step below --pariskv-min-sparse-tokens).",
    "attended_tokens": "Tokens attended per KV head by sparse decode rows.",
    "context_tokens": "Context tokens of sparse decode rows (the dense cost avoided).",
}

#: Help text of the host-offload hot-cache counters ``sglang:pariskv_hot_cache_<field>_total``
#: (read back from the GPU without a sync, so they trail the served batches slightly).
HOT_CACHE_HELP = {
    "hits": "Retrieved (slot, KV head) rows served from the GPU hot cache (host offload).",
    "misses": "Retrieved rows not in the hot cache, read from host memory (host offload).",
    "rows_fetched": "Rows copied from host memory into the hot cache (host offload).",
}

#: Help text of host offload's prefill staging counters ``sglang:pariskv_<field>_total``.
PREFILL_STAGING_HELP = {
    "prefill_staged_extends": "Extend batches whose prefix K/V was staged on the GPU "
    "(host offload).",
    "prefill_staged_rows": "Prefix tokens staged on the GPU for extend attention (host offload).",
    "prefill_direct_extends": "Extend batches with a prefix that read it from host memory "
    "directly (host offload: not stageable, or longer than the staging buffer).",
}


@dataclass
class BatchCounts:
    """What one batch adds to the counters (host-side integers); also used as totals."""

    tokens_encoded: int = 0  #: new keys whose codes were written
    prefix_tokens_reused: int = 0  #: extend prefix tokens whose codes were already there
    sparse_request_steps: int = 0  #: decode rows served by retrieval
    dense_request_steps: int = 0  #: decode rows served densely (short, or a dense step)
    attended_tokens: int = 0  #: tokens attended by the sparse rows (per KV head)
    context_tokens: int = 0  #: context length of the sparse rows

    def accumulate(self, other: BatchCounts) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class ParisKVMetrics:
    """prometheus_client counters ``sglang:pariskv_*`` with SGLang-style labels."""

    def __init__(self, labels: dict[str, str], registry=None):
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = REGISTRY if registry is None else registry
        self.labels = labels
        self.counters = {
            name: Counter(f"sglang:pariskv_{name}", doc, labelnames=list(labels), registry=reg)
            for name, doc in COUNTER_HELP.items()
        }
        self.hot_cache = {
            name: Counter(
                f"sglang:pariskv_hot_cache_{name}", doc, labelnames=list(labels), registry=reg
            )
            for name, doc in HOT_CACHE_HELP.items()
        }
        self.prefill_staging = {
            name: Counter(f"sglang:pariskv_{name}", doc, labelnames=list(labels), registry=reg)
            for name, doc in PREFILL_STAGING_HELP.items()
        }
        self.attended_fraction = Gauge(
            "sglang:pariskv_attended_fraction",
            "Attended / context tokens of the last sparse decode batch.",
            labelnames=list(labels),
            registry=reg,
            multiprocess_mode="mostrecent",
        )
        self.retrieval_seconds = Histogram(
            "sglang:pariskv_retrieval_seconds",
            "GPU time of ParisKV retrieval per decode step, summed over layers "
            "(GPU time from timing events, read back without a sync).",
            labelnames=list(labels),
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1),
            registry=reg,
        )

    def observe_retrieval(self, seconds: float) -> None:
        """One decode step's retrieval GPU time, summed over layers."""
        self.retrieval_seconds.labels(**self.labels).observe(seconds)

    def add_hot_cache(self, delta: dict[str, int]) -> None:
        """Increments of the hot-cache counters (``offload.counters``)."""
        self._increment(self.hot_cache, delta)

    def add_prefill_staging(self, delta: dict[str, int]) -> None:
        """Increments of the prefill staging counters (``offload.prefill_staging``)."""
        self._increment(self.prefill_staging, delta)

    def _increment(self, counters: dict, delta: dict[str, int]) -> None:
        for name, counter in counters.items():
            if delta.get(name, 0) > 0:
                counter.labels(**self.labels).inc(delta[name])

    def add(self, c: BatchCounts) -> None:
        for name, counter in self.counters.items():
            value = getattr(c, name)
            if value:
                counter.labels(**self.labels).inc(value)
        if c.context_tokens:
            self.attended_fraction.labels(**self.labels).set(c.attended_tokens / c.context_tokens)


_PROCESS_METRICS: ParisKVMetrics | None = None


def process_metrics(labels: dict[str, str]) -> ParisKVMetrics:
    """The process's one ParisKVMetrics (prometheus refuses duplicate metric names)."""
    global _PROCESS_METRICS
    if _PROCESS_METRICS is None:
        _PROCESS_METRICS = ParisKVMetrics(labels)
    return _PROCESS_METRICS
