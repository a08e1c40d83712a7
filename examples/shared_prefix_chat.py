"""Many users chatting about one long document through the OpenAI-compatible API.

Every conversation starts with the same long system prompt (instructions + document); U
users each hold a T-turn conversation that grows turn by turn (turn t resends all of that
user's earlier turns), and the users run concurrently. This is the shape that a radix
cache is for: the document is prefilled once and every later request only adds its own
tail. With ``--enable-pariskv`` the document's ParisKV codes are shared the same way.

    python examples/shared_prefix_chat.py --endpoint http://127.0.0.1:30000 \\
        --users 4 --turns 3 --doc-tokens 6000 --max-tokens 32

Only the standard library is used (``urllib``, server-sent events), so the measurement is
the raw stream: time to first token (request sent -> first chunk with a choice; SGLang
sends the first chunk once the first token exists) and decode rate ((completion tokens -
1) / (last chunk with a choice - first one), token counts from
``stream_options.include_usage``).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request

from pariskv_tools.cli import HelpFormatter
from pariskv_tools.workloads import documents, prom
from pariskv_tools.workloads.stream_stats import decode_rate, median


def _post_stream(url: str, body: dict, timeout: float):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode("utf-8"), headers={"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(req, timeout=timeout)


def stream_chat(
    endpoint: str,
    model: str,
    messages: list[dict],
    max_tokens: int,
    ignore_eos: bool = False,
    timeout: float = 600.0,
) -> dict:
    """One streamed ``/v1/chat/completions`` request: its text, token counts and timings."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        # continuous usage: every chunk says how many tokens the request has produced, so
        # a first chunk that holds several (a client that fell behind) is counted right
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if ignore_eos:  # SGLang extension: decode exactly max_tokens (timing runs)
        body["ignore_eos"] = True
    start = time.perf_counter()
    first = last = first_tokens = None
    parts: list[str] = []
    usage: dict = {}
    with _post_stream(endpoint.rstrip("/") + "/v1/chat/completions", body, timeout) as resp:
        for raw in resp:  # one SSE line at a time, as the server sends it
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj or obj.get("object") == "error":
                raise RuntimeError(f"server error in stream: {obj}")
            now = time.perf_counter()
            usage = obj.get("usage") or usage
            for choice in obj.get("choices") or []:
                # content chunks and the finish chunk mark token times (the last may be
                # an end-of-turn token with no text)
                first = first or now
                last = now
                content = (choice.get("delta") or {}).get("content")
                # SGLang's role chunk carries no usage; the first content chunk, from the
                # same output right after it, carries the count the first chunk stands for
                # (none without running usage: one token)
                if content:
                    if not parts:
                        first_tokens = (obj.get("usage") or {}).get("completion_tokens")
                    parts.append(content)
    end = time.perf_counter()
    n_out = usage.get("completion_tokens")
    first_tokens = first_tokens or 1
    span = (last - first) if first is not None and last is not None else 0.0
    details = usage.get("prompt_tokens_details") or {}
    return {
        "text": "".join(parts),
        "ttft_ms": 1000 * (first - start) if first is not None else None,
        "e2e_ms": 1000 * (end - start),
        "decode_tok_s": decode_rate(n_out, span, first_tokens),
        "completion_tokens": n_out,
        "first_chunk_tokens": first_tokens,
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": details.get("cached_tokens"),  # needs --enable-cache-report
    }


def first_model(endpoint: str, timeout: float = 30.0) -> str:
    """The first model id that ``/v1/models`` lists."""
    with urllib.request.urlopen(endpoint.rstrip("/") + "/v1/models", timeout=timeout) as r:
        return json.loads(r.read())["data"][0]["id"]


def system_prompt(document: documents.Document) -> str:
    return f"{documents.SYSTEM_PROMPT}\n\n{documents.INSTRUCTION}\n\n{document.text}"


