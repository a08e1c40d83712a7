"""SGLang engines in their own processes, and what a run records about them.

ParisKV's hooks are per process, so every engine a benchmark compares runs in a fresh one
(:func:`_run_isolated`), and the stats files the plugin writes (:func:`_read_stats`) show
afterwards which engine or server retrieved. :func:`_device_info` names the device, the
library versions and the commit in a results file. :func:`resume_run` keeps a measurement
in a file across calls, because each device call has a wall-clock limit: a run cut short
keeps what it finished, and the same command again measures only the rest.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import subprocess
from pathlib import Path


def _read_stats(stats_dir) -> dict:
    from sglang_pariskv.stats_file import read_stats_dir

    return read_stats_dir(stats_dir)


def _engine(
    model_path: str,
    pariskv: dict | None,
    stats_dir: str | None = None,
    attention_backend: str = "flashinfer",
    **kwargs,
):
    """An sglang Engine; with ``pariskv`` set, ParisKV is enabled before it starts (and
    writes its counters to ``stats_dir``, which :func:`_read_stats` reads)."""
    import sglang

    os.environ.pop("SGLANG_PARISKV_CONFIG", None)
    if pariskv is not None:
        from sglang_pariskv.config import ParisKVConfig
        from sglang_pariskv.plugin import enable

        enable(ParisKVConfig.from_dict({**pariskv, "stats_dir": stats_dir}))
    return sglang.Engine(
        model_path=model_path, attention_backend=attention_backend, log_level="warning", **kwargs
    )


def _child(target, args, q) -> None:
    """Body of :func:`_run_isolated`'s process: ``target(*args, out_q=q)``. A worker that
    raises without reporting (or whose report fails) still sends an error, and the process
    then exits at once: an engine's leftover threads would otherwise keep it alive with the
    parent waiting on a message that never comes."""
    try:
        target(*args, out_q=q)
    except BaseException:
        import traceback

        q.put({"error": traceback.format_exc()})
        q.close()
        q.join_thread()
        os._exit(1)


def _run_isolated(target, *args, on_partial=None):
    """``target(*args, out_q=queue)`` in a fresh process; its last message is the result. A
    message ``{"partial": x}`` before it goes to ``on_partial(x)`` (results so far). The
    queue goes by keyword, so a worker whose parameters do not line up with ``args`` fails
    at the call instead of reading one argument as another."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(target, args, q))
    p.start()
    import queue

    while True:  # a crashed engine must fail the bench, not hang it
        try:
            res = q.get(timeout=5)
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"engine process died with exit code {p.exitcode}") from None
            continue
        if "partial" not in res:
            break
        if on_partial is not None:
            on_partial(res["partial"])
    p.join()
    if "error" in res:
        raise RuntimeError(res["error"])
    return res


def _device_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("sglang", "flashinfer", "triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info | git_state()


def git_state() -> dict:
    """The checkout's commit and whether tracked files differ from it: a tree copied onto a
    GPU host can carry a ``.git`` of another commit, and then ``git_dirty`` is true and
    ``git_commit`` does not name what ran. Both None outside a git checkout."""
    git = ["git", "-C", str(Path(__file__).resolve().parent)]
    try:
        commit = subprocess.check_output([*git, "rev-parse", "HEAD"], text=True).strip()
        status = [*git, "status", "--porcelain", "--untracked-files=no"]
        dirty = bool(subprocess.check_output(status, text=True).strip())
    except Exception:
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


def add_counters(a: dict, b: dict) -> dict:
    """Two runs' stats-file counters summed (a run cut short, and the run that resumed it)."""
    return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}


def resume_run(saved: Path | None, key: dict, run: bool, missing, measure, merge, what: str):
    """A measurement kept in ``saved`` across calls: what the file holds (refused, naming
    ``what`` differed, if measured with another ``key``), plus, when ``run``,
    ``measure(todo, on_partial)`` of ``todo = missing(done)``, the file rewritten with
    ``merge(done, part)`` after every partial result. None when there is nothing."""
    key = json.loads(json.dumps(key))  # as the saved file holds it (tuples are lists)
    done = json.loads(saved.read_text()) if saved is not None and saved.exists() else None
    if done is not None and done.get("key") != key:
        raise SystemExit(
            f"{saved} was measured with another {what}: {done.get('key')} vs now {key}"
        )
    if not run:
        return done

    def save(part: dict) -> None:
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(merge(done, part) | {"key": key}))

    todo = missing(done)
    if not todo:
        return done
    part = measure(todo, save)
    save(part)
    return merge(done, part) | {"key": key}
