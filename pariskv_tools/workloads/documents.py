"""Long documents with planted vault codes, the questions about them, and answer scoring.

Why: the user-workflow examples (``examples/``) and ``benchmarks/bench_workflows.py`` need a
long document whose facts, their depths and the right answers are known exactly, built in
code (our machines reach no dataset hub), at any size from a few thousand to ~100K tokens.
Each fact is a sentence "The access code of vault <name> is <number>." planted at a chosen
relative depth among the digit-free filler of :mod:`.filler`, so the only numbers in the
document are the codes and an answer is scored by its first number.

Sizing: ``doc_tokens`` is the length of the document text alone (the instruction, question
and chat template around it are the caller's). With a tokenizer the count is exact to
within a token or two; without one it is estimated from characters
(:data:`CHARS_PER_TOKEN`, measured with SmolLM2's tokenizer on this filler), so a
client can build a document without downloading anything.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from pariskv_tools.workloads.filler import filler_sentence
from pariskv_tools.workloads.tasks import Tokenizer

#: Characters per token of the "simple" filler under SmolLM2's tokenizer (3.78 measured;
#: Llama-3's BPE gives a similar ratio on such plain English).
CHARS_PER_TOKEN = 3.8

VAULT_NAMES = (
    "amber",
    "birch",
    "cobalt",
    "delta",
    "ember",
    "falcon",
    "garnet",
    "harbor",
    "indigo",
    "juniper",
    "kestrel",
    "lotus",
    "marble",
    "nimbus",
    "onyx",
    "pepper",
    "quartz",
    "raven",
    "saffron",
    "tundra",
    "umber",
    "violet",
    "willow",
    "zephyr",
)

#: Said before the document and again before the question (the recipe that lets
#: SmolLM2-135M answer across thousands of tokens, see ``task_generators._INSTRUCTION_PASSKEY``).
INSTRUCTION = (
    "A long document follows. A few of its sentences give the access codes of vaults. "
    "Memorize them. I will ask you about them."
)
SYSTEM_PROMPT = "You are a helpful assistant. You answer questions about documents exactly."


@dataclass(frozen=True)
class Fact:
    vault: str
    code: str
    depth: float  #: requested relative depth, 0 = start of the filler, 1 = end
    actual_depth: float  #: fraction of the document's tokens that precede the fact
    sentence: str


@dataclass(frozen=True)
class Document:
    text: str
    facts: tuple[Fact, ...]
    n_tokens: int  #: tokens of ``text`` (estimated when ``exact`` is False)
    target_tokens: int
    exact: bool  #: counted with a real tokenizer


@dataclass(frozen=True)
class Question:
    vault: str
    answer: str
    #: the question as a user would ask it (the instruction repeated, then the question)
    text: str
    #: what an answer starts with; the frontend example pre-fills it in the assistant turn
    answer_prefix: str


def fact_sentence(vault: str, code: str) -> str:
    return f"The access code of vault {vault} is {code}."


def count_tokens(text: str, tokenizer: Tokenizer | None = None) -> float:
    """Tokens of ``text``: exact with a tokenizer, else ``len / CHARS_PER_TOKEN``."""
    if tokenizer is None:
        return len(text) / CHARS_PER_TOKEN
    return len(tokenizer.encode(text, add_special_tokens=False))


def build_document(
    doc_tokens: int,
    n_facts: int = 4,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    depths: list[float] | None = None,
) -> Document:
    """A ~``doc_tokens``-token document with ``n_facts`` vault codes at ``depths``.

    Default depths are spread evenly over [0.1, 0.9]; which vault sits where and the
    5-digit codes are drawn from ``seed``. The same arguments always give the same text.
    """
    if not 1 <= n_facts <= len(VAULT_NAMES):
        raise ValueError(f"n_facts must be in [1, {len(VAULT_NAMES)}], got {n_facts}")
    if depths is None:
        depths = [0.5] if n_facts == 1 else [0.1 + 0.8 * i / (n_facts - 1) for i in range(n_facts)]
    if len(depths) != n_facts or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"need {n_facts} depths in [0, 1], got {depths}")
    rng = random.Random(f"vaults-{seed}")
    vaults = rng.sample(VAULT_NAMES, n_facts)
    codes = [str(c) for c in rng.sample(range(10000, 100000), n_facts)]
    sentences = [fact_sentence(v, c) for v, c in zip(vaults, codes)]

    memo: dict[str, float] = {}

    def ntok(s: str) -> float:  # the filler repeats a few hundred distinct sentences
        if s not in memo:
            memo[s] = count_tokens(" " + s, tokenizer)
        return memo[s]

    budget = doc_tokens - sum(ntok(s) for s in sentences)
    if budget < 16:
        raise ValueError(f"doc_tokens={doc_tokens} leaves no room for filler around the facts")
    filler: list[str] = []
    cum = [0.0]  # tokens of filler before sentence i
    while cum[-1] < budget:
        s = filler_sentence(rng, "simple")
        n = ntok(s)
        if cum[-1] + n - budget > budget - cum[-1]:
            break  # stopping here lands nearer the target than one more sentence
        filler.append(s)
        cum.append(cum[-1] + n)

    # Each fact goes to the sentence boundary nearest its depth.
    slots: dict[int, list[int]] = {}
    for i, d in enumerate(depths):
        idx = min(range(len(cum)), key=lambda j: abs(cum[j] - d * cum[-1]))
        slots.setdefault(idx, []).append(i)
    parts: list[str] = []
    before: dict[int, float] = {}  # fact index -> tokens preceding it
    running = 0.0
    for j in range(len(filler) + 1):
        for i in slots.get(j, []):
            before[i] = running
            parts.append(sentences[i])
            running += ntok(sentences[i])
        if j < len(filler):
            parts.append(filler[j])
            running += ntok(filler[j])
    text = " ".join(parts)
    total = count_tokens(text, tokenizer)
    facts = tuple(
        Fact(vaults[i], codes[i], depths[i], before[i] / max(total, 1.0), sentences[i])
        for i in range(n_facts)
    )
    return Document(text, facts, round(total), doc_tokens, tokenizer is not None)


def make_question(fact: Fact) -> Question:
    return Question(
        vault=fact.vault,
        answer=fact.code,
        text=f"{INSTRUCTION} What is the access code of vault {fact.vault}? "
        "Answer with the number only.",
        answer_prefix=f"The access code of vault {fact.vault} is",
    )


def make_questions(document: Document, k: int, seed: int = 0) -> list[Question]:
    """``k`` questions over a seeded order of the facts (cycling when k > facts)."""
    order = list(document.facts)
    random.Random(f"questions-{seed}").shuffle(order)
    return [make_question(order[i % len(order)]) for i in range(k)]


def extract_code(text: str) -> str | None:
    """The first number in ``text`` ("12,345" reads as 12345), or None."""
    m = re.search(r"\d[\d,]*", text)
    return None if m is None else m.group(0).rstrip(",").replace(",", "")


def grade(text: str, expected: str) -> str:
    """``"correct"``, ``"wrong"`` (another number first) or ``"no_answer"`` (no number)."""
    got = extract_code(text)
    if got is None:
        return "no_answer"
    return "correct" if got == expected else "wrong"
