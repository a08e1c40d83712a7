"""The user-workflow examples on the CPU: document builder, scorer, /metrics parsing, and
both example clients against small in-process servers that speak SGLang's HTTP protocols.

The fake servers answer from the document's facts, stream with real delays and record what
they receive, so the tests check what the clients send (shared prefix, growing
conversations) and that their timing arithmetic reflects the stream.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pariskv_tools.workloads import documents, prom, smollm2
from sglang_pariskv.metrics import BatchCounts, ParisKVMetrics
from tests.loopback_server import LoopbackServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES.parent / "benchmarks"))

import server_process  # noqa: E402
import workflow_runs  # noqa: E402


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class WhitespaceTokenizer:
    """Stand-in tokenizer: one token per whitespace-separated word."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [0] * len(text.split())


def _smollm2_tokenizer():
    """SmolLM2's tokenizer if the converted model is cached already (never downloads)."""
    hf_dir = smollm2.cache_root() / smollm2.HF_DIR_NAME
    if not smollm2._is_complete(hf_dir):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module", params=["smollm2", "whitespace"])
def tok(request):
    if request.param == "whitespace":
        return WhitespaceTokenizer()
    t = _smollm2_tokenizer()
    if t is None:
        pytest.skip("SmolLM2 not cached (run `python -m pariskv_tools.demo` once)")
    return t


