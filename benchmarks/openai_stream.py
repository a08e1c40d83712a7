"""Streamed requests through SGLang's OpenAI-compatible API, on models without text.

The benchmarks' default model is an HF config with random weights (``--load-format
dummy``): it has no tokenizer, and the OpenAI endpoints need one to stream text.
:func:`write_word_tokenizer` gives such a model directory a tokenizer with one word per
token id (``w0``, ``w1``, ...) and a chat template that is the message itself.
:func:`stream_completion` sends a prompt of exact token ids to ``/v1/completions`` (the
OpenAI API takes a prompt as token ids, so any model's input length is exact) and times
the streamed tokens; the final usage chunk gives the counts.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from server_client import RequestFailed, _check_local, sse_chunks


def write_word_tokenizer(model_dir: Path, vocab_size: int, bos_id: int, eos_id: int) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``model_dir``: token id
    i is the word ``w<i>``; words are split on whitespace and joined by single spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    for name, i in (("bos", bos_id), ("eos", eos_id)):
        if not 0 <= i < vocab_size:
            raise ValueError(f"{name} token id {i} is outside the vocabulary of {vocab_size}")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by spaces
    tok.save(str(model_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": f"w{bos_id}",
        "eos_token": f"w{eos_id}",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "model_max_length": 1 << 30,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def prompt_text(ids: list[int]) -> str:
    """The message whose tokens are ``ids`` under :func:`write_word_tokenizer`'s tokenizer."""
    return " ".join(f"w{i}" for i in ids)


def stream_completion(
    url: str,
    ids: list[int],
    output_len: int,
    timeout: float,
    t0: float | None = None,
    token_times: list[tuple[float, int]] | None = None,
) -> dict:
    """Send one streamed ``/v1/completions`` request whose prompt is the tokens ``ids`` and
    which decodes exactly ``output_len`` tokens (``ignore_eos``, greedy), and time its
    tokens on this side.

    Returns ``tokens`` (output tokens, from the usage chunk), ``prompt_tokens``,
    ``start_s`` (sent), ``first_s`` / ``last_s`` (first and last output token), in seconds
    from ``t0`` (a ``time.perf_counter()`` value; default: the send), ``first_tokens`` (the
    output tokens the first chunk brought: more than one when the server coalesced the
    outputs of a client that fell behind), and ``error``: None, or why the request failed
    (an HTTP error, an error chunk, a stream without its usage chunk or ``[DONE]``, another
    prompt or output length than asked, or no end within ``timeout`` seconds).
    ``token_times``, when given, receives ``(seconds from t0, output tokens so far)`` for
    every chunk that brought text. Tokens so far: the server's running count
    (``continuous_usage_stats``), else the words streamed so far, exact under
    :func:`write_word_tokenizer`'s tokenizer (special tokens aside, which stream no text).
    """
    _check_local(url)
    body = {
        "model": "default",
        "prompt": ids,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    rec = {"tokens": 0, "prompt_tokens": None, "start_s": None, "first_s": None,
           "first_tokens": 0, "last_s": None, "error": None}  # fmt: skip
    http = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = rec["start_s"] = time.perf_counter()
    seen, usage = 0, None
    try:
        with urllib.request.urlopen(http, timeout=timeout) as resp:
            for now, chunk in sse_chunks(resp, output_len, start, timeout):
                usage = chunk.get("usage") or usage
                words = len("".join(c.get("text") or "" for c in chunk["choices"]).split())
                if words:
                    # the server's running count where it sends one (continuous usage),
                    # else the words so far
                    counted = (chunk.get("usage") or {}).get("completion_tokens")
                    seen = counted if counted else seen + words
                    if rec["first_s"] is None:
                        rec["first_s"], rec["first_tokens"] = now, seen
                    rec["last_s"] = now
                    if token_times is not None:
                        token_times.append((now, seen))
    except RequestFailed as e:
        rec["error"] = str(e)
    except urllib.error.HTTPError as e:
        rec["error"] = f"HTTP {e.code}: {e.read()[:300]!r}"
    except (OSError, ValueError, KeyError, TypeError) as e:  # timeouts, refusals, bad chunks
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    if rec["error"] is None:
        if usage is None:
            rec["error"] = "stream without a usage chunk"
        else:
            rec["tokens"], rec["prompt_tokens"] = usage["completion_tokens"], usage["prompt_tokens"]
            if rec["prompt_tokens"] != len(ids):
                rec["error"] = f"{rec['prompt_tokens']} prompt tokens, sent {len(ids)}"
            elif rec["tokens"] != output_len:
                rec["error"] = f"{rec['tokens']} output tokens, expected {output_len}"
    origin = start if t0 is None else t0
    for k in ("start_s", "first_s", "last_s"):
        if rec[k] is not None:
            rec[k] -= origin
    if token_times is not None:
        token_times[:] = [(t - origin, n) for t, n in token_times]
    return rec
