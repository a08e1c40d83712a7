"""Prefill over host offload: one layer's prefix K/V copied to the GPU before its attention.

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

Only SGLang's ragged-plus-paged extend is staged: its paged part is the prefix alone,
which no write of the current chunk touches. Every other extend (no prefix, a paged
part that also holds the chunk, several wrappers, pages of more than one token, a
prefix longer than the buffer, a CUDA-graph capture) reads host memory directly as
before: correct, and counted as ``prefill_direct_extends``.
"""

from __future__ import annotations

import torch

from sglang_pariskv.offload.host_pool import HostKVPool


def staging_bytes(rows: int, num_kv_heads: int, head_dim: int, element_size: int) -> int:
    """GPU bytes of a staging buffer of ``rows`` rows (K and V of one layer) plus its row
    numbers (int32)."""
    return rows * (2 * num_kv_heads * head_dim * element_size + 4)


class PrefillStaging:
    """A GPU buffer holding one layer's prefix K/V of the current extend batch."""

    def __init__(self, host: HostKVPool, rows: int, device: torch.device | str):
        """``rows``: the most prefix tokens one extend batch may stage (the context
        length: a single request's whole prefix)."""
        self.host = host
        self.capacity = rows
        shape = (rows, host.num_kv_heads, host.head_dim)
        self.k = torch.empty(shape, dtype=host.dtype, device=device)
        self.v = torch.empty(shape, dtype=host.dtype, device=device)
        #: the indices FlashInfer is given instead of the slots: row i of the buffers
        self.rows = torch.arange(rows, dtype=torch.int32, device=device)
        #: the slot of each staged row, while a batch is planned; None: nothing staged
        self.slots: torch.Tensor | None = None
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
        self.slots = None
        if slots is None or slots.numel() > self.capacity:
            self.counters["prefill_direct_extends"] += 1
            return None
        n = slots.numel()
        self.slots = slots.clone()
        self.counters["prefill_staged_extends"] += 1
        self.counters["prefill_staged_rows"] += n
        return self.rows[:n]

    def clear(self) -> None:
        """A forward pass with nothing to stage (decode, or an extend without a prefix)."""
        self.slots = None

    def layer_kv(
        self, layer: int, use_kernel: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather the planned rows of pool layer ``layer`` (local index) from host memory
        and return the buffers, shaped as SGLang's ``get_kv_buffer`` returns K and V.

        On the GPU the rows come over UVA in one gather kernel per K and V, on the current
        stream (no host sync); on the CPU torch copies them. ``use_kernel`` forces the
        kernel path (tests run it under Triton's interpreter)."""
        assert self.slots is not None, "layer_kv without a planned batch"
        if use_kernel is None:
            use_kernel = self.k.is_cuda and self.host.pinned
        n = self.slots.numel()
        for part, dst in ((0, self.k), (1, self.v)):
            src = self.host.slot_rows(layer, part)
            rows = dst[:n].view(n, -1)
            if use_kernel:
                from sglang_pariskv.kernels.uva_gather import gather_rows

                gather_rows(src, self.slots, rows)
            else:
                rows.copy_(src[self.slots.to(src.device, torch.int64)])
        return self.k, self.v
