"""What a results file records about the tree that ran: ``engine_runs.git_state`` against
real git checkouts made here."""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "benchmarks" / "engine_runs.py"

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location("engine_runs_copy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _git(repo: Path, *args: str) -> str:
    env = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    return subprocess.check_output(["git", "-C", str(repo), *env, *args], text=True).strip()


def test_a_copied_tree_under_another_commits_git_reads_as_dirty(tmp_path):
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(SRC, repo / "benchmarks" / "engine_runs.py")
    (repo / "kernel.cu").write_text("int a;\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "first")
    mod = _load(repo / "benchmarks" / "engine_runs.py")

    head = _git(repo, "rev-parse", "HEAD")
    assert mod.git_state() == {"git_commit": head, "git_dirty": False}
    (repo / "results.json").write_text("{}")  # untracked output of a run: still clean
    assert mod.git_state()["git_dirty"] is False
    (repo / "kernel.cu").write_text("int b;\n")  # the tree that runs is not HEAD's
    assert mod.git_state() == {"git_commit": head, "git_dirty": True}


def test_outside_a_checkout_both_are_unknown(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(SRC, tmp_path / "benchmarks" / "engine_runs.py")
    mod = _load(tmp_path / "benchmarks" / "engine_runs.py")
    assert mod.git_state() == {"git_commit": None, "git_dirty": None}
