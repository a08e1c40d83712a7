"""An in-process stand-in for SGLang's streamed ``/v1/completions`` (token-id prompts), for
the tests of the benchmarks' OpenAI client."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

from tests.loopback_server import LoopbackServer

#: How the fake answers a request: ((time to first token, time per later token) in
#: seconds, and a failure, a variation or None). Failures: "error_chunk", "http_500",
#: "short" (one token too few), "no_usage", "prompt" (one prompt token more in the usage),
#: "hang" (no token for 2 s). Variations: "coalesced" (the first chunk comes when the
#: third token is due and holds the first three, as SGLang streams a client that fell
#: behind), "no_running_usage" (no usage in the token chunks even when asked for);
#: variations combine with "+".
Plan = Callable[[dict], tuple[tuple[float, float], str | None]]


def fake_completions(log: list, plan: Plan) -> LoopbackServer:
    """One chunk per token (text ``" w<k>"``, the last with finish_reason "length"; with
    ``stream_options.continuous_usage_stats``, each with the usage so far), the usage chunk
    (``stream_options.include_usage``), ``[DONE]``; chunked transfer as uvicorn sends it.
    ``log`` receives ``{"req": body, "received": perf_counter}`` per request."""

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _write(self, data: bytes):
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _data(self, obj: dict):
            self._write(f"data: {json.dumps(obj)}\n\n".encode())

        def do_POST(self):
            try:
                self._answer()
            except (BrokenPipeError, ConnectionResetError):  # the client gave up ("hang")
                pass

        def _answer(self):
            received = time.perf_counter()
            assert self.path == "/v1/completions", self.path
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            log.append({"req": req, "received": received})
            (ttft, itl), fail = plan(req)
            if fail == "http_500":
                self.send_error(500, "scheduler died")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            n = req["max_tokens"] - (fail == "short")
            time.sleep(2.0 if fail == "hang" else ttft)
            if fail == "error_chunk":
                self._data({"error": {"message": "out of memory", "code": 400}})
            else:
                running = (req.get("stream_options") or {}).get("continuous_usage_stats")
                variations = set((fail or "").split("+"))
                running = running and not variations & {"no_running_usage", "no_usage"}
                first = 3 if "coalesced" in variations else 1
                for k in range(first, n + 1):
                    time.sleep(itl * (k - 1) if k == first else itl)
                    fin = "length" if k == n else None
                    text = "".join(f" w{j}" for j in range(1 if k == first else k, k + 1))
                    chunk = {"choices": [{"index": 0, "text": text, "finish_reason": fin}]}
                    if running:
                        usage = {"prompt_tokens": len(req["prompt"]), "completion_tokens": k}
                        chunk["usage"] = usage
                    self._data(chunk)
                if fail != "no_usage":
                    prompt = len(req["prompt"]) + (fail == "prompt")
                    usage = {"prompt_tokens": prompt, "completion_tokens": n}
                    self._data({"choices": [], "usage": usage})
            self._write(b"data: [DONE]\n\n")
            self._write(b"")

    return LoopbackServer(H)
