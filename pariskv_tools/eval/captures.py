"""The evaluation's workloads: seeded task prompts captured on the model, cached on disk.

A capture (post-RoPE keys/values of every position, decode queries) of a few thousand
tokens plus 1024 greedy decode steps takes minutes on CPU, so each (model, task, context,
decode length, seed) is captured once into ``~/.cache/sglang-pariskv/captures/`` (outside
git; SmolLM2's directly there, any other model's in a sub-directory of its own, see
:attr:`~pariskv_tools.workloads.models.ModelSource.cache_name`) and reloaded afterwards.

Context lengths follow the model: the defaults are 2K / 4K / 8K, scaled down for a model
with fewer than 8192 positions, and every prompt is capped so that prompt + decode fits the
model's ``max_position_embeddings``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pariskv_tools.eval.trace import LayerTrace

if TYPE_CHECKING:
    from pariskv_tools.workloads.models import ModelSource

#: Tokens left free past prompt + decode: the generator lands within a few tokens of its target.
MARGIN = 64
#: The default contexts are sized for a model with this many positions; shorter models scale
#: them down proportionally, longer ones keep them (a CPU capture is minutes per 8K).
REFERENCE_POSITIONS = 8192


@dataclass(frozen=True)
class ContextSpec:
    """One evaluated context: a label, a task of the generator and its prompt length."""

    label: str
    task: str
    tokens: int

    def prompt_tokens(self, n_decode: int, max_positions: int = REFERENCE_POSITIONS) -> int:
        """Target prompt length: ``tokens``, shortened so prompt + decode + :data:`MARGIN`
        fits ``max_positions``."""
        return min(self.tokens, max_positions - n_decode - MARGIN)


#: 2K / 4K / 8K, one task each, so every length and every task of the generator is covered.
DEFAULT_CONTEXTS = (
    ContextSpec("2k", "passkey", 2048),
    ContextSpec("4k", "multikey", 4096),
    ContextSpec("8k", "variable_tracking", 8192),
)


def _label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def default_contexts(max_positions: int) -> tuple[ContextSpec, ...]:
    """:data:`DEFAULT_CONTEXTS`, scaled by ``max_positions / 8192`` when that is below 1."""
    if max_positions >= REFERENCE_POSITIONS:
        return DEFAULT_CONTEXTS
    scaled = [(c, c.tokens * max_positions // REFERENCE_POSITIONS) for c in DEFAULT_CONTEXTS]
    return tuple(ContextSpec(_label(n), c.task, n) for c, n in scaled)


def parse_contexts(text: str) -> tuple[ContextSpec, ...]:
    """``--contexts``: comma list of ``LEN[:TASK]``, LEN in tokens with an optional ``k``
    (x1024). Without a task, a default context's label (2k, 4k, 8k) keeps its task and any
    other length takes the default tasks in turn by its place in the list."""
    from pariskv_tools.workloads import task_generators

    by_label = {c.label: c.task for c in DEFAULT_CONTEXTS}
    cycle = [c.task for c in DEFAULT_CONTEXTS]
    out = []
    for i, item in enumerate(x.strip() for x in text.split(",") if x.strip()):
        length, _, task = item.partition(":")
        m = re.fullmatch(r"(\d+)(k?)", length.lower())
        if m is None or int(m.group(1)) < 1:
            raise SystemExit(f"--contexts: {length!r} is not a length such as 2k or 300")
        tokens = int(m.group(1)) * (1024 if m.group(2) else 1)
        task = task or by_label.get(length.lower(), cycle[i % len(cycle)])
        _task_name(task_generators, task, flag="--contexts")
        out.append(ContextSpec(item.lower(), task, tokens))
    if not out:
        raise SystemExit("--contexts: give at least one length")
    return tuple(out)


def default_cache_dir(root: Path | None = None) -> Path:
    """``captures`` under the cache root (``root``, else $SGLANG_PARISKV_CACHE...)."""
    from pariskv_tools.workloads.smollm2 import cache_root

    return cache_root(root) / "captures"


def capture_path(
    spec: ContextSpec,
    n_decode: int,
    seed: int,
    cache_dir: Path,
    model: ModelSource | None = None,
) -> Path:
    """Where the capture of ``spec`` on ``model`` (default: SmolLM2) is cached."""
    limit = model.max_positions if model is not None else REFERENCE_POSITIONS
    sub = model.cache_name if model is not None else ""
    name = f"{spec.task}-{spec.prompt_tokens(n_decode, limit)}-d{n_decode}-s{seed}.pt"
    return cache_dir / sub / name


def _task_name(tasks_module, wanted: str, flag: str | None = None) -> str:
    """Map our task label onto the generator's registry name (tolerates naming drift)."""
    names = list(getattr(tasks_module, "TASKS", {}))
    if wanted in names or not names:
        return wanted
    norm = wanted.replace("_", "").replace("-", "")
    for n in names:
        if norm[:5] in n.replace("_", "").replace("-", ""):
            return n
    if flag is not None:
        raise SystemExit(f"{flag}: task {wanted!r} is not one of {', '.join(sorted(names))}")
    raise ValueError(f"task {wanted!r} not in the generator's tasks {names}")


def load_or_capture(
    spec: ContextSpec,
    n_decode: int,
    seed: int,
    cache_dir: Path,
    model: ModelSource,
    progress: bool = True,
    device: str = "cpu",
):
    """The cached capture of ``spec`` on ``model``, capturing it (and caching) when missing.

    ``device``: where the model runs while capturing (float32 on the CPU, bfloat16 on a
    GPU, as served); the capture itself is kept on the CPU in float32."""
    from pariskv_tools.workloads import task_generators, tasks
    from pariskv_tools.workloads.capture import Capture, capture

    path = capture_path(spec, n_decode, seed, cache_dir, model)
    if path.is_file():
        return Capture.load(path)
    print(f"[eval] capturing {spec.label} ({spec.task}) -> {path}", file=sys.stderr, flush=True)
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    lm, tokenizer = model.load(device, dtype)
    name = _task_name(task_generators, spec.task)
    target = spec.prompt_tokens(n_decode, model.max_positions)
    task = task_generators.make_task(name, tokenizer, target, seed=seed)
    prompt = torch.tensor(tasks.format_chat(tokenizer, task))
    cap = capture(lm, tokenizer, prompt, n_decode, progress=progress)
    meta = {
        "model": model.describe(),
        "task": name,
        "seed": seed,
        "answer": getattr(task, "answer", None),
    }
    if hasattr(tasks, "score"):
        meta["correct"] = tasks.score(task, cap.text)
    cap.meta.update(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    cap.save(path)
    return cap


def layer_trace(cap, layer: int, device: str = "cpu") -> LayerTrace:
    """The decode steps of one layer. The prefill's last query is dropped: decode step i
    (i = 1..n_decode) is the query at position P - 1 + i, which attends keys[: P + i], i.e.
    the prompt and the i generated keys written so far."""
    q = cap.queries[layer][1:]
    pos = cap.query_positions[1:]
    return LayerTrace(
        keys=cap.keys[layer].float(),
        values=cap.values[layer].float(),
        queries=q.float(),
        seq_lens=(pos + 1).to(torch.int64),
        prompt_len=int(cap.prompt_len),
        layer=layer,
    ).to(device)
