"""Two decode CUDA graphs per batch size: with the retrieval path, and without it.

A captured decode graph that holds every layer's retrieval kernels costs their launches
at each replay, even when no request of the step is above the dense threshold. So each
batch size is captured twice: the "sparse" graph holds the retrieval path, the "dense" one
does not, and a replay picks the dense graph when no row needs retrieval. As a plugin,
``plugin.py`` hooks SGLang's decode graph runner (its per-variant graph keys, as LoRA
uses them); an SGLang built with ``patches/`` asks the backend for its graph variants
instead (:class:`StepGraphVariants`, SGLang's ``AttentionGraphVariants``) and names the
variant being captured itself.

FlashInfer's backend makes new decode wrappers at every capture and keeps only the last
per batch size, which is what a replay plans; a wrapper owns the int workspace its plan
fills (the plan the captured kernels read). So each (batch size, graph) keeps its own
wrappers here, and a replay plans the replayed graph's. (LoRA, whose adapters add a third
graph key, is refused at startup.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

#: The two decode graphs per batch size.
STEP_GRAPHS: tuple[str, ...] = ("sparse", "dense")


def check_step(step: str) -> str:
    if step not in STEP_GRAPHS:
        raise ValueError(f"unknown decode graph {step!r}: expected one of {STEP_GRAPHS}")
    return step


def host_seq_lens(forward_batch: Any) -> Any:
    """The batch's sequence lengths on the host (``seq_lens_cpu``), copied from the
    device once and kept on the batch when SGLang built it without them: every decision
    of the step (graph variant, plan, counters) must read the same lengths."""
    if forward_batch.seq_lens_cpu is None:
        forward_batch.seq_lens_cpu = forward_batch.seq_lens.cpu()
    return forward_batch.seq_lens_cpu


class StepGraphs:
    """Which graph is being captured, whether both were, and each graph's wrappers."""

    def __init__(self) -> None:
        self._capture_step: str | None = None
        #: Dense-step graphs were captured (the runner hooks took, or SGLang captures the
        #: variants it asked for): replays choose.
        self.captured: bool = False
        self._wrappers: dict[tuple[int, str], Any] = {}
        self._runner_label: Callable[[], str | None] | None = None

    @property
    def capture_step(self) -> str | None:
        """The graph being captured ("sparse" / "dense"; None outside a capture)."""
        if self._capture_step is not None or self._runner_label is None:
            return self._capture_step
        label = self._runner_label()
        return label if label in STEP_GRAPHS else None

    def follow_runner(self, label: Callable[[], str | None]) -> None:
        """SGLang's graph runner captures both graphs and names the one it is capturing
        (``label()``: its capture-time attention variant)."""
        self._runner_label = label
        self.captured = True

    @contextlib.contextmanager
    def capturing(self, step: str) -> Iterator[None]:
        """Capture the ``step`` graph of a batch size."""
        self._capture_step = check_step(step)
        try:
            yield
        finally:
            self._capture_step = None
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


class StepGraphVariants:
    """The two decode graphs as SGLang's ``AttentionGraphVariants`` (an SGLang built with
    ``patches/`` captures each of ``capture_labels`` per batch size and replays the one
    :meth:`select` names)."""

    capture_labels: ClassVar[tuple[str, ...]] = STEP_GRAPHS

    def __init__(self, step_graph: Callable[[Any], str]) -> None:
        self._step_graph = step_graph  #: seq_lens_cpu [bs] -> "sparse" / "dense"

    def select(self, forward_batch: Any) -> str:
        return self._step_graph(host_seq_lens(forward_batch)[: forward_batch.batch_size])