def _ntok(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


# --------------------------------------------------------------------------- documents


@pytest.mark.parametrize("target", [2000, 16000, 100000])
def test_document_size_and_fact_depths(tok, target):
    doc = documents.build_document(target, n_facts=5, seed=3, tokenizer=tok)
    measured = _ntok(tok, doc.text)
    assert doc.exact and doc.n_tokens == measured
    assert abs(measured - target) <= max(10, 0.002 * target)
    assert [f.depth for f in doc.facts] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    for f in doc.facts:
        assert doc.text.count(f.sentence) == 1
        assert f.sentence == f"The access code of vault {f.vault} is {f.code}."
        before = _ntok(tok, doc.text[: doc.text.index(f.sentence)])
        assert before / measured == pytest.approx(f.depth, abs=0.01)
        assert f.actual_depth == pytest.approx(before / measured, abs=0.002)
    # the codes are the only numbers, so an answer's first number is unambiguous
    assert sorted(re.findall(r"\d+", doc.text)) == sorted(f.code for f in doc.facts)
    assert len({f.vault for f in doc.facts}) == 5


def test_document_without_tokenizer_is_estimated():
    doc = documents.build_document(20000, n_facts=3, seed=1)
    assert not doc.exact
    assert abs(doc.n_tokens - 20000) <= 20
    assert doc.n_tokens == round(len(doc.text) / documents.CHARS_PER_TOKEN)
    real = _smollm2_tokenizer()
    if real is not None:  # the estimate is calibrated on SmolLM2's tokenizer
        assert _ntok(real, doc.text) == pytest.approx(20000, rel=0.03)


def test_document_is_a_function_of_its_arguments():
    a = documents.build_document(5000, 4, seed=7)
    assert a == documents.build_document(5000, 4, seed=7)
    b = documents.build_document(5000, 4, seed=8)
    assert a.text != b.text
    c = documents.build_document(5000, 2, seed=7, depths=[0.0, 1.0])
    assert c.text.startswith(c.facts[0].sentence) and c.text.endswith(c.facts[1].sentence)


def test_document_rejects_bad_arguments():
    with pytest.raises(ValueError, match="no room"):
        documents.build_document(20, n_facts=4)
    with pytest.raises(ValueError, match="depths"):
        documents.build_document(5000, n_facts=2, depths=[0.5])
    with pytest.raises(ValueError, match="n_facts"):
        documents.build_document(5000, n_facts=0)


def test_questions_cover_distinct_vaults_then_cycle():
    doc = documents.build_document(3000, n_facts=4, seed=2)
    qs = documents.make_questions(doc, 4, seed=5)
    codes = {f.vault: f.code for f in doc.facts}
    assert sorted(q.vault for q in qs) == sorted(codes)
    assert all(q.answer == codes[q.vault] for q in qs)
    assert all(f"vault {q.vault}?" in q.text and q.answer not in q.text for q in qs)
    more = documents.make_questions(doc, 10, seed=5)
    assert [q.vault for q in more[:4]] == [q.vault for q in qs]
    assert [q.vault for q in more[4:8]] == [q.vault for q in qs]


@pytest.mark.parametrize(
    "text,grade",
    [
        (" 48213.", "correct"),
        ("The access code of vault amber is 48213.", "correct"),
        (" 48,213", "correct"),
        (" 48214.", "wrong"),
        (" 4821", "wrong"),
        (" 482130", "wrong"),
        ("12345 or maybe 48213", "wrong"),  # the first number counts
        (" the code is hidden in the text", "no_answer"),
        ("", "no_answer"),
        ("\ufffd\ufffd<|im_end|>", "no_answer"),
    ],
)
def test_grade(text, grade):
    assert documents.grade(text, "48213") == grade


# --------------------------------------------------------------------------- /metrics

_TRICKY = 'dir/"quoted" {braces} a\\b'


def _metrics_text() -> str:
    """Exposition text of real ParisKV counters with two label sets (two TP ranks)."""
    reg = CollectorRegistry()
    m = ParisKVMetrics({"model_name": _TRICKY, "tp_rank": "0"}, registry=reg)
    m.add(BatchCounts(tokens_encoded=1000, prefix_tokens_reused=6000))
    m.add(BatchCounts(sparse_request_steps=3, attended_tokens=600, context_tokens=24000))
    m.labels = {"model_name": _TRICKY, "tp_rank": "1"}
    m.add(BatchCounts(tokens_encoded=250, prefix_tokens_reused=1500, dense_request_steps=2))
    return generate_latest(reg).decode()


def test_parse_sums_label_sets():
    text = _metrics_text()
    assert 'tp_rank="1"' in text and "_created" in text  # the parser meets both
    got = prom.parse(text)
    assert got["sglang:pariskv_tokens_encoded_total"] == 1250
    assert got["sglang:pariskv_prefix_tokens_reused_total"] == 7500
    assert got["sglang:pariskv_sparse_request_steps_total"] == 3
    assert got["sglang:pariskv_dense_request_steps_total"] == 2
    assert got["sglang:pariskv_attended_fraction"] == pytest.approx(600 / 24000)
    assert not any(k.endswith("_created") for k in got)
    # agrees with prometheus_client's own parser
    ref: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.name.endswith("_created"):
                ref[s.name] = ref.get(s.name, 0.0) + s.value
    assert got == ref


def test_parse_filters_and_rejects_garbage():
    text = '# HELP x y\nother_metric_total 5\nsglang:pariskv_a_total{l="}"} 2 1700000000\n'
    assert prom.parse(text) == {"sglang:pariskv_a_total": 2.0}
    assert prom.parse(text, prefix="other") == {"other_metric_total": 5.0}
    with pytest.raises(ValueError):
        prom.parse('sglang:pariskv_a_total{l="x} 2\n')
    assert prom.delta({"a_total": 1.0}, {"a_total": 4.0, "b_total": 2.0}) == {
        "a_total": 3.0,
        "b_total": 2.0,
    }
    p = prom.PREFIX
    before = {f"{p}attended_tokens_total": 10.0, f"{p}context_tokens_total": 100.0}
    after = {f"{p}attended_tokens_total": 30.0, f"{p}context_tokens_total": 500.0}
    after[f"{p}attended_fraction"] = 0.9  # a gauge: the last batch's value, not a delta
    assert prom.delta(before, after)[f"{p}attended_fraction"] == 20.0 / 400.0
    assert prom.delta({"a": 1.0}, None) == {}


def test_scrape_reads_metrics_and_reports_missing_endpoint():
    text = _metrics_text().encode()

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/metrics":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *a):
            pass

    srv = LoopbackServer(H)
    try:
        assert prom.scrape(srv.url)["sglang:pariskv_tokens_encoded_total"] == 1250
        assert prom.scrape(srv.url + "/nometrics") is None  # 404: metrics not enabled
    finally:
        srv.close()


# --------------------------------------------------------------------------- fake servers

TTFT_S = 0.15
ITL_S = 0.03
N_OUT = 6


def _answer_for(text: str, doc: documents.Document, wrong_vault: str) -> str:
    """The fake model: the code of the last vault asked about (wrong for one vault)."""
    vault = re.findall(r"code of vault (\w+)\?", text)[-1]
    code = next(f.code for f in doc.facts if f.vault == vault)
    if vault == wrong_vault:
        code = str(int(code) + 1)
    return code


def _pieces(code: str) -> list[str]:
    """N_OUT streamed tokens spelling the answer."""
    return [" ", code[:2], code[2:], ".", " OK", "!"][:N_OUT]


class _Chunked:
    """Write an HTTP/1.1 chunked body, one chunk per call (like uvicorn's streaming)."""

    def __init__(self, handler):
        self.h = handler

    def write(self, data: bytes):
        self.h.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.h.wfile.flush()

    def close(self):
        self.h.wfile.write(b"0\r\n\r\n")
        self.h.wfile.flush()


def _start_stream(handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    return _Chunked(handler)


def _fake_sglang(doc, wrong_vault, log, first_chunk=1):
    """SGLang's native API as RuntimeEndpoint uses it: /get_model_info and /generate; the
    first ``first_chunk`` tokens come in one chunk, when the last of them is due (SGLang
    streaming to a client that fell behind)."""

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _json(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            assert self.path == "/get_model_info", self.path
            self._json({"model_path": "fake/SmolLM2-135M-Instruct", "is_generation": True})

        def do_POST(self):
            assert self.path == "/generate", self.path
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            log.append(req)
            text = req["text"]
            n_prompt = len(text.split())
            if req["sampling_params"].get("max_new_tokens") == 0:
                meta = {"prompt_tokens": n_prompt, "completion_tokens": 0, "cached_tokens": 0}
                self._json({"text": "", "meta_info": meta})
                return
            assert req.get("stream") is True  # TimedEndpoint streams every gen
            out = _start_stream(self)
            time.sleep(TTFT_S)
            acc = ""
            for i, piece in enumerate(_pieces(_answer_for(text, doc, wrong_vault))):
                if i:
                    time.sleep(ITL_S)
                acc += piece
                if i + 1 < first_chunk:
                    continue
                meta = {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": i + 1,
                    "cached_tokens": n_prompt - 40,
                }
                out.write(f"data: {json.dumps({'text': acc, 'meta_info': meta})}\n\n".encode())
            out.write(b"data: [DONE]\n\n")
            out.close()

    return LoopbackServer(H)


@pytest.fixture(scope="module")
def qa_example():
    return _load_example("long_document_qa")


@pytest.mark.parametrize("first_chunk", [1, 3])
def test_frontend_forks_share_the_document_prefix(qa_example, first_chunk):
    doc = documents.build_document(3000, n_facts=4, seed=11)
    questions = documents.make_questions(doc, 3, seed=11)
    wrong = questions[1].vault
    log: list[dict] = []
    srv = _fake_sglang(doc, wrong, log, first_chunk)
    try:
        res = qa_example.run_fork_qa(srv.url, doc, questions, max_tokens=12)
    finally:
        srv.close()

    # fork() first commits the shared part (one prefill), then one request per branch
    assert len(log) == 1 + len(questions)
    prefix = log[0]["text"]
    assert log[0]["sampling_params"]["max_new_tokens"] == 0
    assert prefix.startswith("<|im_start|>system\n" + documents.SYSTEM_PROMPT)
    assert doc.text in prefix and "What is the access code" not in prefix
    asked = []
    for req in log[1:]:
        assert req["text"].startswith(prefix)
        tail = req["text"][len(prefix) :]
        assert tail.count("What is the access code") == 1
        asked.append(re.search(r"vault (\w+)\?", tail).group(1))
        q = next(q for q in questions if q.vault == asked[-1])
        assert tail.endswith(f"<|im_start|>assistant\n{q.answer_prefix}")
        sp = req["sampling_params"]
        assert sp["max_new_tokens"] == 12 and sp["temperature"] == 0
        assert "\n" in sp["stop"] and "<|im_end|>" in sp["stop"]
    assert sorted(asked) == sorted(q.vault for q in questions)

    # answers come back in question order and are graded
    assert [r["vault"] for r in res["answers"]] == [q.vault for q in questions]
    assert [r["grade"] for r in res["answers"]] == [
        "wrong" if q.vault == wrong else "correct" for q in questions
    ]
    assert res["correct"] == len(questions) - 1
    assert res["answers"][0]["answer"].startswith(" " + questions[0].answer[:2])
    # timings follow the stream: TTFT >= the server's delay, decode rate = 1 / ITL
    for r in res["answers"]:
        assert TTFT_S * 1000 <= r["fork_ttft_ms"] < TTFT_S * 1000 + 150
        assert 0.6 / ITL_S < r["decode_tok_s"] <= 1.1 / ITL_S  # a lagging first chunk: a few ms
        assert r["completion_tokens"] == N_OUT and r["first_chunk_tokens"] == first_chunk
    assert res["ttft_ms"] >= TTFT_S * 1000
    assert res["completion_tokens"] == N_OUT * len(questions)


def _fake_openai(doc, wrong_vault, log, first_chunk=1):
    """/v1/models and streamed /v1/chat/completions as SGLang streams them: a role chunk
    without usage, then the usage so far in every chunk (``continuous_usage_stats``), and a
    final usage chunk; the first ``first_chunk`` tokens come in one chunk, right after the
    role chunk, when the last of them is due."""

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "fake-model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            assert self.path == "/v1/chat/completions", self.path
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            log.append(req)
            assert req["stream"] is True
            assert req["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
            prompt = " ".join(m["content"] for m in req["messages"])
            out = _start_stream(self)

            n = len(prompt.split())

            def send(obj, done=None):
                if done is not None:
                    obj["usage"] = {"prompt_tokens": n, "completion_tokens": done}
                out.write(f"data: {json.dumps(obj)}\n\n".encode())

            time.sleep(TTFT_S + (first_chunk - 1) * ITL_S)
            send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            pieces = _pieces(_answer_for(prompt, doc, wrong_vault))
            for i, piece in enumerate(pieces[first_chunk - 1 :], start=first_chunk - 1):
                if i >= first_chunk:
                    time.sleep(ITL_S)
                text = "".join(pieces[: i + 1]) if i == first_chunk - 1 else piece
                send({"choices": [{"index": 0, "delta": {"content": text}}]}, i + 1)
            send({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, N_OUT)
            usage = {
                "prompt_tokens": n,
                "completion_tokens": N_OUT,
                "prompt_tokens_details": {"cached_tokens": n - 30},
            }
            out.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            out.write(b"data: [DONE]\n\n")
            out.close()

    return LoopbackServer(H)


@pytest.fixture(scope="module")
def chat_example():
    return _load_example("shared_prefix_chat")


@pytest.mark.parametrize("first_chunk", [1, 3])
def test_chat_conversations_grow_and_timings_follow_the_stream(chat_example, first_chunk):
    doc = documents.build_document(2000, n_facts=4, seed=4)
    wrong = doc.facts[2].vault
    log: list[dict] = []
    srv = _fake_openai(doc, wrong, log, first_chunk)
    users, turns = 3, 3
    try:
        t0 = time.perf_counter()
        res = chat_example.run_chat_workload(srv.url, doc, users, turns, max_tokens=20, seed=1)
        wall = time.perf_counter() - t0
    finally:
        srv.close()

    assert res["model"] == "fake-model" and len(log) == users * turns
    # users ran concurrently: about one user's turns, not all of them, in sequence
    one_request = TTFT_S + (N_OUT - 1) * ITL_S
    assert wall < (users * turns - 1) * one_request
    system = log[0]["messages"][0]
    assert system["role"] == "system" and doc.text in system["content"]
    by_user: dict[int, list[dict]] = {}
    for r in res["requests"]:
        by_user.setdefault(r["user"], []).append(r)
    sent = {tuple(json.dumps(m) for m in req["messages"]) for req in log}
    for u, recs in by_user.items():
        assert [r["turn"] for r in recs] == list(range(turns))
        history = [system]
        for r in recs:
            history = history + [
                {
                    "role": "user",
                    "content": next(
                        q.text
                        for q in documents.make_questions(doc, turns, seed=1000 + u)
                        if q.vault == r["vault"]
                    ),
                }
            ]
            # turn t resends the shared system prompt and all earlier turns of this user
            assert tuple(json.dumps(m) for m in history) in sent
            assert r["messages"] == len(history)
            history = history + [{"role": "assistant", "content": r["text"]}]
            assert r["grade"] == ("wrong" if r["vault"] == wrong else "correct")
            assert TTFT_S * 1000 <= r["ttft_ms"] < TTFT_S * 1000 + 150
            assert 0.6 / ITL_S < r["decode_tok_s"] <= 1.1 / ITL_S  # a lagging first chunk: a few ms
            assert r["completion_tokens"] == N_OUT and r["cached_tokens"] > 0
            assert r["first_chunk_tokens"] == first_chunk
    assert all(req["max_tokens"] == 20 and req["temperature"] == 0 for req in log)
    assert res["correct"] == sum(r["vault"] != wrong for r in res["requests"])
    assert res["completion_tokens"] == N_OUT * users * turns
    assert TTFT_S * 1000 <= res["ttft_ms_median"] < TTFT_S * 1000 + 150
    assert len(res["ttft_ms_median_by_turn"]) == turns


def test_chat_reports_server_errors(chat_example):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.send_error(400, "context too long")

    srv = LoopbackServer(H)
    try:
        doc = documents.build_document(500, n_facts=2, seed=0)
        with pytest.raises(RuntimeError, match="user"):
            chat_example.run_chat_workload(srv.url, doc, 2, 2, model="m")
    finally:
        srv.close()


# --------------------------------------------------------------------------- the bench

#: A stand-in for ``python -m sglang.launch_server`` (run as ``python -c``): the endpoints
#: the bench and both examples use, a model that answers from the document, and ParisKV
#: counters on /metrics and in the stats dir when started with --enable-pariskv (unless
#: FAKE_PARISKV_BROKEN is set: the plugin "not installed" case).
FAKE_SERVER = r"""
import json, os, re, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port = int(sys.argv[sys.argv.index("--port") + 1])
pariskv = "--enable-pariskv" in sys.argv and not os.environ.get("FAKE_PARISKV_BROKEN")
flag = "--pariskv-stats-dir"
STATS_DIR = sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else None
t_start = time.time()
lock = threading.Lock()
counts = {"tokens_encoded": 0, "prefix_tokens_reused": 0, "sparse_request_steps": 0}
cache = set()

def account(text, n_out):
    words = text.split()
    hit = max((len(p) for p in cache if words[: len(p)] == list(p)), default=0)
    with lock:
        cache.add(tuple(words))
        if pariskv:
            counts["tokens_encoded"] += len(words) - hit + n_out
            counts["prefix_tokens_reused"] += hit
            counts["sparse_request_steps"] += n_out
            d = STATS_DIR
            if d:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, f"pariskv-tp0-{os.getpid()}.json"), "w") as f:
                    json.dump(counts, f)
    return len(words), hit

def answer(text):
    vault = re.findall(r"code of vault (\w+)\?", text)
    m = vault and re.search(rf"vault {vault[-1]} is (\d+)\.", text)
    return [" ", m.group(1)[:2], m.group(1)[2:], "."] if m else [" I", " do", " not", " know"]

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def _send(self, code, body, ctype="application/json"):
        body = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def _stream(self, events):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for e in events + ["[DONE]"]:
            time.sleep(0.005)
            data = ("data: " + (e if isinstance(e, str) else json.dumps(e)) + "\n\n").encode()
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
    def do_GET(self):
        if self.path == "/health_generate":
            return self._send(200 if time.time() - t_start > 0.3 else 503, "{}")
        if self.path == "/get_model_info":
            return self._send(200, json.dumps({"model_path": "fake", "is_generation": True}))
        if self.path == "/v1/models":
            return self._send(200, json.dumps({"data": [{"id": "fake"}]}))
        if self.path == "/server_info":
            return self._send(200, json.dumps({"chunked_prefill_size": 8192, "version": "x"}))
        if self.path == "/metrics":
            lines = ["# TYPE sglang:num_requests_total counter", "sglang:num_requests_total 1"]
            if pariskv:
                for k, v in counts.items():
                    lines.append(f'sglang:pariskv_{k}_total{{tp_rank="0"}} {v}')
            return self._send(200, "\n".join(lines) + "\n", "text/plain")
        self._send(404, "{}")
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/flush_cache"):
            cache.clear()
            return self._send(200, "flushed")
        req = json.loads(body)
        if self.path == "/generate":
            text = req["text"]
            if req["sampling_params"].get("max_new_tokens") == 0:
                n, hit = account(text, 0)
                return self._send(200, json.dumps({"text": "", "meta_info": {}}))
            pieces = answer(text)
            n, hit = account(text, len(pieces))
            acc, events = "", []
            for i, p in enumerate(pieces):
                acc += p
                meta = {"prompt_tokens": n, "completion_tokens": i + 1, "cached_tokens": hit}
                events.append({"text": acc, "meta_info": meta})
            return self._stream(events)
        if self.path == "/v1/chat/completions":
            text = " ".join(m["content"] for m in req["messages"])
            pieces = answer(text)
            n, hit = account(text, len(pieces))
            events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
            events += [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
            events.append({"choices": [], "usage": {"prompt_tokens": n,
                "completion_tokens": len(pieces), "prompt_tokens_details": {"cached_tokens": hit}}})
            return self._stream(events)
        self._send(404, "{}")

srv = ThreadingHTTPServer(("127.0.0.1", port), H)
srv.daemon_threads = True
srv.serve_forever()
"""


@pytest.fixture
def bench(monkeypatch):
    if _smollm2_tokenizer() is None:
        pytest.skip("SmolLM2 not cached (run `python -m pariskv_tools.demo` once)")
    spec = importlib.util.spec_from_file_location(
        "bench_workflows", EXAMPLES.parent / "benchmarks" / "bench_workflows.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(server_process, "HEALTH_POLL_S", 0.1)
    monkeypatch.setattr(server_process, "STOP_GRACE_S", 0.0)
    real_cmd = workflow_runs._server_cmd

    def fake_cmd(model, port, cfg, pariskv, extra, stats_dir=None):
        cmd = real_cmd(model, port, cfg, pariskv, extra, stats_dir)
        return [sys.executable, "-c", FAKE_SERVER, *cmd[3:]]  # same flags, fake server

    monkeypatch.setattr(workflow_runs, "_server_cmd", fake_cmd)
    return mod


def _bench_args(tmp_path):
    """What ``run --setup smollm2`` parses, scaled down to seconds."""
    import argparse

    return argparse.Namespace(
        setup="smollm2",
        doc_tokens=1500,
        rounds=2,
        questions=2,
        users=2,
        turns=2,
        health_timeout=30.0,
        log_dir=str(tmp_path / "logs"),
        out=tmp_path / "w.json",
        server_arg=[],
        warm_only=False,
    )


def test_bench_runs_both_servers_and_writes_results(bench, tmp_path):
    ns = _bench_args(tmp_path)
    section = workflow_runs.run_setup("smollm2", ns)
    bench._write("smollm2", section, ns.out)
    data = json.loads(ns.out.read_text())
    assert "frontend_fork_qa" in data["ttft_definition"]
    sec = data["setups"]["smollm2"]
    # the flags after the fake server's script are the real command's
    cmds = {m: c.split(FAKE_SERVER)[-1].split() for m, c in sec["server_commands"].items()}
    for c in cmds.values():
        c[c.index("--port") + 1] = "PORT"  # each server gets its own free port
    assert "--enable-pariskv" in cmds["pariskv"] and "--enable-pariskv" not in cmds["dense"]
    assert cmds["pariskv"][: len(cmds["dense"])] == cmds["dense"]  # ParisKV is the only change
    added = cmds["pariskv"][len(cmds["dense"]) :]
    assert added[-2] == "--pariskv-stats-dir" and added[-1].endswith("smollm2-pariskv-stats")
    assert " ".join(added[:-2]) == (
        "--enable-pariskv --pariskv-topk 100 --pariskv-sink 32 --pariskv-local 64 "
        "--pariskv-dense-threshold 1024 --pariskv-min-sparse-tokens 0"
    )
    for flag in ("--enable-metrics", "--enable-cache-report", "--attention-backend"):
        assert flag in cmds["dense"]
    assert sec["server_info"]["dense"]["chunked_prefill_size"] == 8192
    for wf in ("frontend_fork_qa", "shared_prefix_chat"):
        w = sec["workflows"][wf]
        assert w["answers_match_dense"] is True and w["answer_agreement"] == 1.0
        assert w["dense_correct"] == w["pariskv_correct"] == w["n_questions"] == 4
        assert w["dense_ttft_ms"] > 0 and w["pariskv_ttft_ms"] > 0
        assert w["dense_tok_s"] > 0 and w["pariskv_tok_s"] > 0
        # counters are this workflow's deltas: the warm-up's are not in them
        assert (
            w["prefix_tokens_encoded"]
            == w["pariskv_counters"]["sglang:pariskv_tokens_encoded_total"]
        )
        assert w["prefix_tokens_reused"] > 0
    fq = sec["workflows"]["frontend_fork_qa"]
    # per round: the document once, then 2 branches that reuse it
    assert fq["radix_cached_tokens"]["pariskv"] > 2 * 2 * 1000
    assert sec["pariskv_ran"]["pariskv_sparse_request_steps"] > 0
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert "smollm2-dense.log" in logs and "smollm2-pariskv.log" in logs
    png = bench.plot(ns.out)
    assert png.exists() and png.stat().st_size > 10_000


def test_bench_refuses_when_pariskv_did_not_run(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_PARISKV_BROKEN", "1")
    ns = _bench_args(tmp_path)
    with pytest.raises(RuntimeError, match="refusing to write results"):
        workflow_runs.run_setup("smollm2", ns)
    assert not ns.out.exists()


def test_bench_warm_only_measures_nothing(bench, tmp_path):
    ns = _bench_args(tmp_path)
    ns.warm_only = True
    assert workflow_runs.run_setup("smollm2", ns) == {}
    assert not ns.out.exists()
    logs = (tmp_path / "logs" / "smollm2-pariskv.log").read_text()
    assert logs.startswith("$ ") and "--enable-pariskv --pariskv-topk 100" in logs  # command


def test_bench_server_failure_shows_log_tail(bench, tmp_path):
    srv = server_process.Server(
        "broken",
        [
            sys.executable,
            "-c",
            "print('CUDA out of memory (fake)'); raise SystemExit(3)",
            "--port",
            "1",
        ],
        tmp_path / "broken.log",
        dict(__import__("os").environ),
    )
    with pytest.raises(RuntimeError, match=r"exited with code 3(.|\n)*CUDA out of memory"):
        srv.start(health_timeout=20)


@pytest.mark.parametrize("setup", ["smollm2", "llama8b-dummy"])
def test_bench_server_commands_parse_with_sglang_and_the_plugin(setup):
    """Every flag the bench passes exists in the installed SGLang (+ the plugin's) and means what
    the bench intends; the two servers differ only in the ParisKV flags."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    from sglang_pariskv import server_flags

    cfg = workflow_runs.SETUPS[setup]
    parsed = {}
    for pariskv in (False, True):
        cmd = server_process._server_cmd("/m", 31234, cfg, pariskv, ["--log-level", "warning"])
        assert cmd[1:3] == ["-m", "sglang.launch_server"]
        p = argparse.ArgumentParser()
        ServerArgs.add_cli_args(p)
        server_flags.add_cli_args(p)
        parsed[pariskv] = a = p.parse_args(cmd[3:])
        assert a.port == 31234 and a.enable_metrics and a.enable_cache_report
        assert a.attention_backend == "flashinfer" and a.log_level == "warning"
        assert a.context_length == cfg["context_length"]
        assert a.load_format == ("dummy" if setup == "llama8b-dummy" else "auto")
    assert not parsed[False].enable_pariskv and parsed[True].enable_pariskv
    assert server_flags.config_from_args(parsed[True]).to_dict().items() >= cfg["pariskv"].items()
    diff = {k for k, v in vars(parsed[True]).items() if vars(parsed[False]).get(k) != v}
    assert diff == {"enable_pariskv"} | {f"pariskv_{k}" for k in cfg["pariskv"]}
    # the document fits the context with room for the instructions, questions and answers
    assert cfg["doc_tokens"] + 1000 < cfg["context_length"]
