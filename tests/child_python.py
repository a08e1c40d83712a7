"""Run a test script in a fresh Python process: plugin hooks and SGLang's resolution are
process-wide, so tests that apply them for real run them in a child."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, path: tuple[Path, ...] = ()) -> list[str]:
    """Run ``script`` (``python -c``) from the checkout with ``path`` + the checkout on
    PYTHONPATH and no ParisKV config in the environment; assert it succeeds and return
    its stdout lines."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, path), str(ROOT)])}
    env.pop("SGLANG_PARISKV_CONFIG", None)
    out = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()
