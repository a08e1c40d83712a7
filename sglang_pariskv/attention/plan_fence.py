"""``PlanFence``: a batch's host-side plans start only once the previous batch's plan
copies have run on the GPU.

Why: FlashInfer's ``plan`` (SGLang's decode and prefill wrappers and ParisKV's
head-as-batch ones alike) writes its work schedule into a page-locked host buffer that
belongs to the wrapper, then enqueues an asynchronous copy of that buffer to the device.
The next ``plan`` of the same wrapper rewrites the host buffer at once. SGLang's overlap
scheduler plans batch N+1 on the host while the GPU has only been waited for up to batch
N-1, so batch N's copy may still be queued; a GPU shared with another process, or a long
kernel ahead in the stream, widens that window. The copy then carries batch N+1's schedule
into batch N, whose attention kernels read request and tile indices of another batch past
the ends of the buffers they were planned for: an illegal memory access, after a kernel
that may spin for a long time first.

The fence records one event behind each batch's plans and, before the next batch plans,
waits on the host until it has completed. In the steady state the wait costs nothing:
batch N's copies are queued right behind batch N-1's work, which the scheduler has
already waited for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class PlanFence:
    """``with fence.planning(): ...`` around every host-side planning of a batch."""

    def __init__(self, device: torch.device | str) -> None:
        self.on_cuda = torch.device(device).type == "cuda"
        self._event: torch.cuda.Event | None = None
        #: batches whose planning found the previous batch's copies still queued
        self.waits = 0

    @contextlib.contextmanager
    def planning(self) -> Iterator[None]:
        # A plan made while the stream captures a CUDA graph copies inside the graph, where
        # the replay orders it; querying an event there would break the capture.
        fenced = self.on_cuda and not torch.cuda.is_current_stream_capturing()
        if fenced and self._event is not None and not self._event.query():
            self.waits += 1
            self._event.synchronize()
        yield
        if fenced:
            if self._event is None:
                self._event = torch.cuda.Event()
            self._event.record()
