"""The task type, the prompt assembly every task generator shares, and how a task is put to
a model and scored.

Why apart from the generators (:mod:`.task_generators`): a generator only chooses its
needles, question and answer; what depends on the tokenizer (filling a document to an exact
token count, the chat template, the answer prefix) and how a reply is judged is the same
for every task and lives here, so callers that only format and score a task need nothing
else.

Sizing: ``target_tokens`` is the length of what the model actually receives, i.e.
``len(format_chat(tokenizer, task))`` (chat template, document, question and the start of
the assistant reply). :func:`assemble_prompt` hits it to within a sentence or so (a few
tokens).

Answer extraction: each task stores an ``answer_prefix`` in ``meta`` (e.g. "The pass key
is"). ``format_chat`` appends it after the assistant header, so the model's first generated
tokens are the answer itself.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pariskv_tools.workloads.filler import FILLERS, filler_sentence


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the generators need."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Task:
    """One prompt with its expected answer.

    ``prompt`` is the user message (document + question); ``meta`` carries the generator
    parameters, ``answer_prefix``, needle positions and the measured ``n_tokens``.
    """

    prompt: str
    answer: str
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- assembly


def _ntok(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _chat_overhead(tokenizer: Tokenizer, answer_prefix: str) -> int:
    """Tokens format_chat adds around the user message (template + answer prefix)."""
    probe = Task(prompt="", answer="", kind="probe", meta={"answer_prefix": answer_prefix})
    return len(format_chat(tokenizer, probe))


def assemble_prompt(
    tokenizer: Tokenizer,
    target_tokens: int,
    rng: random.Random,
    header: str,
    question: str,
    answer_prefix: str,
    needles: Sequence[tuple[float, str]],
    filler: str,
) -> tuple[str, dict[str, Any]]:
    """Fill a document to ``target_tokens`` total and insert ``needles`` at relative depths.

    A needle's depth is the fraction of the filler sentences (in tokens) that precede it.
    Returns the user message and layout facts for ``meta``.
    """
    if filler not in FILLERS:
        raise ValueError(f"unknown filler style {filler!r}; choose one of {FILLERS}")
    for depth, _ in needles:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], got {depth}")
    fixed = _chat_overhead(tokenizer, answer_prefix) + _ntok(
        tokenizer, f"{header}\n\n\n\n{question}"
    )
    fixed += sum(_ntok(tokenizer, " " + text) for _, text in needles)
    budget = target_tokens - fixed
    if budget < 16:
        raise ValueError(
            f"target_tokens={target_tokens} leaves no room for filler (instructions, question "
            f"and needles already take {fixed} tokens); ask for at least {fixed + 16}."
        )
    # Draw sentences until the budget is covered; counting them one by one with a leading
    # space matches how they tokenize inside the joined document to within a token or two.
    sentences: list[str] = []
    counts: list[int] = []
    total = 0
    while total < budget:
        s = filler_sentence(rng, filler)
        n = _ntok(tokenizer, " " + s)
        if total + n > budget and total + n - budget > budget - total:
            break  # stopping here lands nearer the target than taking one more sentence
        sentences.append(s)
        counts.append(n)
        total += n
    cum = [0]
    for n in counts:
        cum.append(cum[-1] + n)
    filler_total = cum[-1]

    # Insertion slot for each needle: the sentence boundary nearest its depth.
    slots: dict[int, list[str]] = {}
    placed = []
    for depth, text in needles:
        want = depth * filler_total
        idx = min(range(len(cum)), key=lambda i: abs(cum[i] - want))
        slots.setdefault(idx, []).append(text)
        placed.append(
            {
                "text": text,
                "depth": depth,
                "sentence_index": idx,
                "actual_depth": cum[idx] / max(filler_total, 1),
            }
        )
    parts: list[str] = []
    for i in range(len(sentences) + 1):
        parts.extend(slots.get(i, []))
        if i < len(sentences):
            parts.append(sentences[i])
    document = " ".join(parts)
    prompt = f"{header}\n\n{document}\n\n{question}"
    return prompt, {"needles": placed, "answer_prefix": answer_prefix, "filler": filler}


def finish_task(tokenizer: Tokenizer, task: Task) -> Task:
    """Record in ``meta`` the number of tokens the model receives for ``task``; returns it."""
    task.meta["n_tokens"] = len(format_chat(tokenizer, task))
    return task


# --------------------------------------------------------------------------- chat + scoring


def format_chat(tokenizer: Any, task: Task) -> list[int]:
    """Token ids the model sees: chat template (user = task.prompt) + the answer prefix.

    The answer prefix is appended after the assistant header so the model's first tokens are
    the answer. A tokenizer without a chat template gets the plain ``prompt\\n\\nprefix``.
    """
    prefix = task.meta.get("answer_prefix", "")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": task.prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        ids = list(ids)
        if prefix:
            ids += tokenizer.encode(prefix, add_special_tokens=False)
        return ids
    text = f"{task.prompt}\n\n{prefix}" if prefix else task.prompt
    return list(tokenizer.encode(text, add_special_tokens=False))


def score(task: Task, generated_text: str) -> bool:
    """Whether the model's continuation (after the answer prefix) answers ``task``.

    Numeric tasks: the first number in the reply must equal the answer. Multi-value: the
    reply's 7-digit numbers, as a set, must be the answer's. Variable tracking: every
    expected name must appear and no other 5-letter upper-case name may.
    """
    if task.kind in ("passkey", "multikey_needle"):
        m = re.search(r"\d+", generated_text)
        return m is not None and m.group(0) == task.answer
    if task.kind == "multivalue_needle":
        return set(re.findall(r"\b\d{7}\b", generated_text)) == set(task.answer.split())
    if task.kind == "variable_tracking":
        want = set(task.answer.split())
        got = set(re.findall(r"\b[A-Z]{5}\b", generated_text))
        return got == want
    raise ValueError(f"unknown task kind {task.kind!r}")
