"""What the ParisKV backend allocated on the GPU, measured, against what was planned.

The pool sizing takes ParisKV's planned bytes (``memory_plan``, and the hot cache with
host offload) out of SGLang's KV pool before the backend exists. If the code allocated
more than the plan says, a pool filled to its advertised capacity would eat into the
headroom SGLang keeps for activations and CUDA graphs. So the backend measures its own
allocations with PyTorch's caching allocator and logs them beside the plan each time the
total changes (after construction, after CUDA-graph capture)::

    ParisKV backend memory: 290.4 MiB allocated on the GPU, 290.5 MiB planned (...)

The soak benchmark reads that line and fails when the two differ by more than 2%.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Callable, Iterator

import torch

logger = logging.getLogger("sglang_pariskv")


class AllocationMeter:
    """GPU bytes the backend allocates beyond plain SGLang, by owner, measured by PyTorch's
    caching allocator (bytes of live tensors) around the code that allocates them.

    Windows add their net change: a buffer rebuilt larger counts once, at its new size.
    ``exclude`` inside a window takes out what SGLang's own code in it allocates, which
    plain SGLang would allocate too. Off (nothing counted) where the device is not CUDA,
    unless a ``measure`` callable (bytes allocated now) is given."""

    def __init__(self, device: torch.device, measure: Callable[[], int] | None = None):
        if measure is None and device.type == "cuda":
            measure = lambda: torch.cuda.memory_allocated(device)  # noqa: E731
        self._measure = measure
        self.by_owner: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self._measure is not None

    @property
    def total(self) -> int:
        return sum(self.by_owner.values())

    def track(self, owner: str) -> contextlib.AbstractContextManager:
        """Count what the block allocates (net of what it frees) under ``owner``."""
        return self._window(owner, 1)

    def exclude(self, owner: str) -> contextlib.AbstractContextManager:
        """Inside ``track(owner)``: leave out what the block allocates."""
        return self._window(owner, -1)

    @contextlib.contextmanager
    def _window(self, owner: str, sign: int) -> Iterator[None]:
        if self._measure is None:
            yield
            return
        before = self._measure()
        try:
            yield
        finally:
            delta = self._measure() - before
            self.by_owner[owner] = self.by_owner.get(owner, 0) + sign * delta


def planned_bytes(model_runner, config, pool) -> dict[str, int]:
    """The bytes the pool sizing planned for this rank, by owner (the same function on the
    same server arguments: ``pool_sizing.planned_gpu_bytes``)."""
    from sglang.srt.runtime_context import get_parallel

    from sglang_pariskv.pool_sizing import planned_gpu_bytes

    kvc = types.SimpleNamespace(
        model_config=model_runner.model_config, server_args=model_runner.server_args
    )
    elt = torch.tensor([], dtype=pool.dtype).element_size()
    cell = 2 * pool.head_num * pool.head_dim * pool.layer_num * elt
    tp = get_parallel().attn_tp_size
    return planned_gpu_bytes(config, kvc, pool.layer_num, tp, cell)


class BackendMemory:
    """The backend's meter and plan, and the log line that compares them."""

    def __init__(self, meter: AllocationMeter, planned: dict[str, int]):
        self.meter, self.planned = meter, planned
        self._logged: int | None = None

    @classmethod
    def off(cls) -> BackendMemory:
        """Counts and logs nothing (a backend not built by its constructor, in tests)."""
        return cls(AllocationMeter(torch.device("cpu")), {})

    def track(self, owner: str) -> contextlib.AbstractContextManager:
        return self.meter.track(owner)

    def exclude(self, owner: str) -> contextlib.AbstractContextManager:
        return self.meter.exclude(owner)

    def add_tensors(self, owner: str, *tensors: torch.Tensor | None) -> None:
        """Count tensors allocated before the backend existed (the code pool's calibration)
        by their sizes."""
        if self.meter.enabled:
            n = sum(t.numel() * t.element_size() for t in tensors if t is not None)
            self.meter.by_owner[owner] = self.meter.by_owner.get(owner, 0) + n

    def report(self) -> None:
        """Log allocated against planned if the allocated total changed since the last
        line (a few integer additions per call: the backend calls this every planning)."""
        if not self.meter.enabled:
            return
        total = self.meter.total
        if total == self._logged:
            return
        self._logged = total
        planned = sum(self.planned.values())
        mib = 2**20
        logger.info(
            "ParisKV backend memory: %.1f MiB allocated on the GPU, %.1f MiB planned (%s)",
            total / mib,
            planned / mib,
            "allocated "
            + ", ".join(f"{k} {v / mib:.1f}" for k, v in self.meter.by_owner.items())
            + "; planned "
            + ", ".join(f"{k} {v / mib:.1f}" for k, v in self.planned.items()),
        )
