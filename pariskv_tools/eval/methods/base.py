"""What a retrieval method is, for the evaluation: a scorer of zone tokens.

A method prepares per-layer state once (its index, built from prefill keys and extended by
generated keys as they arrive) and then, for a batch of decode steps, returns one score per
(step, KV head, key position): higher is retrieved first. Positions outside the retrieval
zone and ties are handled by :func:`pariskv_tools.eval.ranking.rank`, so methods stay small.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from pariskv_tools.eval.trace import LayerTrace, StepBatch


class Method(Protocol):
    """A retrieval method under evaluation.

    ``names`` lists the score tensors :meth:`scores` returns (a family such as ParisKV
    full / stage-1 shares one collision pass). ``zone_dependent`` is true when scores depend
    on the zone (sink/local sizes), so they must be recomputed per budget; others are
    scored once per step and reused for every budget.
    """

    names: tuple[str, ...]
    zone_dependent: bool

    def prepare(self, trace: LayerTrace) -> Any:
        """Build the per-layer index from ``trace`` (only prompt keys where the method fits
        anything; every key is encoded as it would be on arrival)."""
        ...

    def scores(self, state: Any, batch: StepBatch) -> dict[str, torch.Tensor]:
        """Scores [S, Hkv, N] (higher first; integer scores tie-break by earlier position)
        for each name in ``names``. Zone-dependent methods read ``batch.sink/local``."""
        ...
