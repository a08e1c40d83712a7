"""The benchmarks' client of SGLang's native HTTP API (127.0.0.1 only): a non-streamed
greedy ``/generate``, a stream the client closes mid-way, and the server's load
(``/v1/loads``): free KV tokens and whether it is idle. The soak and the pool fill send
requests through it; streamed requests go through the OpenAI API (``openai_stream``)."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

#: Seconds between polls of /v1/loads while waiting for an idle server.
IDLE_POLL_S = 1.0
#: A stream yields one chunk per decode step (``--stream-interval`` 1) plus a few more;
#: a stream that goes on far past its token count is cut off as an error.
MAX_CHUNKS_PER_TOKEN = 4


class RequestFailed(Exception):
    """A well-formed request that did not complete as asked."""


def sse_chunks(
    resp, output_len: int, start: float, timeout: float, waiting_for: str = "end"
) -> Iterator[tuple[float, dict]]:
    """(arrival time, JSON) of each ``data:`` line of a streamed response of
    ``output_len`` tokens, up to ``[DONE]``. Raises RequestFailed on an error chunk, a
    stream that ends without ``[DONE]`` or goes on far past its token count, and when
    ``timeout`` seconds from ``start`` pass before ``waiting_for`` (the end)."""
    for _ in range(MAX_CHUNKS_PER_TOKEN * output_len + 16):
        if time.perf_counter() - start > timeout:
            raise RequestFailed(f"no {waiting_for} after {timeout:.0f} s")
        raw = resp.readline()
        now = time.perf_counter()
        if not raw:
            raise RequestFailed("stream ended without [DONE]")
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise RequestFailed(f"server error: {json.dumps(chunk['error'])[:300]}")
        yield now, chunk
    raise RequestFailed("stream went on past its token count")


def _check_local(url: str) -> None:
    host = urllib.parse.urlparse(url).hostname
    if host != "127.0.0.1":
        raise ValueError(f"{url}: this client only talks to 127.0.0.1")


def post(url: str, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    """(HTTP status, body); an HTTP error status is returned, not raised."""
    _check_local(url)
    req = urllib.request.Request(
        url + path, data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def sampling(output_len: int, ignore_eos: bool) -> dict:
    return {"max_new_tokens": output_len, "ignore_eos": ignore_eos, "temperature": 0.0}


def generate(
    url: str, ids: list[int], output_len: int, timeout: float, ignore_eos: bool = True
) -> list[int]:
    """One greedy non-streamed ``/generate``; its output ids. Raises RequestFailed."""
    body = json.dumps({"input_ids": ids, "sampling_params": sampling(output_len, ignore_eos)})
    try:
        status, data = post(url, "/generate", body.encode(), timeout)
    except (OSError, ValueError) as e:
        raise RequestFailed(f"{type(e).__name__}: {e}"[:300]) from None
    if status != 200:
        raise RequestFailed(f"HTTP {status}: {data[:300]!r}")
    try:
        out = json.loads(data)
    except ValueError:
        raise RequestFailed(f"not JSON: {data[:300]!r}") from None
    if isinstance(out, list):
        out = out[0]
    finish = out.get("meta_info", {}).get("finish_reason") or {}
    if finish.get("type") == "abort":
        raise RequestFailed(f"aborted: {json.dumps(finish)[:300]}")
    got = out.get("output_ids")
    if not isinstance(got, list):
        raise RequestFailed(f"no output_ids in {data[:300]!r}")
    if ignore_eos and len(got) != output_len:
        raise RequestFailed(f"{len(got)} output tokens, expected {output_len}")
    return got


def abort_stream(
    url: str, ids: list[int], output_len: int, cut_after: int, timeout: float
) -> tuple[bool, int]:
    """Stream ``/generate`` and close the connection after ``cut_after`` chunks with output
    tokens. (True, tokens) when closed mid-stream; (False, tokens) when the request
    finished first. Raises RequestFailed on an HTTP error, error chunk or broken stream."""
    _check_local(url)
    u = urllib.parse.urlparse(url)
    body = json.dumps(
        {"input_ids": ids, "sampling_params": sampling(output_len, True), "stream": True}
    )
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    start = time.perf_counter()
    tokens = chunks = 0
    try:
        conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RequestFailed(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for _, chunk in sse_chunks(resp, output_len, start, timeout, f"chunk {cut_after}"):
            meta = chunk.get("meta_info", {})
            if (meta.get("finish_reason") or {}).get("type") == "abort":
                raise RequestFailed(f"aborted by the server: {json.dumps(meta)[:300]}")
            n = int(meta.get("completion_tokens", 0))
            if n > tokens:
                tokens, chunks = n, chunks + 1
                if chunks >= cut_after:
                    return True, tokens
        return False, tokens
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise RequestFailed(f"{type(e).__name__}: {e}"[:300]) from None
    finally:
        conn.close()  # mid-stream: the server sees the client go away


def loads(url: str, timeout: float = 30.0) -> list[dict]:
    """``/v1/loads?include=core``: one dict per DP rank."""
    _check_local(url)
    with urllib.request.urlopen(url + "/v1/loads?include=core", timeout=timeout) as r:
        return json.loads(r.read())["loads"]


def used_tokens(url: str, timeout: float = 10.0) -> int:
    """KV tokens held by requests now: sum over ranks of ``num_used_tokens``."""
    return sum(int(x["num_used_tokens"]) for x in loads(url, timeout=timeout))


def free_tokens(url: str) -> int:
    """KV tokens not held by requests: sum over ranks of max total - used."""
    return sum(int(x["max_total_num_tokens"]) - int(x["num_used_tokens"]) for x in loads(url))


def wait_idle(url: str, timeout: float) -> bool:
    """Poll until no request runs or waits, at most ``timeout`` seconds; True when idle."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / IDLE_POLL_S) + 2):
        try:
            if all(x["num_running_reqs"] == 0 and x["num_waiting_reqs"] == 0 for x in loads(url)):
                return True
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() >= deadline:
            break
        time.sleep(IDLE_POLL_S)
    return False
