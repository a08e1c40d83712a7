"""Host offload: the bulk KV in pinned host memory, fetched over UVA.

* :mod:`.host_pool` — :class:`HostKVPool`, slot-keyed K/V of every layer in pinned host
  memory, and :func:`check_host_memory`, the startup check of ``--pariskv-host-pool-gb``.
* :mod:`.hot_cache` — :class:`HotCache`, a direct-mapped GPU cache of recently fetched
  (slot, head) rows whose data buffer is the staging area FlashInfer reads.
* :mod:`.fetch` — :class:`OffloadFetcher`, the per-layer step: the retrieval workspace's
  ``kv_indices`` -> cache lookup -> UVA gather of the misses
  (:mod:`sglang_pariskv.kernels.uva_gather`) -> staging indices for FlashInfer.
* :mod:`.kv_pool` — :class:`HostOffloadKVPool`, the KV pool of ``--pariskv-offload host``:
  SGLang's K/V buffers over the host pool, every write dropping its slots from the cache.
* :mod:`.prefill_staging` — :class:`PrefillStaging`, a GPU copy of a layer's prefix K/V
  that an extend's attention reads instead of host memory (the next layer's is copied
  meanwhile).

``attention.offload_wiring`` builds the cache and the fetcher beside the decode workspace,
and the prefill staging;
docs/architecture.md, "Host offload modules", lists the rest. Only the torch-only modules
are imported here; ``fetch`` pulls in Triton.
"""

from sglang_pariskv.offload.host_pool import HostKVPool, check_host_memory, host_pool_slots
from sglang_pariskv.offload.hot_cache import HotCache

__all__ = ["HostKVPool", "HotCache", "check_host_memory", "host_pool_slots"]
