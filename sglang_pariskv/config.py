"""One validated dataclass for every ParisKV knob.

Every value that reaches the retrieval pipeline passes through :class:`ParisKVConfig`, so
a bad flag or JSON key fails at startup with a message that names the knob, the value,
the allowed range and the command-line flag that sets it, instead of failing mid-serving.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Where the K/V of every token lives: "none" (SGLang's GPU pool) or "host" (pinned
#: host memory read over UVA).
OFFLOAD_MODES: tuple[str, ...] = ("none", "host")

#: How the collision stage's candidates are ranked: "code" (the 3-bit estimate from the
#: code records beside the KV pool) or "keys" (the exact group-mean q·k of the bf16/fp16
#: keys in SGLang's KV pool; the GPU then stores only the sign signatures).
RERANK_MODES: tuple[str, ...] = ("code", "keys")

#: Hot-cache lines per layer when host offload does not name a count: 65536 rows of
#: (slot, KV head) per layer, 0.9 GiB at the Qwen2.5-7B shape (28 layers, K+V of D 128),
#: the size bench_offload measured (hit rate 0.76 at 1M tokens, batch 1).
DEFAULT_HOT_CACHE_LINES: int = 65536

#: Default of ``--pariskv-min-sparse-tokens`` on the GPU pool: the context tokens a decode
#: step's long requests must hold together before it retrieves. Below it dense attention
#: is faster: ParisKV ran at 0.80x dense at 16K tokens per step, 0.88x at 32K, 0.97-1.03x
#: at 64K and 1.28x at 128K (H100, Llama-3.1-8B shape, docs/results.md, "Where retrieval
#: starts paying"), so the default sits at the low end of the 64-72K crossover. With host
#: offload a dense step would read the K/V over PCIe, so there the default is 0.
DEFAULT_MIN_SPARSE_TOKENS: int = 65536


class ParisKVConfigError(ValueError):
    """A ParisKV setting, or a combination with the model or SGLang's flags, that cannot be
    served. The message names the flag (or model property) and the fix; the launcher
    prints it as one line, before any model work."""


def _flag(name: str) -> str:
    return "--pariskv-" + name.replace("_", "-")


@dataclass(frozen=True)
class ParisKVConfig:
    """Knobs of ParisKV sparse decoding.

    The attended set of a long request is ``sink`` first tokens, ``local`` last tokens and
    the ``topk`` best retrieved tokens of the zone between them. Requests of at most
    ``dense_threshold`` tokens attend densely. ``candidate_ratio`` ``None`` means
    "adaptive by retrieval-zone length" (see :func:`adaptive_candidate_ratio`).
    """

    topk: int = 2048
    sink: int = 64
    local: int = 256
    dense_threshold: int = 8192
    #: A decode step retrieves only if its requests above ``dense_threshold`` hold at least
    #: this many context tokens together; otherwise the whole step attends densely (exact,
    #: and faster while their K/V read costs less than retrieval's per-layer work). 0: off,
    #: every request above the threshold retrieves. ``None`` (the default):
    #: :data:`DEFAULT_MIN_SPARSE_TOKENS` on the GPU pool, 0 with host offload.
    min_sparse_tokens: int | None = None
    candidate_ratio: float | None = None
    rotation_seed: int = 0
    #: "host": K/V live in pinned host memory, the GPU keeps codes + a hot cache.
    offload: str = "none"
    #: GiB of pinned host memory for the K/V pool (per TP rank) with ``offload="host"``.
    host_pool_gb: float = 0.0
    #: Hot-cache lines per layer with ``offload="host"``; 0 = none (FlashInfer then
    #: reads the retrieved rows from host memory directly). ``None`` (the default):
    #: :data:`DEFAULT_HOT_CACHE_LINES` with host offload, 0 without. On by default with
    #: offload: 18.3 vs 26.0 ms per token at 1M (H100, benchmarks/results/offload*.json),
    #: and one request at a time its serving answers equal the GPU pool's.
    hot_cache_lines: int | None = None
    #: A folder where every scheduler process rewrites its counters as JSON after each
    #: batch (``pariskv-tp<rank>-<pid>.json``): the interface for scripts and benchmarks
    #: that run no Prometheus scraper. None: no files.
    stats_dir: str | None = None
    #: A calibration file (``python -m pariskv_tools.eval calibrate``): fixed key centres
    #: and channel scales per (layer, KV head), which every key is encoded relative to
    #: (queries are scaled alike), and the per-layer dense recommendation
    #: ``dense_layers="auto"`` reads. None: keys are encoded as they are.
    calibration: str | None = None
    #: Layers that attend densely over the whole context at every decode step (their
    #: codes are still written): a tuple of layer indices, or "auto" for the calibration
    #: file's recommendation. Empty: every layer retrieves.
    dense_layers: tuple[int, ...] | str = ()
    #: How candidates are ranked (:data:`RERANK_MODES`). "keys" reads 256 B per candidate
    #: and KV head (head_dim 128) instead of 80, ranks exactly, and stores 16 B of codes per
    #: token and KV head instead of 96, so the KV pool holds more tokens; host offload
    #: needs "code" (the keys are in host memory there).
    rerank: str = "code"

    def __post_init__(self) -> None:
        if self.hot_cache_lines is None:
            lines = DEFAULT_HOT_CACHE_LINES if self.offload == "host" else 0
            object.__setattr__(self, "hot_cache_lines", lines)
        if self.min_sparse_tokens is None:
            least = DEFAULT_MIN_SPARSE_TOKENS if self.offload == "none" else 0
            object.__setattr__(self, "min_sparse_tokens", least)
        self._check_int("topk", lo=1)
        self._check_int("sink", lo=0)
        self._check_int("local", lo=0)
        self._check_int("dense_threshold", lo=0)
        self._check_int("min_sparse_tokens", lo=0)
        self._check_int("rotation_seed", lo=0, hi=2**63 - 1)
        self._check_int("hot_cache_lines", lo=0, hi=2**30)
        self._check_offload()
        self._check_rerank()
        if self.stats_dir is not None and not (isinstance(self.stats_dir, str) and self.stats_dir):
            raise ParisKVConfigError(
                f"pariskv stats_dir={self.stats_dir!r} is invalid: expected a folder path "
                "(--pariskv-stats-dir)"
            )
        self._check_calibration()
        self._check_candidate_ratio()

    def _check_candidate_ratio(self) -> None:
        value = self.candidate_ratio
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParisKVConfigError(
                f"pariskv candidate_ratio={value!r} is invalid: expected a number in (0, 1] "
                f"or 'auto' ({_flag('candidate_ratio')})"
            )
        if not (0.0 < float(value) <= 1.0) or math.isnan(float(value)):
            raise ParisKVConfigError(
                f"pariskv candidate_ratio={value!r} is out of range: allowed (0, 1], or "
                f"'auto' for the length-adaptive default ({_flag('candidate_ratio')})"
            )

    def _check_offload(self) -> None:
        if self.offload not in OFFLOAD_MODES:
            raise ParisKVConfigError(
                f"pariskv offload={self.offload!r} is invalid: expected one of "
                f"{list(OFFLOAD_MODES)} (--pariskv-offload)"
            )
        gb = self.host_pool_gb
        bad = isinstance(gb, bool) or not isinstance(gb, (int, float))
        if bad or not gb >= 0 or not math.isfinite(gb):
            raise ParisKVConfigError(
                f"pariskv host_pool_gb={gb!r} is invalid: expected a finite GiB >= 0 "
                "(--pariskv-host-pool-gb)"
            )
        object.__setattr__(self, "host_pool_gb", float(gb))
        if self.offload == "host" and gb <= 0:
            raise ParisKVConfigError(
                "--pariskv-offload host needs the host pool's size: pass "
                "--pariskv-host-pool-gb G (GiB of pinned host memory per GPU)"
            )
        if self.offload == "none" and gb > 0:
            raise ParisKVConfigError(
                f"--pariskv-host-pool-gb {gb:g} given without --pariskv-offload host: add "
                "--pariskv-offload host, or drop --pariskv-host-pool-gb"
            )
        if self.offload == "host" and self.min_sparse_tokens:
            raise ParisKVConfigError(
                f"--pariskv-min-sparse-tokens {self.min_sparse_tokens} with --pariskv-offload "
                "host would attend long requests densely over PCIe, which host offload "
                "exists to avoid: drop --pariskv-min-sparse-tokens"
            )
        if self.offload == "none" and self.hot_cache_lines:
            raise ParisKVConfigError(
                f"--pariskv-hot-cache-lines {self.hot_cache_lines} applies to host offload "
                "only: add --pariskv-offload host, or drop --pariskv-hot-cache-lines"
            )

    def _check_rerank(self) -> None:
        if self.rerank not in RERANK_MODES:
            raise ParisKVConfigError(
                f"pariskv rerank={self.rerank!r} is invalid: expected one of "
                f"{list(RERANK_MODES)} (--pariskv-rerank)"
            )
        if self.rerank == "keys" and self.offload == "host":
            raise ParisKVConfigError(
                "--pariskv-rerank keys reads the candidates' keys from the GPU KV pool, which "
                "--pariskv-offload host moves to host memory: use --pariskv-rerank code with "
                "host offload"
            )

    @property
    def stores_records(self) -> bool:
        """The GPU code pool holds the 3-bit records (magnitudes, weights) beside the sign
        signatures: only the "code" rerank reads them."""
        return self.rerank == "code"

    def _check_calibration(self) -> None:
        path = self.calibration
        if path is not None and not (isinstance(path, str) and path):
            raise ParisKVConfigError(
                f"pariskv calibration={path!r} is invalid: expected a file path "
                "(--pariskv-calibration)"
            )
        layers = self.dense_layers
        if layers == "auto":
            if path is None:
                raise ParisKVConfigError(
                    "--pariskv-dense-layers auto reads the per-layer recommendation of a "
                    "calibration file: add --pariskv-calibration FILE (written by `python -m "
                    "pariskv_tools.eval calibrate`), or list the layers, e.g. "
                    "--pariskv-dense-layers 0,1"
                )
            return
        bad = isinstance(layers, str) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers
        )
        if bad or len(set(layers)) != len(layers):
            raise ParisKVConfigError(
                f"pariskv dense_layers={layers!r} is invalid: expected distinct layer indices "
                ">= 0 such as 0,1,2, or auto (--pariskv-dense-layers)"
            )
        object.__setattr__(self, "dense_layers", tuple(sorted(layers)))

    def dense_layer_set(self, num_layers: int) -> tuple[int, ...]:
        """The dense layers of a model of ``num_layers`` layers, "auto" resolved from the
        calibration file; an index outside the model is refused."""
        layers = self.dense_layers
        if layers == "auto":
            from sglang_pariskv.calibration import load_calibration

            layers = load_calibration(self.calibration).dense_layers
        out = [x for x in layers if x >= num_layers]
        if out:
            raise ParisKVConfigError(
                f"--pariskv-dense-layers {','.join(map(str, layers))}: layer(s) {out} do not "
                f"exist, the model has {num_layers} layers (0 to {num_layers - 1})"
            )
        return tuple(layers)

    @property
    def offloaded(self) -> bool:
        """K/V in pinned host memory (``--pariskv-offload host``)."""
        return self.offload == "host"

    def _check_int(self, name: str, lo: int, hi: int | None = None) -> None:
        value = getattr(self, name)
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and value >= lo and (hi is None or value <= hi):
            return
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ParisKVConfigError(
            f"pariskv {name}={value!r} is invalid: expected an integer {bound} ({_flag(name)})"
        )

    def check_context(self, context_len: int) -> None:
        """Refuse sizes larger than the served context: the decode workspace is sized by
        ``budget`` per (request, KV head), so an oversized value would only end in an
        out-of-memory error at startup (and every request would decode densely anyway)."""
        if self.budget > context_len:
            raise ParisKVConfigError(
                f"--pariskv-topk {self.topk} + --pariskv-sink {self.sink} + --pariskv-local "
                f"{self.local} = {self.budget} tokens per step, more than the context length "
                f"{context_len}: lower them (their sum at most {context_len})"
            )

    @property
    def budget(self) -> int:
        """Tokens attended per KV head by a sparse request: sink + local + top-k."""
        return self.sink + self.local + self.topk

    @property
    def dense_limit(self) -> int:
        """The longest request that attends densely (>= 1): the dense threshold, or the
        budget when retrieval could not skip anything below it."""
        return max(self.dense_threshold, self.budget)

    def is_dense(self, seq_len: int) -> bool:
        """A request attends densely when short, or when retrieval could not skip anything."""
        return seq_len <= self.dense_limit

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["dense_layers"] != "auto":
            d["dense_layers"] = list(self.dense_layers)
        if d["candidate_ratio"] is None:
            d["candidate_ratio"] = "auto"
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParisKVConfig:
        """Build from a JSON-style dict; unknown keys are errors (a typo must not be ignored)."""
        cls._check_keys(data)
        kwargs = dict(data)
        if kwargs.get("candidate_ratio") == "auto":
            kwargs["candidate_ratio"] = None
        if isinstance(kwargs.get("dense_layers"), list):
            kwargs["dense_layers"] = tuple(kwargs["dense_layers"])
        return cls(**kwargs)

    @classmethod
    def _check_keys(cls, data: dict[str, Any], where: str = "pariskv config") -> None:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ParisKVConfigError(
                f"{where} has unknown key(s) {unknown}: allowed keys are {sorted(known)}"
            )

    @classmethod
    def from_json(cls, path: str | Path) -> ParisKVConfig:
        return cls.from_dict(cls.read_json(path))

    @classmethod
    def read_json(cls, path: str | Path) -> dict[str, Any]:
        """The fields a config file sets, as written (keys checked, values not yet): what
        ``--pariskv-config`` contributes before the flags override it. Defaults that
        depend on other fields (``min_sparse_tokens``, ``hot_cache_lines`` follow
        ``offload``) are resolved only once the file and the flags are merged."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ParisKVConfigError(
                f"pariskv config file {path} does not exist (--pariskv-config)"
            ) from None
        except json.JSONDecodeError as e:
            raise ParisKVConfigError(f"pariskv config file {path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ParisKVConfigError(f"pariskv config file {path} must hold a JSON object")
        cls._check_keys(data, f"pariskv config file {path}")
        return data


#: (zone length below which it applies, candidate_ratio), shortest first, then the ratio
#: of longer zones. From 10K tokens on, the ParisKV reference's adaptive defaults; below,
#: larger pools, measured on SmolLM2 traces (docs/retrieval_quality.md, "Candidate
#: ratios"): at 7K tokens 0.25 -> 0.5 took recall@100 from 0.85 to 0.89, at 4K 0.5 -> 0.6
#: brought the pre-RoPE-bias case's mass within 0.01 of exact top-k. Both the scalar
#: lookup below and the tensor one in ``codec.budget`` read this one table.
ADAPTIVE_RATIO_TABLE: tuple[tuple[int, float], ...] = (
    (5_000, 0.6),
    (10_000, 0.5),
    (30_000, 0.2),
)
LONG_ZONE_RATIO: float = 0.1


def adaptive_candidate_ratio(zone_len: int) -> float:
    """Length-adaptive candidate ratio: longer zones hold proportionally fewer relevant
    keys, so the candidate pool shrinks as the zone grows."""
    for upper, cand in ADAPTIVE_RATIO_TABLE:
        if zone_len < upper:
            return cand
    return LONG_ZONE_RATIO
