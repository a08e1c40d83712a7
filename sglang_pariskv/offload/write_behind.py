"""Extend K/V stored to host memory on a copy stream (``--pariskv-prefill-copy side_stream``).

Why: with host offload, SGLang's KV store writes the pinned pool over PCIe from the
forward stream. A prefill chunk of 8K tokens stores 16 MiB per layer at the
Qwen2.5-7B shape (4 KV heads x 128 x bf16, K and V), about 0.6 ms at 25 GB/s, and the
forward stream runs nothing else meanwhile. The rows only have to be in the pool before
they are next read. In a ragged extend (SGLang's FlashInfer default) the chunk attends to
its own K/V from the input tensors and to its prefix from the pool, so the earliest
reader of a layer's new rows is that layer in a later forward. The forward stream hands
the store to a copy stream and goes on with the layer's MLP and the next layers.

Ordering contract (the pool, ``offload.kv_pool``, keeps it):

* :meth:`WriteBehind.write` — the forward stream snapshots the inputs (they may be
  weak references into a prefill CUDA graph's pool, which the next segment may rewrite),
  the copy stream waits for it, scatters the snapshot, and records the layer's event.
* :meth:`WriteBehind.drain` / :meth:`drain_all` — the calling stream waits for a layer's
  (every layer's) pending stores: a device-side wait, no host sync. Each reader drains
  first: SGLang takes the buffers through the pool's getters, moves and CPU copies drain
  all layers, an inline store drains its layer (an older pending copy of the same slots
  must not land after it), and a decode step drains all layers when its metadata is
  initialised, outside any CUDA-graph capture, before the graph replays.
* Without CUDA (tests) there is no stream: stores are queued and applied at drain, so a
  reader that forgot to drain reads the old rows, which is what the tests look for.
"""

from __future__ import annotations

import torch

from sglang_pariskv.offload.host_pool import HostKVPool


class WriteBehind:
    """Deferred stores into ``host``'s layers, drained per layer before any read."""

    def __init__(self, host: HostKVPool, device: torch.device | str):
        self.host = host
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self._events: list[torch.cuda.Event | None] = [None] * host.num_layers
        self._queued: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in self._events]
        #: stores handed to the copy stream (operators' evidence that the mode is on)
        self.stores = 0

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` ``[T, Hkv, D]`` at ``slots`` of ``layer`` behind the caller."""
        if slots.numel() == 0:
            return
        self.stores += 1
        if self.on_cuda:
            self._events[layer] = self.host.write(layer, slots, k, v, stream=self.stream)
        else:
            self._queued[layer].append((slots.clone(), k.clone(), v.clone()))

    def pending(self, layer: int) -> bool:
        """Whether a store of ``layer`` may still be in flight (host-side, no sync)."""
        if self.on_cuda:
            ev = self._events[layer]
            if ev is not None and ev.query():
                self._events[layer] = ev = None
            return ev is not None
        return bool(self._queued[layer])

    def drain(self, layer: int) -> None:
        """Make the current stream wait for ``layer``'s pending stores."""
        if not self.on_cuda:
            for slots, k, v in self._queued[layer]:
                self.host.write(layer, slots, k, v)
            self._queued[layer].clear()
            return
        if torch.cuda.is_current_stream_capturing() or not self.pending(layer):
            # A capture may not wait on (or query) an event recorded outside it; the
            # replay is preceded by drain_all at the step's metadata init instead.
            return
        # The event stays: another stream that reads this layer must wait on it too.
        torch.cuda.current_stream(self.device).wait_event(self._events[layer])

    def drain_all(self) -> None:
        for layer in range(len(self._events)):
            self.drain(layer)

    def synchronize(self) -> None:
        """Host-side wait for every store (teardown, host-side readers)."""
        if self.on_cuda:
            self.stream.synchronize()
        else:
            self.drain_all()
