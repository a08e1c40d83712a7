"""Every command line of the project documents each option and states its default in --help.

The parsers are built with each CLI's ``build_parser()`` (nothing runs) and walked, subcommands
included; the check reads the rendered ``--help`` text, which is what a user sees.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL_CLIS = (
    "pariskv_tools.eval.__main__",
    "pariskv_tools.demo",
    "pariskv_tools.workloads.capture_cli",
)


def _script_clis() -> list[Path]:
    """benchmarks/*.py and examples/*.py that build an argparse parser."""
    scripts = sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "examples").glob("*.py"))
    return [p for p in scripts if "argparse" in p.read_text()]


def _import_script(path: Path):
    sys.path.insert(0, str(path.parent))  # the benchmarks import each other by bare name
    try:
        return importlib.import_module(path.stem)
    finally:
        sys.path.remove(str(path.parent))


def _parsers(parser: argparse.ArgumentParser, name: str):
    """(name, parser) for ``parser`` and, recursively, each of its subcommands."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _shown_default(action: argparse.Action) -> str | None:
    """The default --help must state, or None for an option without one."""
    default = action.default
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return None
    if default is None or default is argparse.SUPPRESS:
        return None
    if isinstance(default, (list, tuple)):
        return " ".join(str(v) for v in default) if default else None
    return str(default)


def _check(parser: argparse.ArgumentParser, name: str) -> list[str]:
    text = " ".join(parser.format_help().split())
    problems = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        opt = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            problems.append(f"{name} {opt}: no help")
            continue
        shown = _shown_default(action)
        if shown is None:
            continue
        expected = " ".join(f"{action.help} (default: {shown})".split())
        if expected not in text:
            problems.append(f"{name} {opt}: --help does not state the default {shown!r}")
    return problems


def _build(cli: str) -> argparse.ArgumentParser:
    if cli in TOOL_CLIS:
        return importlib.import_module(cli).build_parser()
    path = ROOT / cli
    mod = _import_script(path)
    assert hasattr(mod, "build_parser"), f"{cli} builds its parser outside build_parser()"
    return mod.build_parser()


CLIS = list(TOOL_CLIS) + [str(p.relative_to(ROOT)) for p in _script_clis()]


def test_script_walk_finds_the_clis():
    assert {"benchmarks/bench_e2e.py", "benchmarks/bench_kernels.py"} <= set(CLIS)
    assert {"examples/long_document_qa.py", "examples/shared_prefix_chat.py"} <= set(CLIS)


@pytest.mark.parametrize("cli", CLIS)
def test_every_option_has_help_with_its_default(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping: each option's help is one line
    problems = []
    for name, parser in _parsers(_build(cli), cli):
        problems += _check(parser, name)
    assert not problems, "\n".join(problems)


def test_check_catches_a_missing_default():
    """The checker itself: a plain parser's option with a default but no stated default fails,
    one without help fails, and a store_true flag with help passes."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3, help="count")
    ap.add_argument("--quiet", action="store_true", help="say less")
    ap.add_argument("--x")
    problems = _check(ap, "t")
    assert problems == ["t --n: --help does not state the default '3'", "t --x: no help"]


def test_model_check_runs_under_the_serving_package_name():
    """``python -m sglang_pariskv.eval`` is the tools' command line: its help is theirs, and a
    subcommand's help lists the same options."""
    import subprocess

    for args in (["--help"], ["retrieval", "--help"]):
        mine = subprocess.run(
            [sys.executable, "-m", "sglang_pariskv.eval", *args],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "2000"},
        )  # fmt: skip
        tools = subprocess.run(
            [sys.executable, "-m", "pariskv_tools.eval", *args],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "2000"},
        )  # fmt: skip
        assert mine.returncode == 0, mine.stderr[-2000:]
        assert mine.stdout.startswith("usage: python -m sglang_pariskv.eval")
        assert mine.stdout == tools.stdout.replace("pariskv_tools.eval", "sglang_pariskv.eval")


def test_capture_command_runs_the_capture_cli(monkeypatch):
    """``python -m pariskv_tools.workloads.capture``, the documented command, is the command
    line of ``capture_cli``: the same help, under the same name."""
    import subprocess

    from pariskv_tools.workloads import capture_cli

    monkeypatch.setenv("COLUMNS", "2000")
    run = subprocess.run(
        [sys.executable, "-m", "pariskv_tools.workloads.capture", "--help"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("usage: python -m pariskv_tools.workloads.capture")
    assert run.stdout == capture_cli.build_parser().format_help()
