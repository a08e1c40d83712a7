"""A GPU cache of recently fetched (slot, head) KV rows, usable inside a CUDA graph.

Why a cache: consecutive decode steps attend to nearly the same rows. The sink and the
local window move by one token per step, and the top-k of a KV head changes slowly as
the query drifts. A row fetched over PCIe at step t is usually needed again at t+1.

Design: direct-mapped, per layer. Row ``x = slot·Hkv + head`` (the "head as batch" index)
lives only in line ``x mod C`` of its layer; ``tags[layer, line]`` holds the row id there
(-1: empty). Every step is fixed-shape device work (no Python dict, no ``.item()``, no
data-dependent shapes): that is what makes it capturable in a CUDA graph and replayable
after every re-plan. The lookup, gather and insert of a layer run as the fused Triton
fetch (:mod:`kernels.hot_cache_fetch`, called by :class:`offload.fetch.OffloadFetcher`);
this class holds the state and the invalidation. A set-associative design with LRU needs
a per-step sort to rank misses within a set; it may be worth it only if the measured
conflict misses matter.

The data buffer *is* the staging area FlashInfer reads: ``data`` is
``[L·C + E, 2·D]`` (viewed as FlashInfer's ``[pages, 2, 1, 1, D]`` paged layout), with layer
l's lines at ``[l·C, (l+1)·C)`` and, after them, an overflow region of one row per
``kv_indices`` entry that every layer reuses. Rules of one lookup (one layer, one step):

* hit: ``tags[line] == x``, served from the line;
* a line hit by any entry this step is protected: evicting it would corrupt that entry;
* among the misses mapping to an unprotected line, the largest row id wins the line: it
  is fetched there once, and every entry of that row id uses the line;
* every other miss is fetched into its own overflow row ``L·C + i``.

Expected hit rate: with n distinct rows re-selected every step, each line that at least
one of them maps to keeps one of them, so the steady-state hit rate is
``C·(1 - exp(-n/C)) / n`` (0.94 at C = 8n, 0.89 at C = 4n), times the fraction of rows
re-selected from the previous step. Invalidation: a slot rewritten with new KV must drop
its rows (:meth:`invalidate`), or a later hit would return the old row.
"""

from __future__ import annotations

import torch


class HotCache:
    """Direct-mapped per-layer cache of ``row_width``-element rows, ``lines`` per layer."""

    def __init__(
        self,
        num_layers: int,
        lines: int,
        num_kv_heads: int,
        row_width: int,
        max_entries: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        """``max_entries``: the most ``kv_indices`` entries of one step (the workspace's
        ``kv_indices`` capacity), the size of the overflow region."""
        if num_layers * lines + max_entries >= 2**31:
            raise ValueError("staging rows must fit FlashInfer's int32 indices")
        self.num_layers, self.lines, self.hkv = num_layers, lines, num_kv_heads
        self.row_width, self.max_entries = row_width, max_entries
        dev = torch.device(device)
        self.tags = torch.full((num_layers, lines), -1, dtype=torch.int64, device=dev)
        self.data = torch.zeros(
            num_layers * lines + max_entries, row_width, dtype=dtype, device=dev
        )
        #: per layer: entries served from the cache, entries missed, rows fetched
        self.counters = torch.zeros(num_layers, 3, dtype=torch.int64, device=dev)
        self._heads = torch.arange(num_kv_heads, device=dev)

    @staticmethod
    def planned_nbytes(
        num_layers: int, lines: int, row_width: int, element_size: int, max_entries: int
    ) -> int:
        """GPU bytes of a cache built with these sizes (lines with their tags, plus the
        overflow rows of one step's entries), before it exists: what capacity planning
        sets aside (``pool_sizing.reserve_planned_memory``), since the cache is allocated after
        SGLang has sized its pools."""
        return num_layers * lines * (row_width * element_size + 8) + (
            max_entries * row_width * element_size
        )

    @property
    def overflow_base(self) -> int:
        return self.num_layers * self.lines

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.tags, self.data, self.counters))

    def invalidate(self, slots: torch.Tensor, layer: int | None = None) -> None:
        """Drop every head's row of ``slots`` (of ``layer``, or of all layers): their KV
        was rewritten. Fixed shapes, no sync: safe in the decode graph's write path."""
        rows = (slots.to(torch.int64)[:, None] * self.hkv + self._heads).reshape(-1)
        line = rows % self.lines
        tags = self.tags if layer is None else self.tags[layer : layer + 1]
        stale = (tags.gather(1, line.expand(tags.shape[0], -1)) == rows).to(torch.int64)
        kill = torch.zeros_like(tags)
        kill.scatter_reduce_(1, line.expand(tags.shape[0], -1), stale, "amax")
        tags.masked_fill_(kill.bool(), -1)

    def reset(self) -> None:
        """Forget every row, so that a measurement starts from an empty cache (the
        offload benchmark). Serving does not call it: every writer of a slot drops that
        slot's rows (:meth:`invalidate`), so a cached row always holds its slot's KV."""
        self.tags.fill_(-1)

    def stats(self) -> dict[str, float]:
        """Totals of the device counters over all layers, read with a device sync (the
        offload benchmark's summary; serving reads them without a sync through
        :mod:`offload.counters`)."""
        hits, misses, fetched = (int(x) for x in self.counters.sum(0).cpu())
        return {
            "hits": hits,
            "misses": misses,
            "rows_fetched": fetched,
            "hit_rate": hits / max(hits + misses, 1),
        }
