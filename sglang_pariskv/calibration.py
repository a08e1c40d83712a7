"""The calibration file: fixed key centres and channel scales per (layer, KV head) and a
per-layer dense recommendation, written by ``python -m pariskv_tools.eval calibrate`` and
read at startup (``--pariskv-calibration FILE``).

Why a file and not a running estimate: a code must not depend on which request wrote its
slot (the radix cache shares slots between requests) nor change as generation goes on, so
a layer's key statistics are measured once, offline, on generated text, and then fixed.
Why centring and scaling help: see :mod:`sglang_pariskv.codec.encode`.

Format (JSON, so it can be read and checked by hand)::

    {"format": "pariskv-calibration", "version": 1,
     "num_layers": L, "num_kv_heads": H, "head_dim": D,
     "key_centres": [L][H][D] floats,
     "key_scales": [L][H][D] positive floats,  # optional: 1 when absent
     "dense_layers": [layer, ...],            # what --pariskv-dense-layers auto uses
     "layer_mass_recall": [L] floats,         # measured, for the record (optional)
     "rope": {"rope_theta": ..., ...},        # the model's RoPE (optional; checked if present)
     "model": {...}, "settings": {...}}       # provenance (optional)

Why the RoPE is recorded: the centres are means of post-RoPE keys, so a calibration of the
same weights under another RoPE (another base or scaling) centres every key wrongly.

Every problem is a :class:`ParisKVConfigError` naming ``--pariskv-calibration`` and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from sglang_pariskv.config import ParisKVConfigError

FORMAT = "pariskv-calibration"
VERSION = 1
_FLAG = "--pariskv-calibration"
_REDO = "write it with `python -m pariskv_tools.eval calibrate --model PATH --out FILE`"


@dataclass(frozen=True)
class Calibration:
    """A loaded, shape-checked calibration file."""

    path: str
    centres: torch.Tensor  #: float32 [L, H, D]: key centre per (layer, KV head)
    scales: torch.Tensor | None  #: float32 [L, H, D]: key channel scales, or None (all 1)
    dense_layers: tuple[int, ...]  #: recommended dense layers (sorted, in range)
    extra: dict[str, Any] = field(default_factory=dict)  #: the rest of the file

    @property
    def num_layers(self) -> int:
        return self.centres.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.centres.shape[1]

    @property
    def head_dim(self) -> int:
        return self.centres.shape[2]

    def check_model(self, num_layers: int, head_dim: int, model_name: str = "this model") -> None:
        """Refuse a file written for another model shape (layers, head_dim)."""
        if (num_layers, head_dim) != (self.num_layers, self.head_dim):
            raise ParisKVConfigError(
                f"{_FLAG} {self.path} was written for {self.num_layers} layers x head_dim "
                f"{self.head_dim}, but {model_name} has {num_layers} layers x head_dim "
                f"{head_dim}: calibrate this model ({_REDO})"
            )

    def check_rope(self, rope: dict[str, Any] | None, model_name: str = "this model") -> None:
        """Refuse a file measured under another RoPE than the model's (:func:`rope_signature`);
        nothing to compare when either side does not say."""
        mine = self.extra.get("rope")
        if rope is None or not isinstance(mine, dict) or mine == rope:
            return
        raise ParisKVConfigError(
            f"{_FLAG} {self.path} was measured with RoPE {mine}, but {model_name} uses "
            f"{rope}: its key centres do not fit these keys; calibrate this model as it is "
            f"served ({_REDO})"
        )

    def for_rank(
        self, tp_rank: int, tp_size: int, heads_per_rank: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(centres, scales) of the KV heads a tensor-parallel rank holds, each
        [L, heads_per_rank, D] (scales None when the file has none).

        SGLang gives rank r the heads [r·n, (r+1)·n) when the model has at least as many
        KV heads as ranks, else the one head r // (tp_size / H) (heads replicated)."""
        total = self.num_kv_heads
        if total >= tp_size:
            per, first = total // tp_size, tp_rank * (total // tp_size)
            ok = total % tp_size == 0
        else:
            per, first = 1, tp_rank // (tp_size // total)
            ok = tp_size % total == 0
        if not ok or per != heads_per_rank:
            raise ParisKVConfigError(
                f"{_FLAG} {self.path} has {total} KV heads, but this model holds "
                f"{heads_per_rank} KV heads on each of {tp_size} tensor-parallel ranks: "
                f"calibrate this model ({_REDO})"
            )
        centres = self.centres[:, first : first + per].contiguous()
        scales = None if self.scales is None else self.scales[:, first : first + per].contiguous()
        return centres, scales


