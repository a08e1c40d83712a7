"""Two decode CUDA graphs per batch size: with the retrieval path, and without it.

A captured decode graph that holds every layer's retrieval kernels costs their launches
at each replay, even when no request of the step is above the dense threshold. So each
batch size is captured twice (``plugin.py`` hooks SGLang's decode graph runner, using its
per-variant graph keys as LoRA does): the "sparse" graph holds the retrieval path, the
"dense" one does not, and a replay picks the dense graph when no row needs retrieval.

FlashInfer's backend makes new decode wrappers at every capture and keeps only the last
per batch size, which is what a replay plans; a wrapper owns the int workspace its plan
fills (the plan the captured kernels read). So each (batch size, graph) keeps its own
wrappers here, and a replay plans the replayed graph's. (LoRA, whose adapters add a third
graph key, is refused at startup.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

#: The two decode graphs per batch size.
STEP_GRAPHS: tuple[str, ...] = ("sparse", "dense")


def check_step(step: str) -> str:
    if step not in STEP_GRAPHS:
        raise ValueError(f"unknown decode graph {step!r}: expected one of {STEP_GRAPHS}")
    return step


class StepGraphs:
    """Which graph is being captured, whether both were, and each graph's wrappers."""

    def __init__(self) -> None:
        #: The graph being captured ("sparse" / "dense"; None outside a capture).
        self.capture_step: str | None = None
        #: Dense-step graphs were captured (the runner hooks took): replays choose.
        self.captured: bool = False
        self._wrappers: dict[tuple[int, str], Any] = {}

    @contextlib.contextmanager
    def capturing(self, step: str) -> Iterator[None]:
        """Capture the ``step`` graph of a batch size."""
        self.capture_step = check_step(step)
        try:
            yield
        finally:
            self.capture_step = None
        if step == "dense":
            self.captured = True

    def graph_of(self, in_capture: bool, replay_graph: str | None) -> str:
        """The graph of this capture or replay. A capture is of the graph the hook named
        (the sparse one when no hook ran, which holds the retrieval path so it serves every
        step). A replay is of ``replay_graph`` when both were captured, else sparse."""
        if in_capture:
            return self.capture_step or "sparse"
        return replay_graph if self.captured else "sparse"

    def keep_wrappers(self, bs: int, wrappers: Any) -> None:
        """At a hooked capture: the wrappers this graph's kernels read their plan from."""
        self._wrappers[(bs, self.capture_step)] = wrappers

    def wrappers(self, bs: int, graph: str) -> Any:
        return self._wrappers[(bs, graph)]
