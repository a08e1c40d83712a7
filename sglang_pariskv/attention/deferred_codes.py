"""The codes of a decode step, written for every layer at once after its last layer.

A decode step writes one new key per request and layer. Written as it is stored, each
layer's code write is one small kernel launch: with nothing retrieving, these launches
are most of what ParisKV adds to a step of short requests, and on a step that retrieves
each one sits on the layer's path before its retrieval. Nothing reads the new keys'
codes before the step ends: a step without retrieval reads no codes, and a retrieving
request searches only the positions between its sink and its local window, which always
holds the newest token (``--pariskv-local`` >= 1). So the backend stores the K/V alone
(``ParisKVTokenToKVPool.defer_codes``) and, after the last layer, encodes the keys of the
step's slots from every layer's K buffer in one launch (``CodePool.write_layers``). The
codes are those a per-layer write gives, bit for bit (the same kernel body reads the same
stored keys).

Per-layer writes stay where that does not hold: a retrieving step with
``--pariskv-local 0`` (the newest key is in the searched zone) and host offload (its K
buffers are host memory: reading the keys back would cross PCIe).
"""

from __future__ import annotations

import torch

from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.index.kv_pool import ParisKVTokenToKVPool


class DeferredCodes:
    """Decides per step whether code writes wait for the last layer, and writes them."""

    def __init__(
        self,
        pool: ParisKVTokenToKVPool,
        config: ParisKVConfig,
        offloaded: bool,
        layer_ids: list[int] | None = None,
    ):
        """``layer_ids``: the model's attention layers (``RadixAttention.layer_id``); a
        step's deferred writes happen at the pool's last layer, so unless the attention
        layers are exactly the pool's layers nothing is deferred. None: they are."""
        self.pool = pool
        start = getattr(pool, "start_layer", 0) or 0
        every = layer_ids is None or sorted(i - start for i in layer_ids) == list(
            range(pool.layer_num)
        )
        #: whether any step may defer (see the module docstring)
        self.allowed = every and not offloaded
        #: whether a retrieving step may defer: its newest keys are outside the searched zone
        self.retrieving_may_defer = config.local >= 1
        self.last_layer = pool.layer_num - 1
        pool.defer_codes = False
        if self.allowed and pool.pariskv.encoder is None:  # the CUDA path's tables, now
            pool.pariskv.address_tables(pool.k_buffer)  # (not inside a graph capture)

    @property
    def active(self) -> bool:
        """Whether the current step's code writes wait for its last layer."""
        return self.pool.defer_codes

    def plan(self, decode_step: bool, retrieves: bool = False) -> None:
        """Before a forward pass: defer iff it is a decode step whose layers run here
        (eager, or the warm-up and capture runs of a graph) and, if it ``retrieves``, the
        searched zone cannot hold its new keys. The choice holds until the next plan."""
        may = not retrieves or self.retrieving_may_defer
        self.pool.defer_codes = self.allowed and decode_step and may

    def after_layer(self, local_layer: int, out_cache_loc: torch.Tensor) -> None:
        """After a decode layer: at the last one of a deferring step, write the codes of
        every layer's keys at the step's slots."""
        if self.pool.defer_codes and local_layer == self.last_layer:
            self.pool.write_deferred_codes(out_cache_loc)
