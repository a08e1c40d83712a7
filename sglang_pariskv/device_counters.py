"""Cumulative device counters read back on the host without a device sync.

Why: some counters (host offload's hot cache) are counted on the GPU, inside the
graph-replayed layer work. Reading them with ``.cpu()`` at every batch would stall the
scheduler on the GPU once per batch, which changes serving's timing (and with it how
requests batch). Instead, each batch's host-side planning enqueues a copy of the
totals into pinned memory behind the work already queued, and a later planning reads it
once its event has completed; a copy still in flight is simply read at a later batch. The
totals are cumulative, so nothing is lost by skipping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class DeviceCounterReader:
    """``poll()`` once per batch: the increments of ``fields`` that became readable since
    the last poll (zeros while a copy is in flight), and ``totals`` so far. ``source()``
    returns the current totals as an int64 tensor of ``len(fields)`` values."""

    def __init__(self, source: Callable[[], torch.Tensor], fields: Sequence[str], on_cuda: bool):
        self.source = source
        self.fields = tuple(fields)
        self.async_copy = on_cuda
        self._host = torch.zeros(len(self.fields), dtype=torch.int64)
        if self.async_copy:
            self._host = self._host.pin_memory()
        self._event: torch.cuda.Event | None = None
        self.totals = dict.fromkeys(self.fields, 0)

    def poll(self) -> dict[str, int]:
        if not self.async_copy:  # CPU: the counters are host memory already
            return self._advance(self.source().tolist())
        delta = dict.fromkeys(self.fields, 0)
        if self._event is not None:
            if not self._event.query():
                return delta  # the last copy is still queued: read it next time
            delta = self._advance(self._host.tolist())
        self._host.copy_(self.source(), non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        return delta

    def _advance(self, now: list[int]) -> dict[str, int]:
        delta = {k: int(v) - self.totals[k] for k, v in zip(self.fields, now)}
        self.totals = {k: int(v) for k, v in zip(self.fields, now)}
        return delta
