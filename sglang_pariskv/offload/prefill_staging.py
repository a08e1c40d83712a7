"""Prefill over host offload: each layer's prefix K/V copied to the GPU before its attention.

With ``--pariskv-offload host`` SGLang's ``k_buffer`` / ``v_buffer`` are CUDA views of
pinned host memory (``offload.kv_pool``). A chunked prefill attends each chunk's queries
over the request's earlier tokens, and FlashInfer's prefill kernel reads those K/V rows
once per query tile: over PCIe, a 64K-token prompt then took minutes to its first token.
So an extend batch whose paged part has a prefix is staged instead: at planning, the
paged wrapper's ``kv_indices`` (the prefix slots, in order) are kept here and the wrapper
is given rows ``0..n-1`` in their place; at each layer the ``n`` rows of K and V are
gathered from host memory into a GPU buffer once, and FlashInfer reads that buffer.
FlashInfer's plan depends on the index pointers only, not on the index values, so the
planned schedule stays valid.

Where the prefix lies in long runs of consecutive slots (one request on a server whose
allocator has not fragmented its free slots), each run is one host-to-device copy on the
copy engines, and the copy of layer ``l + 1`` runs on a side stream while layer ``l``
computes: the buffer holds two layers, layer ``l`` in pair ``l % 2``, so a copy never
overwrites rows an attention still reads, and a layer read in another order than copied
ahead is copied when it is read. Otherwise the UVA gather kernel reads the rows one by
one when the layer is read: a gather beside the attention competes with it for the SMs
and hid little of itself, or slowed the layer (``benchmarks/results/prefill_staging_*``).

Only SGLang's ragged-plus-paged extend is staged: its paged part is the prefix alone,
which no write of the current chunk touches. Every other extend (no prefix, a paged
part that also holds the chunk, several wrappers, pages of more than one token, a
prefix longer than the buffer, a CUDA-graph capture) reads host memory directly as
before: correct, and counted as ``prefill_direct_extends``.
"""

from __future__ import annotations

import contextlib

import torch

from sglang_pariskv.offload.host_pool import HostKVPool

#: K/V buffer pairs: the layer an attention reads, and the next one, copied meanwhile
#: (a prefix in runs).
PAIRS = 2
#: Mean slots per run of consecutive slots from which a plan copies runs (one
#: host-to-device copy per run and part) instead of gathering rows: 256 slots of K or V of
#: one layer are 256 KiB at 4 KV heads of 128 in bf16, enough for a copy to run at the
#: link's rate.
MIN_MEAN_RUN = 256


def slot_runs(
    slots: torch.Tensor, max_runs: int | None = None
) -> list[tuple[int, int, int]] | None:
    """(first slot, first row, length) of each run of consecutive slots of ``slots`` (a
    CPU tensor), in row order; None when there are more than ``max_runs``."""
    s = slots.to(torch.int64)
    if s.numel() == 0:
        return []
    breaks = torch.nonzero(s[1:] != s[:-1] + 1).flatten() + 1
    if max_runs is not None and breaks.numel() + 1 > max_runs:
        return None
    bounds = [0, *breaks.tolist(), s.numel()]
    return [(int(s[a]), a, b - a) for a, b in zip(bounds, bounds[1:])]


def staging_bytes(rows: int, num_kv_heads: int, head_dim: int, element_size: int) -> int:
    """GPU bytes of a staging buffer of ``rows`` rows (K and V of :data:`PAIRS` layers)
    plus its row numbers (int32)."""
    return rows * (PAIRS * 2 * num_kv_heads * head_dim * element_size + 4)


