"""Seeded synthetic long-context tasks (passkey, multi-key needle, multi-value needle,
variable tracking) and :func:`make_task`, which builds any of them by name.

Why synthetic and in code: the machines reach no dataset hub, and a retrieval benchmark
needs prompts whose length, needle position and answer are known exactly. Every task is a
pure function of (tokenizer, target size, parameters, seed): the filler is built from word
lists with a seeded ``random.Random``, so the same seed always yields the same prompt.

Why a module of their own: each generator here decides only what to hide and what to ask
(needles, their depths, the question, the answer and its prefix); the :class:`.tasks.Task`
they return, the document assembly to the target size, the chat formatting and the scoring
are shared by all of them and live in :mod:`.tasks`.

The instruction repeated after the document, the answer prefix and the default "simple"
filler are what let SmolLM2-135M-Instruct answer the passkey through ~8K tokens (see the
comments at ``_INSTRUCTION_PASSKEY`` and ``filler.FILLERS``).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from pariskv_tools.workloads.tasks import Task, Tokenizer, assemble_prompt, finish_task

# Prompt recipe, found by trying variants on SmolLM2-135M-Instruct with greedy decoding: the
# instruction is given both before the document and again right before the question, the
# question asks for "the number only", and the assistant turn is pre-filled with the answer
# prefix. Without the repeated instruction the model often ignores the document and
# free-associates ("The pass key is a small wooden door ...") even at 600 tokens.
_INSTRUCTION_PASSKEY = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
_INSTRUCTION_MULTIKEY = (
    "Some special magic numbers are hidden inside the following text. Memorize them. "
    "I will quiz you about them."
)
_INSTRUCTION_VARTRACK = (
    "Memorize and track the chain(s) of variable assignments hidden in the following text."
)
_NUMBER_ONLY = "Answer with the number only."


def passkey(
    tokenizer: Tokenizer,
    target_tokens: int,
    depth: float = 0.5,
    seed: int = 0,
    filler: str = "simple",
) -> Task:
    """A 5-digit pass key hidden once at relative ``depth`` (0 = start, 1 = end) of the filler."""
    rng = random.Random(f"passkey-{seed}")
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    prompt, meta = assemble_prompt(
        tokenizer,
        target_tokens,
        rng,
        header=_INSTRUCTION_PASSKEY,
        question=f"{_INSTRUCTION_PASSKEY} What is the pass key? {_NUMBER_ONLY}",
        answer_prefix="The pass key is",
        needles=[(depth, needle)],
        filler=filler,
    )
    meta.update(seed=seed, depth=depth, target_tokens=target_tokens, needle=needle)
    return finish_task(tokenizer, Task(prompt=prompt, answer=key, kind="passkey", meta=meta))


_KEY_WORDS = (
    "apple",
    "river",
    "falcon",
    "marble",
    "lantern",
    "orchid",
    "glacier",
    "violin",
    "compass",
    "thunder",
    "meadow",
    "saffron",
    "harbor",
    "pepper",
    "crystal",
    "badger",
    "willow",
    "canyon",
    "ember",
    "quartz",
    "tulip",
    "raven",
    "copper",
    "velvet",
    "summit",
    "pebble",
    "cedar",
    "comet",
)


def multikey_needle(
    tokenizer: Tokenizer,
    target_tokens: int,
    n_keys: int = 4,
    seed: int = 0,
    filler: str = "simple",
) -> Task:
    """``n_keys`` "special magic number" needles at seeded depths; asks for one of them."""
    if not 1 <= n_keys <= len(_KEY_WORDS):
        raise ValueError(f"n_keys must be in [1, {len(_KEY_WORDS)}], got {n_keys}")
    rng = random.Random(f"multikey-{seed}")
    words = rng.sample(_KEY_WORDS, n_keys)
    numbers = [str(n) for n in rng.sample(range(1_000_000, 10_000_000), n_keys)]
    depths = sorted(rng.uniform(0.05, 0.95) for _ in range(n_keys))
    order = rng.sample(range(n_keys), n_keys)  # which word sits at which depth
    needles = [
        (depths[j], f"The special magic number for {words[i]} is {numbers[i]}.")
        for j, i in enumerate(order)
    ]
    target = rng.randrange(n_keys)
    word = words[target]
    prompt, meta = assemble_prompt(
        tokenizer,
        target_tokens,
        rng,
        header=_INSTRUCTION_MULTIKEY,
        question=f"{_INSTRUCTION_MULTIKEY} What is the special magic number for {word}? "
        f"{_NUMBER_ONLY}",
        answer_prefix=f"The special magic number for {word} is",
        needles=needles,
        filler=filler,
    )
    meta.update(
        seed=seed,
        n_keys=n_keys,
        target_tokens=target_tokens,
        query=word,
        keys=dict(zip(words, numbers)),
    )
    return finish_task(
        tokenizer, Task(prompt=prompt, answer=numbers[target], kind="multikey_needle", meta=meta)
    )


def multivalue_needle(
    tokenizer: Tokenizer,
    target_tokens: int,
    n_values: int = 3,
    n_distractors: int = 2,
    seed: int = 0,
    filler: str = "simple",
) -> Task:
    """An aggregation task: ``n_values`` numbers for one word, scattered at seeded depths
    among the numbers of ``n_distractors`` other words; asks for all of the word's numbers.

    Every value lives at a different place, so an answer needs all of them retrieved at
    once; the distractors have the same sentence shape, so a retrieval that keeps "a"
    magic-number sentence rather than the right ones gets it wrong.
    """
    if n_values < 1 or n_distractors < 0 or n_values + n_distractors > len(_KEY_WORDS):
        raise ValueError(
            f"need n_values >= 1, n_distractors >= 0 and at most {len(_KEY_WORDS)} needles "
            f"in all, got {n_values}, {n_distractors}"
        )
    rng = random.Random(f"multivalue-{seed}")
    word, *others = rng.sample(_KEY_WORDS, 1 + n_distractors)
    owners = [word] * n_values + others
    numbers = [str(n) for n in rng.sample(range(1_000_000, 10_000_000), len(owners))]
    depths = [rng.uniform(0.05, 0.95) for _ in owners]
    needles = sorted(
        (d, f"One of the special magic numbers for {w} is {n}.")
        for d, w, n in zip(depths, owners, numbers)
    )
    prompt, meta = assemble_prompt(
        tokenizer,
        target_tokens,
        rng,
        header=_INSTRUCTION_MULTIKEY,
        question=f"{_INSTRUCTION_MULTIKEY} What are all the special magic numbers for {word}? "
        "Answer with the numbers only.",
        answer_prefix=f"The special magic numbers for {word} are",
        needles=needles,
        filler=filler,
    )
    values = numbers[:n_values]
    meta.update(
        seed=seed,
        n_values=n_values,
        n_distractors=n_distractors,
        target_tokens=target_tokens,
        query=word,
        values=values,
        distractors=dict(zip(others, numbers[n_values:])),
    )
    return finish_task(
        tokenizer,
        Task(prompt=prompt, answer=" ".join(values), kind="multivalue_needle", meta=meta),
    )


def _var_name(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in used:
            used.add(name)
            return name


def variable_tracking(
    tokenizer: Tokenizer,
    target_tokens: int,
    n_chains: int = 2,
    chain_len: int = 4,
    seed: int = 0,
    filler: str = "simple",
) -> Task:
    """Chains ``VAR A = 12345``, ``VAR B = VAR A``, ... scattered in order through the filler.

    Chain 0 is the one asked about; the others are distractors with different values.
    The answer is the space-separated names of chain 0, in assignment order.
    """
    if n_chains < 1 or chain_len < 1:
        raise ValueError(f"need n_chains >= 1 and chain_len >= 1, got {n_chains}, {chain_len}")
    rng = random.Random(f"vartrack-{seed}")
    used: set[str] = set()
    values = [str(v) for v in rng.sample(range(10000, 100000), n_chains)]
    chains = [[_var_name(rng, used) for _ in range(chain_len)] for _ in range(n_chains)]
    statements: list[tuple[float, str]] = []
    for c, names in enumerate(chains):
        depths = sorted(rng.uniform(0.05, 0.95) for _ in names)
        for k, name in enumerate(names):
            rhs = values[c] if k == 0 else f"VAR {names[k - 1]}"
            statements.append((depths[k], f"VAR {name} = {rhs} ."))
    statements.sort(key=lambda d: d[0])
    value = values[0]
    prompt, meta = assemble_prompt(
        tokenizer,
        target_tokens,
        rng,
        header=_INSTRUCTION_VARTRACK,
        question=f"{_INSTRUCTION_VARTRACK} Find all variables that are assigned the value "
        f"{value} in the text above.",
        answer_prefix="Answer: According to the chain(s) of variable assignments in the text "
        "above, "
        f"{chain_len} variables are assigned the value {value}, they are:",
        needles=statements,
        filler=filler,
    )
    meta.update(
        seed=seed,
        n_chains=n_chains,
        chain_len=chain_len,
        target_tokens=target_tokens,
        value=value,
        chains=chains,
        values=values,
    )
    answer = " ".join(chains[0])
    return finish_task(
        tokenizer, Task(prompt=prompt, answer=answer, kind="variable_tracking", meta=meta)
    )


TASKS: dict[str, Callable[..., Task]] = {
    "passkey": passkey,
    "multikey_needle": multikey_needle,
    "multivalue_needle": multivalue_needle,
    "variable_tracking": variable_tracking,
}


def make_task(
    name: str, tokenizer: Tokenizer, target_tokens: int, seed: int = 0, filler: str = "simple"
) -> Task:
    """Build task ``name`` with default parameters (passkey depth is drawn from the seed)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    if name == "passkey":
        depth = random.Random(f"depth-{seed}").uniform(0.05, 0.95)
        return passkey(tokenizer, target_tokens, depth=depth, seed=seed, filler=filler)
    return TASKS[name](tokenizer, target_tokens, seed=seed, filler=filler)
