"""The runtime package serves without the tools' dependencies.

``sglang_pariskv`` is what SGLang imports through the plugin entry point; ``pariskv_tools``
(evaluation, workloads, demo) and its extra dependencies are not installed with it. Checked
three ways: a fresh interpreter that cannot import the tools' packages imports every runtime
module and registers the plugin; no import statement in the runtime package names them
(this also covers imports inside functions, which the first check only reaches when called);
and pyproject's runtime dependencies do not list them.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "sglang_pariskv"
TOOL_DEPS = ("gguf", "tqdm", "matplotlib", "scipy")
#: What the runtime package must never import itself.
NOT_RUNTIME = (*TOOL_DEPS, "pytest", "pariskv_tools")


def _sglang_requirements() -> set[str]:
    """SGLang's own (non-extra) requirements: installed wherever SGLang is."""
    names = set()
    for req in importlib.metadata.requires("sglang") or []:
        if "extra ==" not in req:
            names.add(re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower().replace("-", "_"))
    return names


#: Those SGLang requires itself (gguf, tqdm, scipy with sglang 0.5.17) exist wherever it is
#: installed: in the interpreter below they are refused only to ``sglang_pariskv`` code.
SGLANG_IMPORTS = tuple(sorted(set(NOT_RUNTIME) & _sglang_requirements()))

_SERVE_WITHOUT_TOOLS = textwrap.dedent(
    """
    import importlib, importlib.abc, json, os, pkgutil, sys

    NOT_RUNTIME = set({not_runtime!r})
    SGLANG_IMPORTS = set({sglang_imports!r})
    refused = []


    def importer():
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_globals.get("__name__", "")
            if not (name == "importlib" or name.startswith("importlib.")):
                return name
            frame = frame.f_back
        return ""


    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            top = fullname.split(".")[0]
            if top not in NOT_RUNTIME:
                return None
            by = importer()
            if top in SGLANG_IMPORTS and not by.startswith("sglang_pariskv"):
                return None
            refused.append((fullname, by))
            raise ImportError(f"{{fullname}} is not installed (imported by {{by}})")


    sys.meta_path.insert(0, Refuse())
    os.environ.pop("SGLANG_PARISKV_CONFIG", None)

    import sglang_pariskv
    from sglang_pariskv import plugin

    names = [m.name for m in pkgutil.walk_packages(sglang_pariskv.__path__, "sglang_pariskv.")]
    for name in names:
        importlib.import_module(name)
    plugin.register()
    print(json.dumps({{"modules": names, "refused": refused}}))
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_runtime_imports_and_registers_without_the_tools():
    code = _SERVE_WITHOUT_TOOLS.format(not_runtime=NOT_RUNTIME, sglang_imports=SGLANG_IMPORTS)
    out = _run(code)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    files = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in RUNTIME.rglob("*.py")
    } - {"sglang_pariskv"}
    assert set(report["modules"]) == files  # every runtime module was imported
    # Only SGLang's own requirements, asked for by SGLang's code, were even looked up.
    assert {name.split(".")[0] for name, _ in report["refused"]} <= set(SGLANG_IMPORTS)


_PROBE = """
results = {}
for stmt, by in PROBES:
    try:
        exec(stmt, {"__name__": by})
        results[f"{stmt} by {by}"] = "imported"
    except ImportError as e:
        results[f"{stmt} by {by}"] = str(e)
print(json.dumps(results))
sys.exit(0)
"""


def test_the_refusing_interpreter_refuses():
    """The same interpreter refuses the tools to anyone, and tqdm (an SGLang requirement) to
    ``sglang_pariskv`` code only: the block is real and tells importers apart."""
    probes = [
        ("import pariskv_tools.eval", "__main__"),
        ("import matplotlib.pyplot", "__main__"),
        ("import tqdm", "sglang_pariskv.probe"),
        ("import tqdm", "sglang.probe"),
    ]
    code = _SERVE_WITHOUT_TOOLS.format(not_runtime=NOT_RUNTIME, sglang_imports=SGLANG_IMPORTS)
    probe = f"PROBES = {probes!r}\n" + _PROBE
    code = code.replace("import sglang_pariskv\n", probe + "import sglang_pariskv\n")
    out = _run(code)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {
        "import pariskv_tools.eval by __main__": "pariskv_tools is not installed (imported by "
        "__main__)",
        "import matplotlib.pyplot by __main__": "matplotlib is not installed (imported by "
        "__main__)",
        "import tqdm by sglang_pariskv.probe": "tqdm is not installed (imported by "
        "sglang_pariskv.probe)",
        "import tqdm by sglang.probe": "imported",
    }


def test_sglang_brings_its_own_imports_only():
    """matplotlib and pytest are refused to everyone: SGLang does not require them."""
    assert {"matplotlib", "pytest", "pariskv_tools"}.isdisjoint(SGLANG_IMPORTS)


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


#: The command line of the tools under the serving package's name (``python -m
#: sglang_pariskv.eval``): nothing in serving imports it, and it imports the tools inside
#: main(), with an install hint when they are missing.
TOOL_FORWARDERS = {"sglang_pariskv/eval.py"}


def test_no_runtime_module_names_a_tool_import():
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imported_names(p) & set(NOT_RUNTIME))
        for p in sorted(RUNTIME.rglob("*.py"))
        if str(p.relative_to(ROOT)) not in TOOL_FORWARDERS
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_tools_forwarder_is_not_imported_by_serving_and_names_the_extra(monkeypatch):
    from sglang_pariskv import eval as forwarder

    def imports_forwarder(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [a.name for a in node.names]
            if isinstance(node, ast.Import) and "sglang_pariskv.eval" in names:
                return True
            if isinstance(node, ast.ImportFrom) and (
                node.module == "sglang_pariskv.eval"
                or (node.module == "sglang_pariskv" and "eval" in names)
                or (node.level > 0 and "eval" in names)
            ):
                return True
        return False

    assert [str(p.relative_to(ROOT)) for p in RUNTIME.rglob("*.py") if imports_forwarder(p)] == []
    monkeypatch.setitem(sys.modules, "pariskv_tools.eval.__main__", None)  # not installed
    with pytest.raises(SystemExit, match=r"pip install 'sglang-pariskv\[eval\]'"):
        forwarder.main(["retrieval", "--help"])


def test_runtime_dependencies_leave_out_the_tools_deps():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        out = set()
        for req in reqs:
            name = req.split(";")[0].split("[")[0]
            for sep in "<>=!~ ":
                name = name.split(sep)[0]
            out.add(name.strip().lower())
        return out

    runtime = names(project["dependencies"])
    assert "sglang" in runtime
    assert runtime.isdisjoint(TOOL_DEPS), runtime
    extras = project["optional-dependencies"]
    assert set(TOOL_DEPS) - {"scipy"} <= names(extras["eval"])
    assert names(extras["eval"]) <= names(extras["dev"])  # the test install has the tools' deps
    assert {"pytest", "scipy"} <= names(extras["dev"])
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {"sglang_pariskv*", "pariskv_tools*"} <= set(find["packages"]["find"]["include"])
