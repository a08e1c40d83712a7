"""Synthetic long-context tasks: determinism, sizing, needle placement, answers by construction."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pariskv_tools.workloads import task_generators, tasks
from pariskv_tools.workloads.filler import FILLERS, filler_sentence
from pariskv_tools.workloads.smollm2 import ensure_smollm2

TARGETS = [1000, 2000, 4000, 7900]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_smollm2())


def _ntok(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def _document(task: tasks.Task) -> str:
    """The filler+needles part of the user message (between header and question)."""
    head, rest = task.prompt.split("\n\n", 1)
    doc, _question = rest.rsplit("\n\n", 1)
    return doc


@pytest.mark.parametrize("kind", sorted(task_generators.TASKS))
def test_deterministic_per_seed(tok, kind):
    a = task_generators.make_task(kind, tok, 1500, seed=7)
    b = task_generators.make_task(kind, tok, 1500, seed=7)
    c = task_generators.make_task(kind, tok, 1500, seed=8)
    assert a == b
    assert a.prompt != c.prompt


@pytest.mark.parametrize("filler", FILLERS)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", sorted(task_generators.TASKS))
def test_length_within_5_percent(tok, kind, target, filler):
    task = task_generators.make_task(kind, tok, target, seed=1, filler=filler)
    n = len(tasks.format_chat(tok, task))
    assert n == task.meta["n_tokens"]
    assert abs(n - target) <= 0.05 * target, (n, target)


@settings(max_examples=15, deadline=None)
@given(
    depth=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    target=st.integers(300, 3000),
    filler=st.sampled_from(FILLERS),
)
def test_passkey_needle_once_at_depth(tok, depth, seed, target, filler):
    task = task_generators.passkey(tok, target, depth=depth, seed=seed, filler=filler)
    key = task.answer
    needle = task.meta["needle"]
    assert re.fullmatch(r"\d{5}", key)
    assert needle == f"The pass key is {key}. Remember it. {key} is the pass key."
    assert task.prompt.count(needle) == 1
    # The key occurs only inside the needle, and the filler carries no digits at all.
    assert task.prompt.count(key) == 2
    assert not re.search(r"\d", task.prompt.replace(needle, ""))
    assert "pass key" not in _document(task).replace(needle, "")
    # Depth, measured in filler tokens before the needle.
    doc = _document(task)
    before, after = doc.split(needle)
    n_before, n_after = _ntok(tok, before), _ntok(tok, after)
    actual = n_before / max(n_before + n_after, 1)
    assert abs(actual - depth) <= 0.06 + 40 / target, (actual, depth)
    assert abs(len(tasks.format_chat(tok, task)) - target) <= 0.05 * target


def test_passkey_answer_prefix_and_score(tok):
    task = task_generators.passkey(tok, 600, depth=0.3, seed=3)
    ids = tasks.format_chat(tok, task)
    prefix = tok.encode(task.meta["answer_prefix"], add_special_tokens=False)
    assert ids[-len(prefix) :] == prefix
    assert tasks.score(task, f" {task.answer}.")
    assert tasks.score(task, f"{task.answer}")
    assert not tasks.score(task, " 12345678.")
    assert not tasks.score(task, " a small wooden door")


@pytest.mark.parametrize("seed", range(4))
def test_multikey_needles_and_answer(tok, seed):
    task = task_generators.multikey_needle(tok, 2000, n_keys=5, seed=seed)
    found = dict(re.findall(r"The special magic number for (\w+) is (\d{7})\.", task.prompt))
    assert found == task.meta["keys"]
    assert len(set(found.values())) == 5
    for word, number in found.items():
        assert task.prompt.count(f"The special magic number for {word} is") == 1
        assert task.prompt.count(number) == 1
    query = re.search(r"What is the special magic number for (\w+)\?", task.prompt).group(1)
    assert query == task.meta["query"]
    assert task.answer == found[query]
    assert tasks.score(task, f" {task.answer}.")


def _resolve(prompt: str) -> dict[str, str]:
    """Independently evaluate every `VAR X = ...` statement in textual order."""
    env: dict[str, str] = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+) \.", prompt):
        if rhs.startswith("VAR "):
            src = rhs[4:]
            assert src in env, f"{name} refers to {src} before it is assigned"
            env[name] = env[src]
        else:
            env[name] = rhs
    return env


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("n_chains", "chain_len"), [(1, 3), (2, 4), (3, 5)])
def test_variable_tracking_answer_resolves(tok, seed, n_chains, chain_len):
    task = task_generators.variable_tracking(
        tok, 2000, n_chains=n_chains, chain_len=chain_len, seed=seed
    )
    env = _resolve(task.prompt)
    assert len(env) == n_chains * chain_len
    value = re.search(r"assigned the value (\d+) in the text above", task.prompt).group(1)
    expected = {name for name, v in env.items() if v == value}
    assert set(task.answer.split()) == expected
    assert len(expected) == chain_len
    assert tasks.score(task, " " + ", ".join(sorted(expected)))
    assert not tasks.score(task, " " + " ".join(sorted(expected)[:-1]))
    distractors = set(env) - expected
    if distractors:
        assert not tasks.score(task, f" {task.answer} {min(distractors)}")


@pytest.mark.parametrize("style", FILLERS)
def test_filler_is_varied_and_digit_free(style):
    import random

    rng = random.Random(0)
    sentences = [filler_sentence(rng, style) for _ in range(500)]
    assert len(set(sentences)) > 50
    assert not any(re.search(r"\d", s) for s in sentences)


def test_plain_tokenizer_fallback():
    class Chars:
        """A stand-in tokenizer: one token per character, no chat template."""

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [ord(c) for c in text]

    task = task_generators.passkey(Chars(), 3000, depth=0.5, seed=0)
    ids = tasks.format_chat(Chars(), task)
    assert "".join(map(chr, ids)).endswith("\n\nThe pass key is")
    assert abs(len(ids) - 3000) <= 150


def test_bad_arguments_are_explained(tok):
    with pytest.raises(ValueError, match="no room for filler"):
        task_generators.passkey(tok, 50, seed=0)
    with pytest.raises(ValueError, match="depth"):
        task_generators.passkey(tok, 1000, depth=1.5, seed=0)
    with pytest.raises(ValueError, match="unknown filler"):
        task_generators.passkey(tok, 1000, filler="lorem")
    with pytest.raises(ValueError, match="unknown task"):
        task_generators.make_task("nope", tok, 1000)


@pytest.mark.parametrize("seed", range(4))
def test_multivalue_needle_asks_for_every_value_of_one_word(tok, seed):
    task = task_generators.multivalue_needle(tok, 2000, n_values=3, n_distractors=2, seed=seed)
    pairs = re.findall(r"One of the special magic numbers for (\w+) is (\d{7})\.", task.prompt)
    assert len(pairs) == 5 and len({n for _, n in pairs}) == 5
    query = re.search(r"What are all the special magic numbers for (\w+)\?", task.prompt)[1]
    want = {n for w, n in pairs if w == query}
    assert len(want) == 3 and len({w for w, _ in pairs}) == 3  # the word + 2 distractors
    assert set(task.answer.split()) == want
    a, b, c = sorted(want)
    assert tasks.score(task, f" {c}, {a} and {b}.")
    assert not tasks.score(task, f" {a}, {b}.")  # one missing
    other = next(n for w, n in pairs if w != query)
    assert not tasks.score(task, f" {a}, {b}, {c}, {other}.")  # a distractor's number
    assert abs(task.meta["n_tokens"] - 2000) <= 12