def run_chat_workload(
    endpoint: str,
    document: documents.Document,
    users: int = 4,
    turns: int = 3,
    max_tokens: int = 32,
    model: str | None = None,
    ignore_eos: bool = False,
    seed: int = 0,
    timeout: float = 600.0,
) -> dict:
    """U concurrent users x T turns over ``document``; per-request records and medians.

    User u asks about the vaults in a seeded order of its own; each turn sends the shared
    system prompt, all of the user's earlier questions and answers, and the new question.
    """
    model = model or first_model(endpoint)
    system = {"role": "system", "content": system_prompt(document)}
    records: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    go = threading.Barrier(users)

    def user(u: int) -> None:
        try:
            questions = documents.make_questions(document, turns, seed=seed * 1000 + u)
            history: list[dict] = [system]
            go.wait()  # all users start together
            for t, q in enumerate(questions):
                history.append({"role": "user", "content": q.text})
                r = stream_chat(endpoint, model, history, max_tokens, ignore_eos, timeout)
                history.append({"role": "assistant", "content": r["text"]})
                r.update(
                    user=u,
                    turn=t,
                    vault=q.vault,
                    expected=q.answer,
                    grade=documents.grade(r["text"], q.answer),
                    messages=len(history) - 1,
                )
                with lock:
                    records.append(r)
        except BaseException as e:  # reported by the caller, not lost in the thread
            with lock:
                errors.append(e)
            go.abort()  # the other users stop waiting at the start line

    t0 = time.perf_counter()
    threads = [threading.Thread(target=user, args=(u,), daemon=True) for u in range(users)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} user(s) failed; first: {errors[0]!r}") from errors[0]
    records.sort(key=lambda r: (r["user"], r["turn"]))
    out_tokens = sum(r["completion_tokens"] or 0 for r in records)
    return {
        "model": model,
        "users": users,
        "turns": turns,
        "max_tokens": max_tokens,
        "doc_tokens": document.n_tokens,
        "requests": records,
        "correct": sum(r["grade"] == "correct" for r in records),
        "ttft_ms_median": median(r["ttft_ms"] for r in records),
        "ttft_ms_median_by_turn": [
            median(r["ttft_ms"] for r in records if r["turn"] == t) for t in range(turns)
        ],
        "decode_tok_s_median": median(r["decode_tok_s"] for r in records),
        "completion_tokens": out_tokens,
        "cached_tokens": sum(r["cached_tokens"] or 0 for r in records),
        "aggregate_tok_s": out_tokens / wall if wall > 0 else None,
        "wall_s": wall,
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument("--endpoint", default="http://127.0.0.1:30000", help="SGLang server URL")
    ap.add_argument("--users", type=int, default=4, help="concurrent chat users")
    ap.add_argument("--turns", type=int, default=3, help="turns per user")
    ap.add_argument("--doc-tokens", type=int, default=16000, help="shared document tokens")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per reply")
    ap.add_argument("--model", help="model name for the API (default: the first of /v1/models)")
    ap.add_argument("--tokenizer", help="model dir whose tokenizer sizes the document exactly")
    ap.add_argument("--seed", type=int, default=0, help="seed of the document and questions")
    ap.add_argument("--ignore-eos", action="store_true", help="decode max-tokens every turn")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    doc = documents.build_document(args.doc_tokens, n_facts=4, seed=args.seed, tokenizer=tok)
    before = prom.scrape(args.endpoint)
    res = run_chat_workload(
        args.endpoint,
        doc,
        args.users,
        args.turns,
        args.max_tokens,
        args.model,
        args.ignore_eos,
        args.seed,
    )
    after = prom.scrape(args.endpoint)
    for r in res["requests"]:
        print(
            f"user {r['user']} turn {r['turn']}: TTFT {r['ttft_ms']:7.1f} ms  "
            f"{r['decode_tok_s'] or 0:7.1f} tok/s  cached {r['cached_tokens']}  "
            f"{r['grade']:9} {r['text'].strip()[:60]!r}"
        )
    by_turn = ", ".join(f"{x:.0f}" for x in res["ttft_ms_median_by_turn"] if x is not None)
    print(f"median TTFT {res['ttft_ms_median']:.1f} ms (per turn: {by_turn} ms)")
    print(
        f"median decode {res['decode_tok_s_median'] or 0:.1f} tok/s per request; "
        f"{res['aggregate_tok_s']:.1f} tok/s over all users"
    )
    print(f"correct: {res['correct']}/{len(res['requests'])}")
    if after is None:
        print("ParisKV counters: none (start the server with --enable-metrics)")
    else:
        d = prom.delta(before, after)
        for name in ("tokens_encoded", "prefix_tokens_reused", "sparse_request_steps"):
            key = f"{prom.PREFIX}{name}_total"
            print(f"{key}: +{d.get(key, 0):.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
