"""benchmarks/openai_stream.py: the word tokenizer of dummy models, and the streamed completion
client against an in-process server that streams as SGLang's ``/v1/completions`` does."""

from __future__ import annotations

import json
import re
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import openai_stream  # noqa: E402

from tests.loopback_server import LoopbackServer

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


def _fake_completions(log: list, fail: str | None = None):
    """SGLang's streamed completion: one chunk per token (" w<k>"), the last with
    finish_reason "length", the usage chunk (``stream_options.include_usage``), ``[DONE]``.
    ``fail``: "error_chunk", "http_500", "short" (one token too few), "no_usage", "prompt"
    (reports one prompt token more), "hang" (no token for 2 s)."""

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _write(self, data: bytes):
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _chunk(self, text: str, finish=None, usage=None, choices=True):
            body = {"id": "c", "object": "text_completion", "usage": usage,
                    "choices": [{"index": 0, "text": text, "logprobs": None,
                                 "finish_reason": finish}] if choices else []}  # fmt: skip
            self._write(f"data: {json.dumps(body)}\n\n".encode())

        def do_POST(self):
            try:
                self._answer()
            except (BrokenPipeError, ConnectionResetError):  # the client gave up ("hang")
                pass

        def _answer(self):
            assert self.path == "/v1/completions", self.path
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            log.append(req)
            if fail == "http_500":
                self.send_error(500, "scheduler died")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            prompt = len(req["prompt"]) + (fail == "prompt")
            n = req["max_tokens"] - (fail == "short")
            time.sleep(2.0 if fail == "hang" else TTFT)
            if fail == "error_chunk":
                err = {"error": {"message": "out of memory", "code": 400}}
                self._write(f"data: {json.dumps(err)}\n\n".encode())
            else:
                for k in range(n):
                    if k:
                        time.sleep(ITL)
                    self._chunk(f" w{k + 7}", "length" if k == n - 1 else None)
                if fail != "no_usage":
                    usage = {"prompt_tokens": prompt, "completion_tokens": n,
                             "total_tokens": prompt + n}  # fmt: skip
                    self._chunk("", usage=usage, choices=False)
            self._write(b"data: [DONE]\n\n")
            self._write(b"")

    return LoopbackServer(H)


def test_a_streamed_completion_is_timed_token_by_token():
    log: list = []
    srv = _fake_completions(log)
    times: list = []
    try:
        rec = openai_stream.stream_completion(srv.url, [3, 1, 4, 1, 5], OUT, 10, token_times=times)
    finally:
        srv.close()
    (req,) = log
    assert req["prompt"] == [3, 1, 4, 1, 5]
    assert req["max_tokens"] == OUT and req["ignore_eos"] is True and req["stream"] is True
    assert req["temperature"] == 0.0 and req["stream_options"] == {"include_usage": True}
    assert rec["error"] is None and rec["tokens"] == OUT and rec["prompt_tokens"] == 5
    assert rec["start_s"] == 0.0
    assert TTFT <= rec["first_s"] < TTFT + 0.05
    assert (OUT - 1) * ITL <= rec["last_s"] - rec["first_s"] < (OUT - 1) * ITL + 0.05
    assert [n for _, n in times] == list(range(1, OUT + 1))
    assert times[0][0] == rec["first_s"] and times[-1][0] == rec["last_s"]


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
