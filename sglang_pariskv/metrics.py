"""ParisKV's counters for operators, exported the way SGLang exports its own metrics.

With ``--enable-metrics`` SGLang runs prometheus_client in multiprocess mode: metrics made
in the scheduler process (where the attention backend lives) are written to
``PROMETHEUS_MULTIPROC_DIR`` and served by the HTTP server's ``/metrics``. The backend
feeds these counters once per batch from host-side values it already has (no device sync).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BatchCounts:
    """What one batch added to the counters (all host-side integers)."""

    tokens_encoded: int = 0  #: new keys whose codes were written
    prefix_tokens_reused: int = 0  #: extend prefix tokens whose codes were already there
    sparse_requests: int = 0  #: decode rows served by retrieval
    dense_requests: int = 0  #: decode rows served densely (at/below the threshold)
    attended_tokens: int = 0  #: tokens attended by the sparse rows (per KV head)
    context_tokens: int = 0  #: context length of the sparse rows


class ParisKVMetrics:
    """prometheus_client counters ``sglang:pariskv_*`` with SGLang-style labels."""

    def __init__(self, labels: dict[str, str], registry=None):
        from prometheus_client import REGISTRY, Counter, Gauge

        reg = REGISTRY if registry is None else registry
        names = list(labels)
        self.labels = labels

        def counter(name: str, doc: str):
            return Counter(f"sglang:pariskv_{name}", doc, labelnames=names, registry=reg)

        self.tokens_encoded = counter("tokens_encoded", "Keys encoded into ParisKV codes.")
        self.prefix_tokens_reused = counter(
            "prefix_tokens_reused",
            "Extend prefix tokens (radix-cache hits, earlier chunks) whose codes were reused.",
        )
        self.sparse_requests = counter(
            "sparse_request_steps", "Decode steps of requests served by ParisKV retrieval."
        )
        self.dense_requests = counter(
            "dense_request_steps",
            "Decode steps of requests served densely (at or below the dense threshold).",
        )
        self.attended_tokens = counter(
            "attended_tokens", "Tokens attended per KV head by sparse decode rows."
        )
        self.context_tokens = counter(
            "context_tokens", "Context tokens of sparse decode rows (the dense cost avoided)."
        )
        self.attended_fraction = Gauge(
            "sglang:pariskv_attended_fraction",
            "Attended / context tokens of the last sparse decode batch.",
            labelnames=names,
            registry=reg,
            multiprocess_mode="mostrecent",
        )

    def add(self, c: BatchCounts) -> None:
        lab = self.labels
        for metric, value in (
            (self.tokens_encoded, c.tokens_encoded),
            (self.prefix_tokens_reused, c.prefix_tokens_reused),
            (self.sparse_requests, c.sparse_requests),
            (self.dense_requests, c.dense_requests),
            (self.attended_tokens, c.attended_tokens),
            (self.context_tokens, c.context_tokens),
        ):
            if value:
                metric.labels(**lab).inc(value)
        if c.context_tokens:
            self.attended_fraction.labels(**lab).set(c.attended_tokens / c.context_tokens)


_PROCESS_METRICS: ParisKVMetrics | None = None


def process_metrics(labels: dict[str, str]) -> ParisKVMetrics:
    """The process's one ParisKVMetrics (prometheus refuses duplicate metric names)."""
    global _PROCESS_METRICS
    if _PROCESS_METRICS is None:
        _PROCESS_METRICS = ParisKVMetrics(labels)
    return _PROCESS_METRICS