class PrefillStaging:
    """A GPU buffer holding the prefix K/V of the current extend batch, for the layer its
    attention reads and the next."""

    def __init__(self, host: HostKVPool, rows: int, device: torch.device | str):
        """``rows``: the most prefix tokens one extend batch may stage (the context
        length: a single request's whole prefix)."""
        self.host = host
        self.capacity = rows
        device = torch.device(device)
        shape = (rows, host.num_kv_heads, host.head_dim)
        #: (K, V) of layer l in pair l % PAIRS
        self.kv = [
            tuple(torch.empty(shape, dtype=host.dtype, device=device) for _ in range(2))
            for _ in range(PAIRS)
        ]
        #: the indices FlashInfer is given instead of the slots: row i of the buffers
        self.rows = torch.arange(rows, dtype=torch.int32, device=device)
        #: the slot of each staged row, while a batch is planned; None: nothing staged
        self.slots: torch.Tensor | None = None
        #: the planned slots' runs (:func:`slot_runs`) when they are long enough to copy
        #: run by run; None: gather row by row
        self.runs: list[tuple[int, int, int]] | None = None
        #: where the next layer's rows are copied while a layer computes (GPU only)
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        #: (layer, its copy's completion event or None on the CPU) copied ahead
        self._ahead: tuple[int, torch.cuda.Event | None] | None = None
        #: the layer whose rows the buffer last returned, for this plan
        self._held: int | None = None
        self.counters = {"prefill_staged_extends": 0, "prefill_staged_rows": 0,
                         "prefill_direct_extends": 0}  # fmt: skip

    @property
    def active(self) -> bool:
        return self.slots is not None

    def plan(self, slots: torch.Tensor | None) -> torch.Tensor | None:
        """Stage ``slots`` (the prefix slots of the batch's paged part, in FlashInfer's
        order) for the coming forward pass; returns the indices to give FlashInfer in
        their place, or None where nothing is staged: ``slots`` None (an extend that must
        read host memory directly) or more rows than the buffer holds."""
        self.clear()
        if slots is None or slots.numel() > self.capacity:
            self.counters["prefill_direct_extends"] += 1
            return None
        n = slots.numel()
        self.slots = slots.clone()
        # the slots on the host (one sync per staged extend, whose prefill takes far longer)
        self.runs = slot_runs(slots.cpu(), max_runs=n // MIN_MEAN_RUN)
        self.counters["prefill_staged_extends"] += 1
        self.counters["prefill_staged_rows"] += n
        return self.rows[:n]

    def clear(self) -> None:
        """A forward pass with nothing to stage (decode, or an extend without a prefix).
        A copy still running ahead finishes before the forward stream reuses anything."""
        self._settle()
        self.slots = None
        self.runs = None
        self._held = None

    def _settle(self) -> None:
        """The forward stream waits for the copy ahead, if one is running."""
        if self._ahead is not None and self._ahead[1] is not None:
            torch.cuda.current_stream(self._side.device).wait_event(self._ahead[1])
        self._ahead = None

    def layer_kv(
        self, layer: int, use_kernel: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The planned rows of pool layer ``layer`` (local index), shaped as SGLang's
        ``get_kv_buffer`` returns K and V; with runs, the next layer's rows are then
        copied ahead.

        This layer's rows are copied on the current stream unless they were copied ahead,
        the next layer's on the side stream (:meth:`copy_layer`)."""
        assert self.slots is not None, "layer_kv without a planned batch"
        if use_kernel is None:
            use_kernel = self.kv[0][0].is_cuda and self.host.pinned
        pair = self.kv[layer % PAIRS]
        if layer == self._held:
            return pair
        ahead = self._ahead[0] if self._ahead is not None else None
        self._settle()
        if ahead != layer:
            self.copy_layer(layer, pair, use_kernel)
        self._held = layer
        if self.runs is not None and layer + 1 < self.host.num_layers:
            self._copy_ahead(layer + 1, use_kernel)
        return pair

    def _copy_ahead(self, layer: int, use_kernel: bool) -> None:
        """Start copying ``layer``'s rows into its pair, while ``layer - 1`` is read. The
        side stream first waits for the work queued so far: it holds the pair's last
        reader, the attention of ``layer - 2``. Only a plan with runs copies ahead, and its
        copies read the host pool and :attr:`runs`, not the device tensor of slots."""
        done = None
        if self._side is None:
            ctx = contextlib.nullcontext()
        else:
            self._side.wait_stream(torch.cuda.current_stream(self._side.device))
            ctx = torch.cuda.stream(self._side)
        with ctx:
            self.copy_layer(layer, self.kv[layer % PAIRS], use_kernel)
            if self._side is not None:
                done = torch.cuda.Event()
                done.record(self._side)
        self._ahead = (layer, done)

    def copy_layer(self, layer: int, pair: tuple[torch.Tensor, ...], use_kernel: bool) -> None:
        """Pool layer ``layer``'s planned rows into ``pair`` (K, V), on the current stream,
        without a host sync: run by run (host-to-device copies) when the plan has runs,
        else on the GPU one UVA gather kernel per K and V, on the CPU torch's indexing.
        ``use_kernel`` picks the kernel for gathers (tests run it under Triton's
        interpreter)."""
        n = self.slots.numel()
        for part, dst in enumerate(pair):
            src = self.host.slot_rows(layer, part)
            rows = dst[:n].view(n, -1)
            if self.runs is not None:
                for slot, row, length in self.runs:
                    rows[row : row + length].copy_(src[slot : slot + length], non_blocking=True)
            elif use_kernel:
                from sglang_pariskv.kernels.uva_gather import gather_rows

                gather_rows(src, self.slots, rows)
            else:
                rows.copy_(src[self.slots.to(src.device, torch.int64)])
