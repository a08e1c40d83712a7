"""``python -m pariskv_tools.eval calibrate``: the calibration file a server reads with
``--pariskv-calibration`` (format: :mod:`sglang_pariskv.calibration`).

Two measurements on text the model generates itself (a seeded task prompt, then greedy
decoding; the capture is cached like the evaluation's):

* **Key centres**: the mean post-RoPE key per (layer, KV head) over the generated tokens.
  Generated keys are the model's own distribution, not the task's repeated filler; the
  mean is fixed once here, so serving never refits it (codes stay request-independent).
* **Dense-layer recommendation**: per layer, the attention-mass recall of ParisKV (with
  those centres) at the given budget on the same decode steps; layers below
  ``dense_below`` are recommended dense (at most ``max_dense``, weakest first), which is
  what ``--pariskv-dense-layers auto`` serves.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pariskv_tools.eval.budget import budget_for
from pariskv_tools.eval.captures import ContextSpec, layer_trace, load_or_capture
from pariskv_tools.eval.layer_eval import evaluate_layer
from pariskv_tools.eval.methods import ExactTopK, ParisKV
from sglang_pariskv.calibration import save_calibration

if TYPE_CHECKING:
    from pariskv_tools.workloads.models import ModelSource


@dataclass(frozen=True)
class CalibrateSettings:
    context: ContextSpec = ContextSpec("calib", "passkey", 2048)
    n_decode: int = 512
    seed: int = 1234  #: not the evaluation's seed: calibration text differs from eval text
    fraction: float = 0.10
    dense_below: float = 0.90
    max_dense: int | None = None  #: None: an eighth of the layers (at least one)
    step_stride: int = 4


def key_centres(keys: list[torch.Tensor], start: int) -> torch.Tensor:
    """Mean key per (layer, KV head) over positions >= ``start``: [L, Hkv, D], float32."""
    return torch.stack([k[start:].double().mean(0) for k in keys]).to(torch.float32)


def recommend_dense(mass: list[float], dense_below: float, max_dense: int) -> list[int]:
    """Layers whose mass recall is below ``dense_below``, weakest first, at most
    ``max_dense`` of them, returned in layer order."""
    weak = sorted((m, i) for i, m in enumerate(mass) if m < dense_below)
    return sorted(i for _, i in weak[:max_dense])


def layer_mass(cap, centres: torch.Tensor, settings: CalibrateSettings) -> dict[str, list[float]]:
    """Per-layer mean attention-mass recall of ParisKV (centred) and of exact top-k at
    ``settings.fraction``, on every ``step_stride``-th decode step."""
    budget = budget_for(settings.fraction, cap.prompt_len)
    methods = [ParisKV(outputs=("full",), centres=centres), ExactTopK()]
    out: dict[str, list[float]] = {"pariskv": [], "exact_topk": []}
    for layer in range(cap.n_layers):
        full = layer_trace(cap, layer)
        steps = torch.arange(0, full.queries.shape[0], settings.step_stride)
        full.queries, full.seq_lens = full.queries[steps], full.seq_lens[steps]
        res = evaluate_layer(full, methods, budget)
        for name in out:
            out[name].append(float(res.metrics[name]["mass_recall"].mean()))
        print(
            f"[calibrate] layer {layer}: mass recall pariskv {out['pariskv'][-1]:.3f}, "
            f"exact {out['exact_topk'][-1]:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return out


def run_calibrate(
    model: ModelSource, out: Path, cache_dir: Path, settings: CalibrateSettings, command: str
) -> dict:
    """Capture (or reload) the calibration text, measure, and write ``out``."""
    cap = load_or_capture(settings.context, settings.n_decode, settings.seed, cache_dir, model)
    centres = key_centres(cap.keys, cap.prompt_len)
    mass = layer_mass(cap, centres, settings)
    max_dense = settings.max_dense
    if max_dense is None:
        max_dense = max(1, cap.n_layers // 8)
    dense = recommend_dense(mass["pariskv"], settings.dense_below, max_dense)
    extra = {
        "model": model.describe(),
        "command": command,
        "settings": {
            "task": settings.context.task,
            "prompt_len": cap.prompt_len,
            "n_decode": cap.n_decode,
            "seed": settings.seed,
            "centres_from": "generated tokens (positions >= prompt_len)",
            "budget_fraction": settings.fraction,
            "dense_below": settings.dense_below,
            "max_dense": max_dense,
            "decode_step_stride": settings.step_stride,
        },
        "layer_mass_recall": [round(m, 4) for m in mass["pariskv"]],
        "exact_layer_mass_recall": [round(m, 4) for m in mass["exact_topk"]],
    }
    save_calibration(out, centres, dense, **extra)
    print(f"wrote {out}: dense layers recommended {dense}", file=sys.stderr)
    return {"dense_layers": dense, **extra}
