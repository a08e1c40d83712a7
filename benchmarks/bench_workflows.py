"""Users' workflows end to end: a dense SGLang server vs an ``--enable-pariskv`` one.

    python benchmarks/bench_workflows.py run --setup smollm2 --log-dir logs
    python benchmarks/bench_workflows.py run --setup llama8b-dummy --log-dir logs
    python benchmarks/bench_workflows.py plot

For one setup, the bench starts a dense server, runs both workflows of ``examples/``
against it, stops it, then does the same with ParisKV on (same run, same documents, one
server at a time; each server is ``python -m sglang.launch_server`` in its own process
group, its log under ``--log-dir``):

* ``frontend_fork_qa``: ``examples/long_document_qa.py``, an SGLang frontend program that
  prefills a long document once and forks one branch per question;
* ``shared_prefix_chat``: ``examples/shared_prefix_chat.py``, U concurrent users x T turns
  through the OpenAI-compatible API over one shared system prompt + document.

Setups: ``smollm2`` serves SmolLM2-135M-Instruct (real weights, 8K context, ~6K-token
document, ParisKV topk 100 / sink 32 / local 64 / dense threshold 1024) and compares the
answers with dense ones. ``llama8b-dummy`` serves a Llama-3.1-8B-shaped model with random
weights (``--load-format dummy``) over a 64K-token document: mechanics and timing only.

Results merge into ``benchmarks/results/workflows.json`` (``--out``), per setup and
workflow. Nothing is written unless the ParisKV server's own counters show sparse decode
steps and the dense server's show none (without the plugin installed, both servers would
be dense).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from pariskv_tools.cli import HelpFormatter

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "workflows.json"

sys.path.insert(0, str(HERE))

from server_process import _on_signal  # noqa: E402
from workflow_runs import SETUPS, run_setup  # noqa: E402

DEFINITIONS = {
    "ttft_definition": {
        "frontend_fork_qa": "per program run: from the program's start to the first streamed "
        "token of its first branch; includes the document's prefill (fork() sends it as one "
        "max_new_tokens=0 request) and the branch's question extend. Median over rounds. "
        "fork_ttft_ms (detail): each branch's streamed /generate request to its first "
        "token, the document already cached.",
        "shared_prefix_chat": "per request: from sending the streamed /v1/chat/completions "
        "request to the first SSE chunk with a choice (SGLang sends it when the first token "
        "exists); median over all users and turns.",
    },
    "tok_s_definition": "per request (frontend: per branch): (completion_tokens - the "
    "tokens of the first chunk, by the server's count) / (last chunk time - first chunk "
    "time), i.e. the decode rate a user sees; median over requests. Frontend branch "
    "answers are short (fork_max_tokens).",
    "counter_definitions": {
        "prefix_tokens_encoded": "delta of sglang:pariskv_tokens_encoded_total over the "
        "workflow: keys encoded into ParisKV codes (prefill/extend tokens and one per decode "
        "step)",
        "prefix_tokens_reused": "delta of sglang:pariskv_prefix_tokens_reused_total: extend "
        "prefix tokens whose codes were reused, i.e. radix-cache hits plus, for prompts "
        "longer than --chunked-prefill-size, the earlier chunks of the same prompt",
        "radix_cached_tokens": "sum of the servers' cached_tokens over the workflow's "
        "requests (radix-cache hits alone)",
    },
}


def _write(setup: str, section: dict, out: Path) -> None:
    base = out if out.exists() else RESULTS
    data = json.loads(base.read_text()) if base.exists() else {}
    data.update(DEFINITIONS)
    data.setdefault("setups", {})[setup] = section
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))


# --------------------------------------------------------------------------- plot


def _k(n) -> str:
    return "?" if n is None else f"{n / 1000:.1f}K" if n >= 1000 else f"{n:.0f}"


def plot(results: Path = RESULTS, out: Path | None = None) -> Path:
    """One row per setup (own scales): TTFT and decode tok/s, dense vs ParisKV, per
    workflow; each workflow's label gives the ParisKV codes reused vs encoded during it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())["setups"]
    fig, axes = plt.subplots(len(data), 2, figsize=(10, 3.6 * len(data)), squeeze=False)
    for row, (setup, sec) in zip(axes, data.items()):
        wfs = list(sec["workflows"].items())
        x = range(len(wfs))
        labels = [
            f"{wf.replace('_', ' ')}\nreused {_k(r['prefix_tokens_reused'])} / "
            f"encoded {_k(r['prefix_tokens_encoded'])}"
            for wf, r in wfs
        ]
        for ax, key, ylabel in (
            (row[0], "ttft_ms", "time to first token, ms (median)"),
            (row[1], "tok_s", "decode tok/s per request (median)"),
        ):
            for off, mode, name in ((-0.2, "dense", "dense"), (0.2, "pariskv", "ParisKV")):
                vals = [r[f"{mode}_{key}"] or 0 for _, r in wfs]
                bars = ax.bar([i + off for i in x], vals, 0.4, label=name)
                ax.bar_label(
                    bars, labels=[f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in vals], fontsize=7
                )
            ax.set_xticks(list(x), labels, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{setup}: {sec.get('model', '')[:60]}", fontsize=8)
            ax.margins(y=0.15)
            ax.legend(loc="lower right", fontsize=7)
    fig.suptitle(
        "SGLang workflows, dense vs --enable-pariskv (labels: ParisKV codes reused / "
        "encoded during the workflow)",
        fontsize=9,
    )
    fig.tight_layout()
    out = out or results.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser(
        "run",
        help="run one setup (dense server, then ParisKV server)",
        formatter_class=HelpFormatter,
    )
    r.add_argument("--setup", choices=sorted(SETUPS), required=True, help="model and workload")
    r.add_argument("--doc-tokens", type=int, help="document tokens (default: the setup's)")
    r.add_argument(
        "--rounds",
        type=int,
        help="frontend program runs, one document each (default: the setup's)",
    )
    r.add_argument(
        "--questions", type=int, help="forks per frontend program (default: the setup's)"
    )
    r.add_argument("--users", type=int, help="chat users (default: the setup's)")
    r.add_argument("--turns", type=int, help="turns per chat user (default: the setup's)")
    r.add_argument(
        "--health-timeout",
        type=float,
        default=900.0,
        help="seconds to wait for /health_generate (a first start JIT-compiles "
        "FlashInfer for ~5 min)",
    )
    r.add_argument("--log-dir", help="server logs and stats files (default: a temp dir)")
    r.add_argument("--out", type=Path, default=RESULTS, help="results JSON to merge into")
    r.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra launch_server argument for both servers, one token each: "
        "--server-arg=--chunked-prefill-size --server-arg=4096",
    )
    r.add_argument(
        "--warm-only",
        action="store_true",
        help="start both servers and warm them up (fills JIT caches), measure nothing",
    )
    p = sub.add_parser(
        "plot", help="draw workflows.png from workflows.json", formatter_class=HelpFormatter
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="results JSON to draw")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "plot":
        print(plot(args.results))
        return 0
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    section = run_setup(args.setup, args)
    if args.warm_only:
        return 0
    _write(args.setup, section, args.out)
    print(f"wrote {args.out}")
    for wf, w in section["workflows"].items():
        print(
            f"{wf:20} TTFT dense {w['dense_ttft_ms']:.1f} ms / ParisKV {w['pariskv_ttft_ms']:.1f} "
            f"ms; tok/s dense {w['dense_tok_s'] or 0:.1f} / ParisKV {w['pariskv_tok_s'] or 0:.1f}; "
            f"reused {w['prefix_tokens_reused']:.0f}, encoded {w['prefix_tokens_encoded']:.0f}; "
            f"answers match dense: {w['answers_match_dense']}"
        )
    try:
        print(plot(args.out))
    except Exception as e:  # matplotlib missing on the device: plot here later
        print(f"plot skipped ({e!r}); run `bench_workflows.py plot` where matplotlib is")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
