"""Test-session setup.

Without CUDA, Triton's interpreter is turned on (``TRITON_INTERPRET=1``) before any test
module is imported: the kernel tests run the Triton kernels on CPU tensors.

``sgl_kernel`` (SGLang's CUDA kernel package) fails to import on a machine without an
NVIDIA driver (``libcuda.so.1`` missing), and SGLang's radix cache, schedule batch and
model runner import it at module level. On such a machine we install a stand-in whose
every function raises if called: the CPU tests may import real SGLang objects, and any
test that would actually run a CUDA kernel fails loudly instead of passing by accident.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types

import pytest
import torch

# Without CUDA the Triton kernels run in Triton's interpreter. Triton decides interpreted or
# compiled when a @triton.jit function is defined, so this comes before any test module (or
# SGLang, which imports Triton) is imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


class _Unavailable:
    """A stand-in for any sgl_kernel object: attribute chains resolve (SGLang reads
    constants such as ``scalar_types.uint4b8`` at import time), calls raise."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"{self._name} was called, but sgl_kernel is a CPU-test stand-in (no NVIDIA "
            "driver here): mark this test `gpu` and run it on the device"
        )

    def __repr__(self) -> str:
        return f"<sgl_kernel stand-in {self._name}>"


class _RaisingModule(types.ModuleType):
    """A module whose every attribute is an :class:`_Unavailable`."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Unavailable(f"{self.__name__}.{name}")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "sgl_kernel" or fullname.startswith("sgl_kernel."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _RaisingModule(spec.name)
        mod.__path__ = []
        mod.__version__ = "0.0.0+cpu-test-stand-in"
        return mod

    def exec_module(self, module):
        pass


def _install_sgl_kernel_stand_in() -> bool:
    try:
        import sgl_kernel  # noqa: F401

        return False
    except (ImportError, OSError):
        for name in [m for m in sys.modules if m.split(".")[0] == "sgl_kernel"]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StandInFinder())
        return True


SGL_KERNEL_STAND_IN = not torch.cuda.is_available() and _install_sgl_kernel_stand_in()


def pytest_report_header(config):
    return f"sgl_kernel stand-in installed: {SGL_KERNEL_STAND_IN}"


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.fail("this test is marked gpu but no CUDA device is present")
    return torch.device("cuda")
