"""benchmarks/openai_stream.py: the word tokenizer of dummy models, and the streamed completion
client against an in-process server that streams as SGLang's ``/v1/completions`` does."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import openai_stream  # noqa: E402
import traffic_stats  # noqa: E402

from tests.fake_completions import fake_completions

OUT = 6
TTFT, ITL = 0.08, 0.02  # the fake server's delays, seconds


def test_the_word_tokenizer_round_trips_token_ids(tmp_path):
    """The prompt text of ids tokenizes back to exactly those ids, through the chat
    template too (which adds nothing), and ids decode to one word each."""
    from transformers import AutoTokenizer

    openai_stream.write_word_tokenizer(tmp_path, 1000, bos_id=998, eos_id=999)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = [5, 0, 997, 17, 17, 400]
    text = openai_stream.prompt_text(ids)
    # SGLang encodes the rendered chat with or without special tokens: neither adds any
    assert tok.encode(text, add_special_tokens=False) == tok.encode(text) == ids
    msgs = [{"role": "user", "content": text}]
    assert list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]) == ids
    assert tok.decode([5, 17, 400]).split() == ["w5", "w17", "w400"]
    assert len(tok) == 1000 and tok.eos_token_id == 999 and tok.bos_token_id == 998
    with pytest.raises(ValueError, match="eos token id 1000 is outside"):
        openai_stream.write_word_tokenizer(tmp_path, 1000, bos_id=1, eos_id=1000)


@pytest.mark.parametrize("shape", ["llama", "qwen2"])
def test_a_dummy_models_tokenizer_serves_text_and_ids(shape):
    """Loaded as SGLang loads it (``--tokenizer-path`` of the dummy model's flags), the
    word tokenizer keeps ids and gives text tokens, whatever the model type: next to a
    qwen2 ``config.json`` transformers would build its Qwen2 tokenizer, which turns SGLang's
    warm-up text into no tokens."""
    import shutil

    import bench_million_tokens
    from server_process import serve_model
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer

    config = bench_million_tokens.model_config(4096) if shape == "qwen2" else None
    model, _, flags = serve_model(None, 4096, config)
    try:
        assert flags[:2] == ["--load-format", "dummy"] and flags[2] == "--tokenizer-path"
        tok = get_tokenizer(flags[3])
        assert tok.encode(openai_stream.prompt_text([5, 6, 700])) == [5, 6, 700]
        assert len(tok("The capital city of France is").input_ids) == 6
    finally:
        shutil.rmtree(model)


def _fake_completions(log: list, fail: str | None = None):
    """:func:`fake_completions` answering every request after TTFT, then every ITL."""
    return fake_completions(log, lambda req: ((TTFT, ITL), fail))


def test_a_streamed_completion_is_timed_token_by_token():
    log: list = []
    srv = _fake_completions(log)
    times: list = []
    try:
        rec = openai_stream.stream_completion(srv.url, [3, 1, 4, 1, 5], OUT, 10, token_times=times)
    finally:
        srv.close()
    (req,) = [e["req"] for e in log]
    assert req["prompt"] == [3, 1, 4, 1, 5]
    assert req["max_tokens"] == OUT and req["ignore_eos"] is True and req["stream"] is True
    assert req["temperature"] == 0.0
    assert req["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert rec["error"] is None and rec["tokens"] == OUT and rec["prompt_tokens"] == 5
    assert rec["start_s"] == 0.0
    assert TTFT <= rec["first_s"] < TTFT + 0.05
    # (the first chunk's arrival can lag its send by a few ms on a loaded machine)
    assert (OUT - 1) * ITL - 0.01 <= rec["last_s"] - rec["first_s"] < (OUT - 1) * ITL + 0.05
    assert [n for _, n in times] == list(range(1, OUT + 1))
    assert times[0][0] == rec["first_s"] and times[-1][0] == rec["last_s"]
    assert rec["first_tokens"] == 1


@pytest.mark.parametrize("variation", ["coalesced", "coalesced+no_running_usage"])
def test_a_first_chunk_of_several_tokens_is_counted_as_such(variation):
    """A server that coalesced the first three tokens into one chunk (a lagging client):
    the time per output token is still the server's, not (OUT - 1) / (OUT - 3) of it,
    whether the count comes from the server's running usage or from the words streamed."""
    srv = fake_completions([], lambda req: ((TTFT, ITL), variation))
    times: list = []
    try:
        rec = openai_stream.stream_completion(srv.url, [1, 2], OUT, 10, token_times=times)
    finally:
        srv.close()
    assert rec["error"] is None and rec["tokens"] == OUT
    assert rec["first_tokens"] == 3
    assert [n for _, n in times] == list(range(3, OUT + 1))
    assert TTFT + 2 * ITL <= rec["first_s"] < TTFT + 2 * ITL + 0.05
    assert ITL - 0.004 <= traffic_stats.tpot_s(rec) < ITL + 0.01


@pytest.mark.parametrize(
    "fail,match",
    [
        ("error_chunk", "server error.*out of memory"),
        ("http_500", "HTTP 500"),
        ("short", f"{OUT - 1} output tokens, expected {OUT}"),
        ("no_usage", "without a usage chunk"),
        ("prompt", "4 prompt tokens, sent 3"),
        ("hang", "TimeoutError|timed out"),
    ],
)
def test_a_failed_completion_says_why(fail, match):
    srv = _fake_completions([], fail)
    try:
        rec = openai_stream.stream_completion(srv.url, [1, 2, 3], OUT, timeout=0.5)
    finally:
        srv.close()
    assert rec["error"] is not None and re.search(match, rec["error"])


def test_the_client_talks_to_loopback_only():
    with pytest.raises(ValueError, match="127.0.0.1"):
        openai_stream.stream_completion("http://localhost:30000", [1], OUT, 1.0)
