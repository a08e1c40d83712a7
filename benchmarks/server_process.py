"""SGLang servers the benchmarks start: ``python -m sglang.launch_server`` on 127.0.0.1 in
its own process group, its log in a file, stopped with its whole group.

A dense server and an ``--enable-pariskv`` one get the same command but for ParisKV's flags
(:func:`_server_cmd`), so a comparison measures the plugin alone. A benchmark registers the
servers it runs in :data:`_ACTIVE`, and :func:`_on_signal` stops them when the benchmark is
stopped (``timeout`` sends SIGTERM), so no server outlives its run holding the GPU.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
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

from openai_stream import write_word_tokenizer
from step_floor import LLAMA_8B

HEALTH_POLL_S = 2.0
STOP_GRACE_S = 2.0  # after a server group exits, for its GPU memory to be released

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


_INFO_KEYS = (
    "chunked_prefill_size",
    "max_total_num_tokens",
    "max_running_requests",
    "cuda_graph_max_bs_decode",
    "context_length",
    "max_req_input_len",
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


_ACTIVE: list[Server] = []


@contextlib.contextmanager
def tracked(srv: Server):
    """Run the body with ``srv`` registered for :func:`_on_signal`; on an error print the
    end of its log, and stop it in any case."""
    _ACTIVE.append(srv)
    try:
        yield srv
    except Exception:
        print(f"--- last lines of {srv.log_path} ---\n{srv.log_tail()}", flush=True)
        raise
    finally:
        srv.stop()
        _ACTIVE.remove(srv)


def _on_signal(signum, frame):  # `timeout` sends SIGTERM: never leave a server behind
    for srv in list(_ACTIVE):
        srv.stop()
    raise SystemExit(128 + signum)


def serve_model(
    model_path: str | None,
    context_length: int,
    config: dict | None = None,
    name: str = "Llama-3.1-8B shape",
) -> tuple[str, str, list[str]]:
    """(model path, description, server flags that depend on it): the user's model, or
    ``config`` (an HF config dict named ``name``; default Llama-3.1-8B's) with dummy
    weights, holding at least ``context_length`` positions, and a word-per-id tokenizer
    (``openai_stream.write_word_tokenizer``) so that the OpenAI endpoints serve it.

    The tokenizer is in its own folder (``--tokenizer-path``): next to a ``config.json``,
    transformers picks the tokenizer class from the model type, and for ``qwen2`` its
    Qwen2 tokenizer turns the word vocabulary into nothing (SGLang's own warm-up text then
    tokenizes to no tokens at all)."""
    if model_path:
        return model_path, model_path, []
    d = Path(tempfile.mkdtemp(prefix="dummy-model-"))
    cfg = dict(LLAMA_8B if config is None else config)
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], context_length)
    (d / "config.json").write_text(json.dumps(cfg))
    eos = cfg["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    tok = d / "tokenizer"
    tok.mkdir()
    write_word_tokenizer(tok, cfg["vocab_size"], cfg["bos_token_id"], eos)
    flags = ["--load-format", "dummy", "--tokenizer-path", str(tok)]
    return str(d), f"{name}, dummy weights", flags


def server_for(
    name: str,
    args,
    model: str,
    model_flags: list[str],
    log_dir: Path,
    context_length: int,
    pariskv: dict | None,
) -> tuple[Server, Path]:
    """A server (not started) on 127.0.0.1 with the flags of :func:`add_server_args`, and
    its stats folder; ``pariskv`` is the ParisKV config (None: plain SGLang)."""
    stats_dir = log_dir / f"{name}-stats"
    shutil.rmtree(stats_dir, ignore_errors=True)
    cfg = {
        "context_length": context_length,
        "server_args": model_flags + ["--mem-fraction-static", str(args.mem_fraction)],
        "pariskv": pariskv or {},
    }
    port = _free_port()
    cmd = _server_cmd(model, port, cfg, pariskv is not None, args.server_arg, str(stats_dir))
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_PARISKV_CONFIG"}
    return Server(name, cmd, log_dir / f"{name}.log", env), stats_dir
