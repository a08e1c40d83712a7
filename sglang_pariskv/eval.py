"""``python -m sglang_pariskv.eval``: check a model's retrieval before serving it.

The same command line as ``python -m pariskv_tools.eval`` (``retrieval``, ``calibrate``,
``stress``), under the name of the package a user installed to serve. Serving
never imports the evaluation tools; this module only forwards to them, and they need the
``eval`` extra (gguf, tqdm, matplotlib).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    try:
        from pariskv_tools.eval.__main__ import main as tools_main
    except ImportError as err:
        raise SystemExit(
            f"python -m sglang_pariskv.eval needs the evaluation tools ({err}): "
            "pip install 'sglang-pariskv[eval]'"
        ) from err
    tools_main(argv, prog="python -m sglang_pariskv.eval")


if __name__ == "__main__":
    main()
