"""benchmarks/device/flashinfer_aot.sh: FlashInfer's compiled modules saved on one host and
restored into the ahead-of-time directory of another, against a fake cache and a fake
installed FlashInfer (and torch for the GPU's compute capability)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device" / "flashinfer_aot.sh"
VERSION, ARCH = "0.6.15.post1", "90a"

pytestmark = pytest.mark.skipif(
    not (shutil.which("bash") and shutil.which("xz") and shutil.which("tar")),
    reason="needs bash, tar and xz",
)


def _run(*args: str, home: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HOME=str(home), PYTHONPATH=str(site))
    env.pop("FLASHINFER_WORKSPACE_BASE", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120
    )


def _fake_site(site: Path, version: str = VERSION, capability=(9, 0)) -> Path:
    """An installed FlashInfer of ``version`` and a torch reporting ``capability``."""
    (site / "flashinfer").mkdir(parents=True)
    (site / "flashinfer" / "__init__.py").write_text("")
    meta = site / f"flashinfer_python-{version}.dist-info"
    meta.mkdir()
    meta.joinpath("METADATA").write_text(
        f"Metadata-Version: 2.1\nName: flashinfer-python\nVersion: {version}\n"
    )
    (site / "torch.py").write_text(
        f"class cuda:\n    @staticmethod\n    def get_device_capability():\n"
        f"        return {capability!r}\n"
    )
    return site / "flashinfer" / "data" / "aot"


def _cache(tmp_path: Path, big: int = 0) -> tuple[Path, dict[str, bytes]]:
    """A JIT cache of two compiled modules (one of ``big`` random bytes) and their objects."""
    home = tmp_path / "home"
    ops = home / ".cache" / "flashinfer" / VERSION / ARCH / "cached_ops"
    libs = {"batch_decode_a": os.urandom(big or 4096), "sampling": b"\x7fELF small"}
    for name, data in libs.items():
        (ops / name).mkdir(parents=True)
        (ops / name / f"{name}.so").write_bytes(data)
        (ops / name / "kernel.cuda.o").write_bytes(b"object")
        (ops / name / "build.ninja").write_text("rule x\n")
    return home, libs


def test_saved_modules_come_back_in_the_ahead_of_time_directory(tmp_path):
    home, libs = _cache(tmp_path, big=16 * 2**20)  # more than one part
    parts = tmp_path / "parts"
    saved = _run("save", str(parts), home=home, site=tmp_path / "none")
    assert saved.returncode == 0, saved.stderr
    names = sorted(p.name for p in parts.iterdir())
    assert names[0] == f"flashinfer_aot.{VERSION}.{ARCH}.tar.xz.00" and len(names) >= 2
    assert all(p.stat().st_size <= 15 * 2**20 for p in parts.iterdir())
    aot = _fake_site(tmp_path / "site")
    restored = _run("restore", str(parts), home=tmp_path / "fresh", site=tmp_path / "site")
    assert restored.returncode == 0, restored.stderr
    assert "restored 2 FlashInfer modules" in restored.stdout
    got = {p.parent.name: p.read_bytes() for p in aot.glob("*/*")}
    assert got == libs  # the libraries alone, under <module>/<module>.so


@pytest.mark.parametrize(
    "version,capability", [("0.6.16", (9, 0)), (VERSION, (8, 0))], ids=["version", "arch"]
)
def test_parts_of_another_flashinfer_or_gpu_are_not_restored(tmp_path, version, capability):
    home, _ = _cache(tmp_path)
    parts = tmp_path / "parts"
    assert _run("save", str(parts), home=home, site=tmp_path / "none").returncode == 0
    aot = _fake_site(tmp_path / "site", version, capability)
    restored = _run("restore", str(parts), home=tmp_path / "fresh", site=tmp_path / "site")
    assert restored.returncode == 1 and "not restored" in restored.stderr
    assert not aot.exists()


def test_nothing_to_save_or_restore_is_an_error(tmp_path):
    empty = _run("save", str(tmp_path / "parts"), home=tmp_path, site=tmp_path / "none")
    assert empty.returncode == 1 and "no compiled FlashInfer module" in empty.stderr
    (tmp_path / "parts").mkdir(exist_ok=True)
    none = _run("restore", str(tmp_path / "parts"), home=tmp_path, site=tmp_path / "none")
    assert none.returncode == 1 and "no flashinfer_aot parts" in none.stderr
