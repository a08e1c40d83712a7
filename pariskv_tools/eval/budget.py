"""The attended-token budget shared by every method (sink + local + retrieved).

At budget fraction f and context length n, a step attends ``round(f * n)`` tokens. The sink
and local window come first; whatever is left is retrieved from the zone between them. The
default 64-token sink and 256-token window would eat the whole budget on short contexts, so
they are scaled down (keeping their 1:4 ratio) to at most half of the budget: retrieval then
always gets at least half of what is attended, which is what the comparison is about.
The sink and window are fixed per (context, f) from the prompt length, so the zone start does
not move during decoding (the zone end follows the window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_SINK = 64
DEFAULT_LOCAL = 256


@dataclass(frozen=True)
class Budget:
    """Sink/local sizes and the attended fraction of one (context, budget fraction)."""

    fraction: float
    sink: int
    local: int

    def attended(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """Tokens attended per step: round(f * n), at least sink + local, at most n."""
        att = torch.round(seq_lens.to(torch.float64) * self.fraction).to(torch.int64)
        return torch.minimum(att.clamp_min(self.sink + self.local), seq_lens.to(torch.int64))

    def retrieved(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """Zone tokens retrieved per step (attended minus sink and window, capped at the zone)."""
        zone = self.zone_end(seq_lens) - self.sink
        return torch.minimum(self.attended(seq_lens) - self.sink - self.local, zone).clamp_min(0)

    def batch(self, queries: torch.Tensor, seq_lens: torch.Tensor):
        """A :class:`~pariskv_tools.eval.trace.StepBatch` of these steps at this budget."""
        from pariskv_tools.eval.trace import StepBatch

        full = torch.ones_like(seq_lens, dtype=torch.int64)
        return StepBatch(
            queries, seq_lens, full * self.sink, full * self.local, self.retrieved(seq_lens)
        )

    def zone_end(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """First position of the local window per step; the zone is [sink, zone_end)."""
        return (seq_lens.to(torch.int64) - self.local).clamp_min(self.sink)


def budget_for(
    fraction: float, prompt_len: int, sink: int = DEFAULT_SINK, local: int = DEFAULT_LOCAL
) -> Budget:
    """The budget rule: sink/local at their defaults unless they exceed half of
    round(f * prompt_len); then both scale by the same factor (sink rounded, local the rest)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"budget fraction must be in (0, 1], got {fraction}")
    half = round(fraction * prompt_len) // 2
    fixed = sink + local
    if fixed <= half:
        return Budget(fraction, sink, local)
    new_sink = round(sink * half / fixed)
    return Budget(fraction, new_sink, half - new_sink)
