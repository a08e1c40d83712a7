"""``python -m pariskv_tools.eval calibrate``: the calibration file a server reads with
``--pariskv-calibration`` (format: :mod:`sglang_pariskv.calibration`).

Two measurements on text the model generates itself (a seeded task prompt, then greedy
decoding; the capture is cached like the evaluation's):

* **Key centres**: the mean post-RoPE key per (layer, KV head) over the generated tokens.
  Generated keys are the model's own distribution, not the task's repeated filler; the
  mean is fixed once here, so serving never refits it (codes stay request-independent).
* **Key channel scales**: per (layer, KV head, channel) s = √(σ_k / ρ_q), the spread of
  the centred generated keys over the RMS of the decode queries of the head's group,
  normalised to mean 1 over the channels (:mod:`sglang_pariskv.codec.encode` says why).
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
from sglang_pariskv.calibration import rope_signature, save_calibration

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
    capture_device: str = "cpu"  #: where the model runs while the text is generated


def key_centres(keys: list[torch.Tensor], start: int) -> torch.Tensor:
    """Mean key per (layer, KV head) over positions >= ``start``: [L, Hkv, D], float32."""
    return torch.stack([k[start:].double().mean(0) for k in keys]).to(torch.float32)


#: Bounds of a channel's σ_k / ρ_q ratio relative to the head's mean ratio: a channel that
#: never moves (σ_k = 0) or a query channel that is always 0 must not give a zero or an
#: infinite scale.
_RATIO_CLAMP = 1e-4


def key_scales(
    keys: list[torch.Tensor], queries: list[torch.Tensor], centres: torch.Tensor, start: int
) -> torch.Tensor:
    """Channel scales [L, Hkv, D] (float32, mean 1 per head): √(σ_k / ρ_q) with σ_k the RMS
    of the centred keys at positions >= ``start`` and ρ_q the RMS of the queries
    ``[S, Hq, D]`` of each KV head's group (query heads h·G .. h·G + G - 1)."""
    out = []
    for k, q, m in zip(keys, queries, centres):
        k = k[start:].double() - m.double()
        hkv, d = k.shape[1], k.shape[2]
        q = q.double().reshape(q.shape[0], hkv, -1, d)
        ratio = k.pow(2).mean(0).sqrt() / q.pow(2).mean((0, 2)).sqrt().clamp_min(1e-30)
        mean = ratio.mean(-1, keepdim=True).clamp_min(1e-30)
        ratio = torch.maximum(ratio, _RATIO_CLAMP * mean).minimum(mean / _RATIO_CLAMP)
        s = ratio.sqrt()
        out.append(s / s.mean(-1, keepdim=True))
    return torch.stack(out).to(torch.float32)


def recommend_dense(mass: list[float], dense_below: float, max_dense: int) -> list[int]:
    """Layers whose mass recall is below ``dense_below``, weakest first, at most
    ``max_dense`` of them, returned in layer order."""
    weak = sorted((m, i) for i, m in enumerate(mass) if m < dense_below)
    return sorted(i for _, i in weak[:max_dense])


def layer_mass(
    cap, centres: torch.Tensor, scales: torch.Tensor | None, settings: CalibrateSettings
) -> dict[str, list[float]]:
    """Per-layer mean attention-mass recall of ParisKV (calibrated) and of exact top-k at
    ``settings.fraction``, on every ``step_stride``-th decode step."""
    budget = budget_for(settings.fraction, cap.prompt_len)
    methods = [ParisKV(outputs=("full",), centres=centres, scales=scales), ExactTopK()]
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
    cap = load_or_capture(
        settings.context,
        settings.n_decode,
        settings.seed,
        cache_dir,
        model,
        device=settings.capture_device,
    )
    centres = key_centres(cap.keys, cap.prompt_len)
    queries = [layer_trace(cap, i).queries for i in range(cap.n_layers)]
    scales = key_scales(cap.keys, queries, centres, cap.prompt_len)
    mass = layer_mass(cap, centres, scales, settings)
    max_dense = settings.max_dense
    if max_dense is None:
        max_dense = max(1, cap.n_layers // 8)
    dense = recommend_dense(mass["pariskv"], settings.dense_below, max_dense)
    extra = {
        "model": model.describe(),
        "rope": rope_signature(model.config),
        "command": command,
        "settings": {
            "task": settings.context.task,
            "context_tokens": settings.context.tokens,
            "prompt_len": cap.prompt_len,
            "n_decode": cap.n_decode,
            "seed": settings.seed,
            "centres_from": "generated tokens (positions >= prompt_len)",
            "scales_from": "sqrt(key std / query RMS) per channel: generated keys, decode queries",
            "budget_fraction": settings.fraction,
            "dense_below": settings.dense_below,
            "max_dense": max_dense,
            "decode_step_stride": settings.step_stride,
        },
        "layer_mass_recall": [round(m, 4) for m in mass["pariskv"]],
        "exact_layer_mass_recall": [round(m, 4) for m in mass["exact_topk"]],
    }
    save_calibration(out, centres, dense, scales=scales, **extra)
    print(f"wrote {out}", file=sys.stderr)
    print(summary(out, mass, dense, settings.fraction))
    return {"dense_layers": dense, **extra}


def with_dense(per_layer: list[float], dense: list[int]) -> float:
    """Mean mass recall over layers when ``dense`` layers attend everything (mass 1)."""
    return sum(1.0 if i in dense else m for i, m in enumerate(per_layer)) / len(per_layer)


def summary(out: Path, mass: dict[str, list[float]], dense: list[int], fraction: float) -> str:
    """What the calibration measured and the serving flags it recommends."""
    ours, exact = mass["pariskv"], mass["exact_topk"]
    n = len(ours)
    weakest = sorted(range(n), key=lambda i: ours[i])[:3]
    lines = [
        f"ParisKV (calibrated) attention-mass recall at a {fraction:.0%} budget: mean "
        f"{sum(ours) / n:.3f} over {n} layers (exact top-k {sum(exact) / n:.3f}); weakest "
        + ", ".join(f"layer {i} {ours[i]:.3f}" for i in weakest)
    ]
    flags = f"--enable-pariskv --pariskv-calibration {out}"
    if dense:
        flags += " --pariskv-dense-layers auto"
        lines.append(
            f"dense layers recommended: {','.join(map(str, dense))} (mean mass with them "
            f"dense {with_dense(ours, dense):.3f}; each adds 1/{n} of a dense step's KV read)"
        )
    lines.append(f"serve with: {flags}")
    return "\n".join(lines)


def calibration_capture(settings: dict, model: ModelSource, cache_dir: Path):
    """The (cached) capture of the calibration text a file's ``settings`` record (the
    defaults of :class:`CalibrateSettings` where a field is missing)."""
    d = CalibrateSettings()
    spec = ContextSpec(
        "calib",
        str(settings.get("task", d.context.task)),
        int(settings.get("context_tokens", d.context.tokens)),
    )
    n_decode = int(settings.get("n_decode", d.n_decode))
    return load_or_capture(spec, n_decode, int(settings.get("seed", d.seed)), cache_dir, model)
