"""The evaluation's workloads: seeded task prompts captured on SmolLM2, cached on disk.

A capture (post-RoPE keys/values of every position, decode queries) of a few thousand
tokens plus 1024 greedy decode steps takes minutes on CPU, so each (task, context, decode
length, seed) is captured once into ``~/.cache/sglang-pariskv/captures/`` (outside git) and
reloaded afterwards.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pariskv_tools.eval.trace import LayerTrace

MAX_POSITIONS = 8192  # SmolLM2-135M's context: the 8K prompt leaves room for the decode


@dataclass(frozen=True)
class ContextSpec:
    """One evaluated context: a label, a task of the generator and its prompt length."""

    label: str
    task: str
    tokens: int

    def prompt_tokens(self, n_decode: int) -> int:
        """Target prompt length: ``tokens``, shortened so prompt + decode fits the model
        (with a 64-token margin: the generator lands within a few tokens of its target)."""
        return min(self.tokens, MAX_POSITIONS - n_decode - 64)


#: 2K / 4K / 8K, one task each, so every length and every task of the generator is covered.
DEFAULT_CONTEXTS = (
    ContextSpec("2k", "passkey", 2048),
    ContextSpec("4k", "multikey", 4096),
    ContextSpec("8k", "variable_tracking", 8192),
)


def default_cache_dir(root: Path | None = None) -> Path:
    """``captures`` under the SmolLM2 cache root (``root``, else $SGLANG_PARISKV_CACHE...)."""
    from pariskv_tools.workloads.smollm2 import cache_root

    return cache_root(root) / "captures"


def capture_path(spec: ContextSpec, n_decode: int, seed: int, cache_dir: Path) -> Path:
    return cache_dir / f"{spec.task}-{spec.prompt_tokens(n_decode)}-d{n_decode}-s{seed}.pt"


def _task_name(tasks_module, wanted: str) -> str:
    """Map our task label onto the generator's registry name (tolerates naming drift)."""
    names = list(getattr(tasks_module, "TASKS", {}))
    if wanted in names or not names:
        return wanted
    norm = wanted.replace("_", "").replace("-", "")
    for n in names:
        if norm[:5] in n.replace("_", "").replace("-", ""):
            return n
    raise ValueError(f"task {wanted!r} not in the generator's tasks {names}")


def load_or_capture(
    spec: ContextSpec,
    n_decode: int,
    seed: int,
    cache_dir: Path,
    progress: bool = True,
    model_cache: Path | None = None,
    gguf: Path | None = None,
):
    """The cached capture of ``spec``, capturing it (and caching) when missing; the model
    comes from :func:`load_smollm2` with ``model_cache`` and ``gguf``."""
    from pariskv_tools.workloads import tasks
    from pariskv_tools.workloads.capture import Capture, capture
    from pariskv_tools.workloads.smollm2 import load_smollm2

    path = capture_path(spec, n_decode, seed, cache_dir)
    if path.is_file():
        return Capture.load(path)
    print(f"[eval] capturing {spec.label} ({spec.task}) -> {path}", file=sys.stderr, flush=True)
    model, tokenizer = load_smollm2(cache_dir=model_cache, gguf=gguf)
    name = _task_name(tasks, spec.task)
    task = tasks.make_task(name, tokenizer, spec.prompt_tokens(n_decode), seed=seed)
    prompt = torch.tensor(tasks.format_chat(tokenizer, task))
    cap = capture(model, tokenizer, prompt, n_decode, progress=progress)
    meta = {"task": name, "seed": seed, "answer": getattr(task, "answer", None)}
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
    ).to(device)
