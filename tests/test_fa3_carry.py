"""benchmarks/device/fa3.sh: sglang-kernel's FA3 library split into xz parts here, staged
part by part and installed on the GPU host, against a fake wheel and a fake installed
sgl_kernel."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device" / "fa3.sh"
LIB = "sgl_kernel/flash_ops.abi3.so"

pytestmark = pytest.mark.skipif(
    not (shutil.which("bash") and shutil.which("xz") and shutil.which("split")),
    reason="needs bash, xz and split",
)


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _wheel(path: Path, lib: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(LIB, lib)
        z.writestr("sgl_kernel/__init__.py", "")
    return path


def _site(site: Path) -> None:
    """An installed sgl_kernel whose flash_attn imports only next to the full library."""
    pkg = site / "sgl_kernel"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "flash_attn.py").write_text(
        "import os\n"
        "lib = os.path.join(os.path.dirname(__file__), 'flash_ops.abi3.so')\n"
        "assert os.path.getsize(lib) > 1000, 'trimmed FA3 library'\n"
    )
    (pkg / "flash_ops.abi3.so").write_bytes(b"trimmed")


def test_split_stage_install_restores_the_library_byte_for_byte(tmp_path: Path):
    lib = os.urandom(1 << 16) + bytes(1 << 20)  # random and compressible parts
    wheel = _wheel(tmp_path / "sglang_kernel.whl", lib)
    work = tmp_path / "checkout"
    work.mkdir()
    r = _run("split", str(wheel), cwd=work)
    assert r.returncode == 0, r.stderr
    parts = sorted((work / ".device-bundle" / "fa3").glob("p*"))
    assert [p.name for p in parts] == ["p00"]  # well under one 55 MB part
    carried = (parts[0] / "part").stat().st_size
    assert carried < len(lib) // 4, "the library travels compressed"
    expected = hashlib.sha256(lib).hexdigest()
    assert (parts[0] / "sha256").read_text().strip() == expected

    staging, site = tmp_path / "staging", tmp_path / "site"
    _site(site)
    for p in parts:
        r = _run("stage", str(p), str(staging), cwd=work)
        assert r.returncode == 0, r.stderr
    r = _run("install", str(staging), str(site), cwd=work)
    assert r.returncode == 0, r.stderr
    assert "FA3 importable" in r.stdout
    assert (site / LIB).read_bytes() == lib


def test_install_refuses_a_library_whose_checksum_differs(tmp_path: Path):
    work = tmp_path / "checkout"
    work.mkdir()
    wheel = _wheel(tmp_path / "w.whl", os.urandom(4096))
    assert _run("split", str(wheel), cwd=work).returncode == 0
    part = work / ".device-bundle" / "fa3" / "p00"
    (part / "sha256").write_text(hashlib.sha256(b"another library").hexdigest() + "\n")
    staging, site = tmp_path / "staging", tmp_path / "site"
    _site(site)
    assert _run("stage", str(part), str(staging), cwd=work).returncode == 0
    r = _run("install", str(staging), str(site), cwd=work)
    assert r.returncode != 0
    assert "FA3 importable" not in r.stdout
    assert (site / LIB).read_bytes() == b"trimmed", "the installed library is left as it was"


def test_split_in_several_parts_joins_in_order(tmp_path: Path):
    """Parts are named so that the shell's glob joins them in the split's order."""
    work = tmp_path / "checkout"
    work.mkdir()
    staging = tmp_path / "staging"
    blob = os.urandom(1 << 12)
    for i, chunk in enumerate((blob[:1000], blob[1000:3000], blob[3000:])):
        d = work / f"p{i:02d}"
        d.mkdir()
        (d / "part").write_bytes(chunk)
        assert _run("stage", str(d), str(staging), cwd=work).returncode == 0
    joined = subprocess.run(
        ["bash", "-c", f"cat {staging}/part*"], capture_output=True, check=True
    ).stdout
    assert joined == blob
