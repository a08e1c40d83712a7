"""Ask several questions about one long document with SGLang's frontend language.

The program puts the document in the user turn once, then ``s.fork(k)`` splits it into k
branches that each add one question and generate an answer. The frontend sends the shared
part first (one prefill), and every branch's request starts with that same text, so the
server's radix cache serves the document from its KV cache and only each question is new
work. With ``--enable-pariskv`` the document's ParisKV codes are reused the same way
(``sglang:pariskv_prefix_tokens_reused_total``) and every answer decodes with retrieval.

    python examples/long_document_qa.py --endpoint http://127.0.0.1:30000 \\
        --doc-tokens 6000 --questions 4 --seed 0 --tokenizer <model dir>

Each branch's answer is streamed from the server (the frontend's non-streaming call is
served by a streaming request here, see :class:`TimedEndpoint`), so time to first token
and decode rate are measured per branch.
"""

from __future__ import annotations

import argparse
import threading
import time

import sglang as sgl

from pariskv_tools.cli import HelpFormatter
from pariskv_tools.workloads import documents, prom
from pariskv_tools.workloads.stream_stats import decode_rate, median


@sgl.function
def fork_qa(s, document, questions, max_tokens, stop_at):
    """Document once, then one fork per question; answers land in ``s["answer"]`` (a list,
    in question order, gathered by ``join``)."""
    s += sgl.system(documents.SYSTEM_PROMPT)
    s += sgl.user_begin()
    s += documents.INSTRUCTION + "\n\n" + document + "\n\n"
    # fork() sends the shared text as one prefill request only if the executor thread has
    # already appended it; without this sync the branches race it and each carries the
    # whole document as new work.
    s.sync()
    forks = s.fork(len(questions))
    for f, q in zip(forks, questions):
        f += q.text
        f += sgl.user_end()
        f += sgl.assistant_begin()
        # The answer prefix is pre-filled, so the first generated tokens are the code.
        f += q.answer_prefix + sgl.gen("answer", max_tokens=max_tokens, stop=stop_at)
        f += sgl.assistant_end()
    forks.join()


