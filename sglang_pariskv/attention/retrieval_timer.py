"""GPU time of ParisKV retrieval per decode step, for operators, without a host sync.

Each layer's retrieval (``DecodeWorkspace.run``) is bracketed by a pair of timing events.
Under CUDA graphs the events are recorded as graph nodes (``external=True``), so every
replay re-records them; each captured batch size owns its own pairs, and eager steps
share one set. The host reads a step's events at the next step's planning, only if they
have completed (``query()``), so serving never waits on them; a step still in flight is
skipped, not waited for.

On when SGLang's ``--enable-metrics`` (it feeds ``sglang:pariskv_retrieval_seconds``) or
``--pariskv-stats-dir`` is given. Under CUDA graphs on an H100 the SmolLM2 passkey answers
were identical with it on, and it read back the retrieval time of 38 of 80 decode steps
(the others were still in flight at the next planning, and are skipped, not waited for).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _cuda_event() -> Any:
    import torch

    return torch.cuda.Event(enable_timing=True, external=True)


class RetrievalTimer:
    """Per-layer start/stop events, grouped by CUDA-graph batch size (or "eager").

    Arm it only for steps that run the sparse path: those with a request above the
    threshold (the backend's ``step_is_sparse``), eager or replaying the sparse-step
    graph (the dense-step graph records no events).
    Layers that never record (e.g. cross-attention) are left out of the sum."""

    def __init__(self, num_layers: int, make_event: Callable[[], Any] = _cuda_event):
        self.num_layers = num_layers
        self._make_event = make_event
        self._events: dict[Any, list[tuple[Any, Any]]] = {}
        self._layers: dict[Any, set[int]] = {}  #: layers ever recorded, per key
        self._key: Any = None
        self._pending: Any = None

    def begin_step(self, key: Any) -> float | None:
        """Host, before a sparse step's layers run: returns the previous armed step's
        retrieval time in seconds (None if still running), then arms ``key``'s events."""
        last = self.poll()
        if key not in self._events:
            self._events[key] = [
                (self._make_event(), self._make_event()) for _ in range(self.num_layers)
            ]
            self._layers[key] = set()
        self._key = self._pending = key
        return last

    def disarm(self) -> float | None:
        """Host, before a step without the sparse path (its layers record nothing):
        returns the previous armed step's retrieval time, like :meth:`begin_step`."""
        self._key = None
        return self.poll()

    def start(self, layer: int) -> None:
        if self._key is not None:
            self._events[self._key][layer][0].record()

    def stop(self, layer: int) -> None:
        if self._key is not None:
            self._events[self._key][layer][1].record()
            self._layers[self._key].add(layer)

    def poll(self) -> float | None:
        key, self._pending = self._pending, None
        if key is None or not self._layers.get(key):
            return None
        pairs = [self._events[key][i] for i in sorted(self._layers[key])]
        if not all(stop.query() for _, stop in pairs):
            return None
        return sum(start.elapsed_time(stop) for start, stop in pairs) / 1000.0