def rope_signature(config: Any) -> dict[str, Any] | None:
    """A model's RoPE as the calibration file records it: the base ``rope_theta``, the
    scaling type and its ``factor``, from a transformers config object or a
    ``config.json`` dict, in either spelling (``rope_parameters``, or ``rope_theta`` +
    ``rope_scaling``). None when the config names no RoPE base. Only these three: other
    scaling fields are spelled differently across transformers versions, and a base or
    factor change is what moves the keys."""

    def get(key: str) -> Any:
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    params = dict(get("rope_scaling") or {})
    params.update(get("rope_parameters") or {})
    theta = params.get("rope_theta") or get("rope_theta")
    if theta is None:
        return None
    kind = str(params.get("rope_type") or params.get("type") or "default")
    sig: dict[str, Any] = {"rope_theta": float(theta), "rope_type": kind}
    if kind != "default" and isinstance(params.get("factor"), (int, float)):
        sig["factor"] = float(params["factor"])
    return sig


def _error(path: str, what: str) -> ParisKVConfigError:
    return ParisKVConfigError(f"{_FLAG} {path}: {what}; {_REDO}")


def _table(path: str, data: dict, key: str, dims: list[int]) -> torch.Tensor:
    """``data[key]`` as a float64 tensor of shape ``dims`` ([layers][kv_heads][head_dim])."""
    try:
        t = torch.tensor(data.get(key), dtype=torch.float64)
    except (TypeError, ValueError):
        what = f"{key} must be a [layers][kv_heads][head_dim] list of numbers"
        raise _error(path, what) from None
    if tuple(t.shape) != tuple(dims):
        raise _error(path, f"{key} has shape {tuple(t.shape)}, the header says {tuple(dims)}")
    return t


def _parse(path: str, data: Any) -> Calibration:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _error(path, f'not a ParisKV calibration file (no "format": "{FORMAT}")')
    if data.get("version") != VERSION:
        raise _error(path, f"format version {data.get('version')!r}, this plugin reads {VERSION}")
    dims = [data.get(k) for k in ("num_layers", "num_kv_heads", "head_dim")]
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in dims):
        raise _error(path, "num_layers, num_kv_heads and head_dim must be positive integers")
    centres = _table(path, data, "key_centres", dims)
    if not bool(torch.isfinite(centres).all()):
        raise _error(path, "key_centres holds a NaN or infinite value")
    scales = None
    if data.get("key_scales") is not None:
        scales = _table(path, data, "key_scales", dims)
        if not bool((torch.isfinite(scales) & (scales > 0)).all()):
            raise _error(path, "key_scales must be finite and positive")
        scales = scales.to(torch.float32)
    dense = data.get("dense_layers", [])
    if not isinstance(dense, list) or any(
        not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < dims[0] for x in dense
    ):
        raise _error(path, f"dense_layers must be a list of layer indices in [0, {dims[0]})")
    extra = {
        k: v for k, v in data.items() if k not in ("key_centres", "key_scales", "dense_layers")
    }
    return Calibration(path, centres.to(torch.float32), scales, tuple(sorted(set(dense))), extra)


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> Calibration:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise _error(path, f"not valid JSON ({e})") from e
    return _parse(path, data)


def load_calibration(path: str | Path) -> Calibration:
    """Read and check a calibration file (cached per path and modification time: the
    launcher, the KV pool and the backend each ask for it)."""
    p = Path(path)
    try:
        mtime = p.stat().st_mtime_ns
    except OSError:
        raise ParisKVConfigError(f"{_FLAG} {path}: no such file; {_REDO}") from None
    return _load_cached(str(p), mtime)


def save_calibration(
    path: str | Path,
    centres: torch.Tensor,
    dense_layers: list[int],
    scales: torch.Tensor | None = None,
    **extra: Any,
) -> None:
    """Write ``centres`` and ``scales`` [L, H, D] (scales None: all 1) and the dense-layer
    recommendation (plus any JSON-able provenance in ``extra``) in the format
    :func:`load_calibration` reads."""
    c = centres.to(torch.float64)
    if c.dim() != 3 or not bool(torch.isfinite(c).all()):
        raise ValueError(
            f"centres must be a finite [layers, kv_heads, head_dim] tensor, got {tuple(c.shape)}"
        )
    if scales is not None and (
        scales.shape != c.shape or not bool((torch.isfinite(scales) & (scales > 0)).all())
    ):
        raise ValueError(f"scales must be a finite positive tensor of shape {tuple(c.shape)}")
    data = {
        "format": FORMAT,
        "version": VERSION,
        "num_layers": c.shape[0],
        "num_kv_heads": c.shape[1],
        "head_dim": c.shape[2],
        "dense_layers": sorted(int(x) for x in dense_layers),
        **extra,
        "key_centres": _nested(c),
    }
    if scales is not None:
        data["key_scales"] = _nested(scales.to(torch.float64))
    text = json.dumps(data, allow_nan=False)  # a NaN anywhere fails here, not at startup
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def _nested(x: torch.Tensor) -> list:
    """[L, H, D] as nested lists of 6-digit floats (the file stays readable)."""
    return [[[float(f"{v:.6g}") for v in h] for h in layer] for layer in x.tolist()]
