"""The soak's scenario mix: what each client sends next, a function of (seed, client) alone.

The kinds (:data:`KINDS`) are what a long-running server meets: shared-prefix multi-turn
chats over one long document, long documents above the dense threshold, short chats,
streams, streams the client closes early, one-token answers, requests as long as the server
serves (:func:`served_limits`), and malformed or oversized requests (:data:`MALFORMED`). A
seeded mix replays exactly, so a failure found once can be run again.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from mixed_workload import Request, prompt_ids

KINDS = ("chat", "long", "short", "stream", "abort", "max1", "ctx_limit", "malformed")
DEFAULT_MIX = "chat=3,long=2,short=5,stream=3,abort=2,max1=2,ctx_limit=1,malformed=2"
#: Prompt-seed indices outside any client's range: the chats' shared document and probes.
CHAT_DOC_INDEX = 2**40
PROBE_INDEX = 2**41
CLIENT_STRIDE = 2**32
#: Scenario parameters (tokens): chat turns, their user chunks and answers; streams.
CHAT_TURNS = (2, 4)
CHAT_USER = (32, 256)
CHAT_ANSWER = (16, 64)
LONG_OUTPUT = (8, 64)
SHORT_OUTPUT = (16, 128)
STREAM_OUTPUT = (64, 256)
ABORT_OUTPUT = 512
ABORT_AFTER_CHUNKS = (1, 8)
#: SGLang's request limits follow from the ``max_req_input_len`` its ``/server_info``
#: reports, which is ``max_req_len - MAX_REQ_INPUT_MARGIN``, ``max_req_len`` being
#: min(context length, pool tokens) - 1: an input is refused unless it is shorter than
#: ``max_req_input_len``, and a request's output stops where input + output reaches
#: ``max_req_len - 1`` (its scheduler caps ``max_new_tokens`` there, with no error).
MAX_REQ_INPUT_MARGIN = 5
#: Output tokens of context-limit requests: at least the margin, so that their input, the
#: served total less the output, is one SGLang accepts.
CTX_LIMIT_OUTPUT = (MAX_REQ_INPUT_MARGIN, 32)

#: Malformed or oversized requests: name -> endpoint. Each must be answered 4xx.
MALFORMED = {
    "generate_bad_json": "/generate",
    "generate_input_ids_not_a_list": "/generate",
    "generate_input_over_context": "/generate",
    "generate_total_over_context": "/generate",
    "completions_bad_json": "/v1/completions",
    "completions_max_tokens_not_an_int": "/v1/completions",
    "completions_prompt_over_context": "/v1/completions",
    "chat_bad_json": "/v1/chat/completions",
    "chat_messages_not_a_list": "/v1/chat/completions",
}


def served_limits(max_req_input_len: int) -> tuple[int, int]:
    """(the longest input, the longest input + output) that SGLang serves in full, from
    the ``max_req_input_len`` it reports (:data:`MAX_REQ_INPUT_MARGIN`)."""
    return max_req_input_len - 1, max_req_input_len + MAX_REQ_INPUT_MARGIN - 1


@dataclass(frozen=True)
class Workload:
    """What the scenario mix depends on. ``max_req_input_len``: the server's, as its
    ``/server_info`` reports it (0 until the server runs: SGLang's value where the KV pool
    holds more than the context, ``context_length - 1 - MAX_REQ_INPUT_MARGIN``)."""

    seed: int
    context_length: int
    dense_threshold: int
    short_input: tuple[int, int]
    long_input: tuple[int, int]
    chat_doc_tokens: int
    weights: dict[str, float]
    max_req_input_len: int = 0

    @property
    def max_input(self) -> int:
        """The longest input the server accepts."""
        return served_limits(self._max_req_input_len)[0]

    @property
    def max_total(self) -> int:
        """The longest input + output the server serves in full: context-limit requests."""
        return served_limits(self._max_req_input_len)[1]

    @property
    def _max_req_input_len(self) -> int:
        return self.max_req_input_len or self.context_length - 1 - MAX_REQ_INPUT_MARGIN

    def served_by(self, server_info: dict) -> Workload:
        """This workload with the limits the running server reports, checked again."""
        w = dataclasses.replace(
            self, max_req_input_len=int(server_info.get("max_req_input_len") or 0)
        )
        w.check()
        return w

    def check(self) -> None:
        """Raise ValueError unless every kind's requests fit the context and long ones
        cross the dense threshold."""
        top, thr = self.max_total, self.dense_threshold
        chat_max = self.chat_doc_tokens + CHAT_TURNS[1] * (CHAT_USER[1] + CHAT_ANSWER[1])
        for what, ok in (
            (f"--long-input low > dense threshold {thr}", self.long_input[0] > thr),
            (f"--long-input fits {top} tokens", self.long_input[1] + LONG_OUTPUT[1] <= top),
            (f"--short-input fits {top} tokens", self.short_input[1] + ABORT_OUTPUT <= top),
            (f"a chat ({chat_max} tokens at most) fits {top} tokens", chat_max <= top),
            ("context-limit requests cross the threshold", top - CTX_LIMIT_OUTPUT[1] > thr),
            ("1 <= LOW <= HIGH", all(1 <= a <= b for a, b in (self.short_input, self.long_input))),
        ):
            if not ok:
                raise ValueError(f"workload does not satisfy: {what} ({self})")
        if set(self.weights) - set(KINDS) or not sum(self.weights.values()) > 0:
            raise ValueError(f"--mix: weights of {KINDS} with a positive sum ({self.weights})")


@dataclass(frozen=True)
class Scenario:
    """One client action. ``index`` seeds its prompt (unique over clients)."""

    kind: str
    index: int
    input_len: int = 0
    output_len: int = 0
    turns: int = 0
    cut_after: int = 0
    variant: str = ""


def _draw(rng: np.random.Generator, lo_hi: tuple[int, int]) -> int:
    return int(rng.integers(lo_hi[0], lo_hi[1], endpoint=True))


def scenarios(w: Workload, client: int) -> Iterator[Scenario]:
    """Client ``client``'s endless scenario sequence, a function of (seed, client) alone.
    The first scenario of client ``c`` is the ``c``-th kind of positive weight (cyclically),
    so with at least as many clients as kinds every kind runs from the start; then kinds
    follow the mix."""
    rng = np.random.default_rng([w.seed, client])
    kinds = [k for k in KINDS if w.weights.get(k, 0) > 0]
    p = np.array([w.weights[k] for k in kinds], dtype=float)
    p /= p.sum()
    for k in itertools.count():
        kind = kinds[client % len(kinds)] if k == 0 else kinds[rng.choice(len(kinds), p=p)]
        index = client * CLIENT_STRIDE + k
        either = w.long_input if rng.random() < 0.5 else w.short_input
        if kind == "chat":
            yield Scenario(
                kind,
                index,
                w.chat_doc_tokens,
                _draw(rng, CHAT_ANSWER),
                turns=_draw(rng, CHAT_TURNS),
            )
        elif kind == "long":
            yield Scenario(kind, index, _draw(rng, w.long_input), _draw(rng, LONG_OUTPUT))
        elif kind == "short":
            yield Scenario(kind, index, _draw(rng, w.short_input), _draw(rng, SHORT_OUTPUT))
        elif kind == "stream":
            yield Scenario(kind, index, _draw(rng, w.short_input), _draw(rng, STREAM_OUTPUT))
        elif kind == "abort":
            yield Scenario(
                kind,
                index,
                _draw(rng, either),
                ABORT_OUTPUT,
                cut_after=_draw(rng, ABORT_AFTER_CHUNKS),
            )
        elif kind == "max1":
            yield Scenario(kind, index, _draw(rng, either), 1)
        elif kind == "ctx_limit":
            out = _draw(rng, CTX_LIMIT_OUTPUT)
            yield Scenario(kind, index, w.max_total - out, out)
        else:
            yield Scenario(kind, index, variant=str(rng.choice(list(MALFORMED))))


def ids_for(seed: int, index: int, n: int) -> list[int]:
    """``n`` prompt token ids of seed index ``index`` (bench_mixed_traffic's prompts)."""
    return prompt_ids(seed, Request(index=index, cls="", input_len=n, arrival_s=0.0))


def malformed_body(variant: str, context_length: int) -> bytes:
    """The body of a malformed or oversized request (see :data:`MALFORMED`)."""
    over = list(range(1000, 1000 + context_length + 16))
    bodies = {
        "generate_bad_json": b'{"input_ids": [1000, 1001, 1002',
        "generate_input_ids_not_a_list": {
            "input_ids": "1000 1001",
            "sampling_params": {"max_new_tokens": 4},
        },
        "generate_input_over_context": {
            "input_ids": over,
            "sampling_params": {"max_new_tokens": 4},
        },
        "generate_total_over_context": {
            "input_ids": over[: context_length // 2],
            "sampling_params": {"max_new_tokens": context_length},
        },
        "completions_bad_json": b'{"model": "default", "prompt": ',
        "completions_max_tokens_not_an_int": {
            "model": "default",
            "prompt": [1000, 1001],
            "max_tokens": "many",
        },
        "completions_prompt_over_context": {"model": "default", "prompt": over, "max_tokens": 4},
        "chat_bad_json": b'{"model": "default", "messages": [{"role": "user"',
        "chat_messages_not_a_list": {"model": "default", "messages": "hello"},
    }
    body = bodies[variant]
    return body if isinstance(body, bytes) else json.dumps(body).encode()
