"""benchmarks/device/compare_commits.sh: commits' retrieval code packed for the GPU host,
which has no .git, and refused usage."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device" / "compare_commits.sh"


def test_pack_writes_a_commits_package_and_benchmark(tmp_path):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout")
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dest = ROOT / ".device-bundle" / "trees" / rev
    try:
        run = subprocess.run(["bash", str(SCRIPT), "pack", rev], cwd=ROOT, capture_output=True)
        assert run.returncode == 0, run.stderr
        for rel in (
            "sglang_pariskv/kernels/workspace.py",
            "sglang_pariskv/csrc/select_rerank.cu",
            "benchmarks/bench_retrieval_in_step.py",
            "benchmarks/bench_kernels.py",
        ):
            committed = subprocess.run(
                ["git", "show", f"{rev}:{rel}"], cwd=ROOT, capture_output=True
            ).stdout
            assert (dest / rel).read_bytes() == committed, rel
        # only the code the benchmark imports, not the repository
        assert not (dest / "tests").exists() and not (dest / "docs").exists()
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_unknown_mode_is_refused_with_the_usage():
    run = subprocess.run(["bash", str(SCRIPT), "compare"], capture_output=True, text=True)
    assert run.returncode == 2 and "usage:" in run.stderr


def test_run_labels_each_trees_mode_lines_and_says_when_a_run_gave_none(tmp_path):
    """Run from a directory whose own tree has no benchmark (that run fails) and which holds
    one packed tree whose benchmark prints its mode lines among other output: each
    batch's mode lines come out labelled with the tree and batch, in order, and the failed
    run says so."""
    name = "fake"
    bench = tmp_path / ".device-bundle" / "trees" / name / "benchmarks"
    bench.mkdir(parents=True)
    (bench / "bench_retrieval_in_step.py").write_text(
        "import sys\n"
        "b = sys.argv[sys.argv.index('--batch') + 1]\n"
        "print('a warning')\n"
        "print('step', {'scan': float(b), 'step_ms': 2.5})\n"
        "print('weights', {'step_ms': 1.0})\n"
    )
    env = {"PATH": os.environ["PATH"], "OUT": str(tmp_path / "out")}
    run = subprocess.run(
        ["bash", str(SCRIPT), "run", "1 5", name],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "tree batch 1: no result",
        f"{name} batch 1: step {{'scan': 1.0, 'step_ms': 2.5}}",
        f"{name} batch 1: weights {{'step_ms': 1.0}}",
        "tree batch 5: no result",
        f"{name} batch 5: step {{'scan': 5.0, 'step_ms': 2.5}}",
        f"{name} batch 5: weights {{'step_ms': 1.0}}",
    ]
