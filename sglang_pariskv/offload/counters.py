"""The hot cache's device counters (hits, misses, rows fetched), read back on the host
without a device sync (:class:`~sglang_pariskv.device_counters.DeviceCounterReader`)."""

from __future__ import annotations

from sglang_pariskv.device_counters import DeviceCounterReader
from sglang_pariskv.offload.hot_cache import HotCache

FIELDS = ("hits", "misses", "rows_fetched")


class HotCacheCounterReader(DeviceCounterReader):
    """``poll()`` once per batch: the hot-cache counter increments that became readable
    since the last poll, and ``totals`` so far (summed over layers)."""

    def __init__(self, cache: HotCache):
        self.cache = cache
        super().__init__(lambda: cache.counters.sum(0), FIELDS, cache.counters.is_cuda)