class TimedEndpoint(sgl.RuntimeEndpoint):
    """A RuntimeEndpoint that times its requests.

    ``generate`` (what the frontend calls for ``sgl.gen`` when the program is not run in
    streaming mode) is served through the streaming ``/generate`` request, so the time of
    the first streamed chunk (the first token) is known. ``commit_lazy_operations`` is the
    prefill of the shared prefix that ``fork`` sends before the branches.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.prefills: list[dict] = []
        self.gens: list[dict] = []

    def commit_lazy_operations(self, s):
        t = time.perf_counter()
        super().commit_lazy_operations(s)
        with self.lock:
            self.prefills.append({"start": t, "end": time.perf_counter(), "chars": len(s.text_)})

    def generate(self, s, sampling_params):
        start = time.perf_counter()
        first = last = None
        first_tokens = 1
        text, meta = "", {}
        # /generate streams a chunk per decoded token, or the newest state of several when
        # this client falls behind: the first chunk holds the first token and
        # meta_info.completion_tokens says how many more came with it.
        for chunk, chunk_meta in self.generate_stream(s, sampling_params):
            last = time.perf_counter()
            if first is None:
                first = last
                first_tokens = (chunk_meta or {}).get("completion_tokens") or 1
            text += chunk
            meta = chunk_meta
        end = time.perf_counter()
        with self.lock:
            self.gens.append(
                {
                    "start": start,
                    "first": first if first is not None else end,
                    "first_tokens": first_tokens,
                    "last": last if last is not None else end,
                    "end": end,
                    "prompt_tail": s.text_[-400:],
                    "meta": meta or {},
                }
            )
        return text, meta or {}


def run_fork_qa(
    endpoint: str,
    document: documents.Document,
    questions: list[documents.Question],
    max_tokens: int = 16,
    chat_template: str | None = "chatml",
    ignore_eos: bool = False,
) -> dict:
    """Run :func:`fork_qa` once against ``endpoint``; answers, grades and timings.

    ``ttft_ms``: program start to the first streamed token of the first branch (includes
    the document's prefill). ``fork_ttft_ms``: per branch, its request to its first token,
    the document already cached. ``decode_tok_s``: per branch, the tokens after its first
    chunk over the time from the first chunk to the last (``stream_stats.decode_rate``).
    """
    backend = TimedEndpoint(endpoint, chat_template_name=chat_template)
    t0 = time.perf_counter()
    state = fork_qa.run(
        document=document.text,
        questions=questions,
        max_tokens=max_tokens,
        stop_at=[] if ignore_eos else ["\n"],  # fixed-length answers when timing dummy weights
        ignore_eos=ignore_eos,
        temperature=0,
        backend=backend,
    )
    answers = state["answer"]
    wall = time.perf_counter() - t0
    err = state.error()
    if err is not None:
        raise RuntimeError(f"the frontend program failed: {err!r}")
    rows = []
    for q, a in zip(questions, answers):
        g = next((g for g in backend.gens if q.text in g["prompt_tail"]), None)
        meta = g["meta"] if g else {}
        n_out = meta.get("completion_tokens")
        span = (g["last"] - g["first"]) if g else 0.0
        rows.append(
            {
                "vault": q.vault,
                "expected": q.answer,
                "answer": a,
                "grade": documents.grade(a, q.answer),
                "fork_ttft_ms": 1000 * (g["first"] - g["start"]) if g else None,
                "decode_tok_s": decode_rate(n_out, span, g["first_tokens"] if g else 1),
                "completion_tokens": n_out,
                "first_chunk_tokens": g["first_tokens"] if g else None,
                "prompt_tokens": meta.get("prompt_tokens"),
                "cached_tokens": meta.get("cached_tokens"),
            }
        )
    firsts = [g["first"] for g in backend.gens]
    rates = [r["decode_tok_s"] for r in rows if r["decode_tok_s"]]
    return {
        "answers": rows,
        "correct": sum(r["grade"] == "correct" for r in rows),
        "ttft_ms": 1000 * (min(firsts) - t0) if firsts else None,
        "doc_prefill_ms": 1000 * sum(p["end"] - p["start"] for p in backend.prefills),
        "fork_ttft_ms_median": median([r["fork_ttft_ms"] for r in rows]),
        "decode_tok_s_median": median(rates),
        "completion_tokens": sum(r["completion_tokens"] or 0 for r in rows),
        "cached_tokens": sum(r["cached_tokens"] or 0 for r in rows),
        "wall_s": wall,
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument("--endpoint", default="http://127.0.0.1:30000", help="SGLang server URL")
    ap.add_argument("--doc-tokens", type=int, default=16000, help="document length in tokens")
    ap.add_argument("--questions", type=int, default=4, help="questions (forks)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the document and questions")
    ap.add_argument("--tokenizer", help="model dir whose tokenizer sizes the document exactly")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    ap.add_argument("--chat-template", default="chatml", help="sglang.lang template name")
    ap.add_argument("--ignore-eos", action="store_true", help="decode max-tokens every time")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    doc = documents.build_document(
        args.doc_tokens, n_facts=max(args.questions, 4), seed=args.seed, tokenizer=tok
    )
    questions = documents.make_questions(doc, args.questions, seed=args.seed)
    print(
        f"document: {doc.n_tokens} tokens ({'counted' if doc.exact else 'estimated'}), "
        f"facts at depths {[round(f.actual_depth, 2) for f in doc.facts]}"
    )
    before = prom.scrape(args.endpoint)
    res = run_fork_qa(
        args.endpoint, doc, questions, args.max_tokens, args.chat_template, args.ignore_eos
    )
    after = prom.scrape(args.endpoint)
    for r in res["answers"]:
        print(
            f"vault {r['vault']:>8}: {r['answer'].strip()!r:40} expected {r['expected']} "
            f"-> {r['grade']}  (TTFT {r['fork_ttft_ms']:.0f} ms, cached {r['cached_tokens']})"
        )
    print(f"correct: {res['correct']}/{len(questions)}")
    print(
        f"first token after {res['ttft_ms']:.0f} ms "
        f"(document prefill {res['doc_prefill_ms']:.0f} ms); "
        f"median decode {res['decode_tok_s_median'] or 0:.1f} tok/s per branch"
    )
    if after is None:
        print("ParisKV counters: none (start the server with --enable-metrics)")
    else:
        d = prom.delta(before, after)
        if not d:
            print("ParisKV counters: none on /metrics (server started without --enable-pariskv?)")
        for name in ("tokens_encoded", "prefix_tokens_reused", "sparse_request_steps"):
            key = f"{prom.PREFIX}{name}_total"
            print(f"{key}: +{d.get(key, 0):.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
