"""benchmarks/device/compare_commits.sh: commits' retrieval code packed for the GPU host,
which has no .git, and refused usage."""

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
