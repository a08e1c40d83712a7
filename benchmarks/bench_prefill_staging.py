"""Prefill over host offload: is the next layer's prefix copy hidden behind a layer's
attention?

    python benchmarks/bench_prefill_staging.py --prefix 131072 262144

One chunk's layers of a Qwen2.5-7B-Instruct-1M shape (28 query / 4 KV heads of 128,
bf16): a pinned :class:`HostKVPool` holds ``--prefix`` tokens of K/V per layer at the
slots of ``--layout`` (below), and each layer's attention is torch's fused attention
(``scaled_dot_product_attention``) of the chunk's ``--chunk`` queries (all 28 heads)
over the staged prefix K/V: the part of a chunk's prefill that reads the prefix. Per
prefix length, ms per layer (CUDA events over ``--layers`` layers, median of ``--reps``
chunks):

* ``uva``: one layer's prefix rows, K and V, gathered row by row over UVA (the gather
  kernel alone);
* ``copy``: :meth:`PrefillStaging.copy_layer` alone, as the server copies a layer (run by
  run on the copy engines where the slots lie in long runs, else the UVA gather);
* ``attention``: the attention alone, over rows already on the GPU;
* ``inline``: the copy, then the attention, on one stream;
* ``staged``: :class:`PrefillStaging` as the server runs it (each layer's rows from
  ``layer_kv``, which copies the next layer's on a side stream where the slots lie in
  runs), then the attention.

``--layout scattered`` places the prefix at random slots (a pool whose free slots
requests have fragmented), ``contiguous`` in one run (one request on a fresh server).
``staged`` near max(copy, attention) means the copy is hidden; near ``inline``, it is
not. ``staged_matches_inline``: every layer's staged attention output equals the inline
one bit for bit (a copy ahead that raced its reader would not). Writes ``--out``
(``benchmarks/results/prefill_staging.json``) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from pariskv_tools.cli import HelpFormatter
from sglang_pariskv.kernels.uva_gather import gather_rows
from sglang_pariskv.offload.host_pool import HostKVPool
from sglang_pariskv.offload.prefill_staging import PrefillStaging

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import versions  # noqa: E402
from bench_retrieval_in_step import grouped_bars  # noqa: E402
from engine_runs import git_state  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "prefill_staging.json"
HQ, HKV, D = 28, 4, 128
MODES = ("uva", "copy", "attention", "inline", "staged")


class Timer:
    """Wall time of a region: CUDA events on the GPU, the host clock on the CPU."""

    def __init__(self, dev: torch.device):
        self.cuda = dev.type == "cuda"

    def __call__(self, fn) -> float:
        """ms that ``fn()`` took (its GPU work, on the GPU)."""
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
    """The chunk's queries over the first ``n`` staged rows of ``k``, ``v`` (``[rows, HKV,
    D]``), with no mask: every prefix row precedes the chunk, so the queries are
    independent and a KV head's HQ / HKV query heads are stacked along the query axis of
    ``q`` (``[1, HKV, HQ / HKV * chunk, D]``): one fused attention per KV head, no copy
    of the staged rows."""
    kk, vv = (x[:n].transpose(0, 1).unsqueeze(0) for x in (k, v))  # [1, HKV, n, D] views
    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv)


def run(prefix: int, chunk: int, layers: int, reps: int, dev: torch.device, layout: str) -> dict:
    """ms per layer of each mode at one prefix length (see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    pin = dev.type == "cuda"
    slots_total = prefix + chunk
    host = HostKVPool(slots_total, layers, HKV, D, dtype=torch.bfloat16, pin=pin)
    host.data.normal_(generator=gen)
    if layout == "scattered":
        slots = torch.randperm(slots_total, generator=gen)[:prefix]
    else:
        slots = torch.arange(chunk, slots_total)
    slots = slots.to(torch.int32).to(dev)
    q = torch.randn(1, HKV, HQ // HKV * chunk, D, generator=gen).to(dev, torch.bfloat16)
    staging = PrefillStaging(host, prefix, dev)
    k, v = staging.kv[0]  # where the timed copies go (the staged pipeline re-plans)
    timer = Timer(dev)

    def uva(layer: int) -> None:
        for part, dst in ((0, k), (1, v)):
            rows = dst[:prefix].view(prefix, -1)
            if pin:
                gather_rows(host.slot_rows(layer, part), slots, rows)
            else:
                rows.copy_(host.slot_rows(layer, part)[slots.long()])

    def copy(layer: int) -> None:
        staging.copy_layer(layer, (k, v), use_kernel=pin)

    def layers_of(step) -> float:
        return timer(lambda: [step(layer) for layer in range(layers)]) / layers

    def staged() -> None:
        staging.plan(slots)
        for layer in range(layers):
            attention(q, *staging.layer_kv(layer), prefix)

    per_mode: dict[str, list[float]] = {m: [] for m in MODES}
    staging.plan(slots)  # the copy modes' plan (runs or not)
    for _ in range(reps + 1):  # the first round warms every kernel up
        per_mode["uva"].append(layers_of(uva))
        per_mode["copy"].append(layers_of(copy))
        per_mode["attention"].append(layers_of(lambda layer: attention(q, k, v, prefix)))
        per_mode["inline"].append(
            layers_of(lambda layer: (copy(layer), attention(q, k, v, prefix)))
        )
        per_mode["staged"].append(timer(staged) / layers)
    out: dict = {m: statistics.median(t[1:]) for m, t in per_mode.items()}
    out["copied_in_runs"] = staging.runs is not None
    # the staged pipeline must attend to the rows the UVA gather reads, bit for bit
    staging.plan(slots)
    outs = [attention(q, *staging.layer_kv(layer), prefix) for layer in range(layers)]
    out["staged_matches_inline"] = all(
        torch.equal(got, (uva(layer), attention(q, k, v, prefix))[1])
        for layer, got in enumerate(outs)
    )
    out["hidden_fraction"] = hidden_fraction(out)
    row_bytes = 2 * prefix * HKV * D * 2
    out["uva_gbs"], out["copy_gbs"] = (row_bytes / (out[m] * 1e-3) / 1e9 for m in ("uva", "copy"))
    return out


def hidden_fraction(ms: dict) -> float:
    """How much of the copy the staged pipeline hides: 1 at max(copy, attention), 0 at
    copy + attention (the inline sum of the parts)."""
    alone = min(ms["copy"], ms["attention"])
    return (ms["copy"] + ms["attention"] - ms["staged"]) / alone if alone > 0 else 0.0


def plot(rep: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(rep["cases"])
    fig, ax = plt.subplots(figsize=(7.5, 4))
    series = {m: [rep["cases"][c][m] for c in cases] for m in MODES}
    grouped_bars(ax, [f"{int(c) // 1024}K prefix" for c in cases], series)
    ax.set_ylabel("ms per layer")
    ax.set_title(f"one {rep['chunk']}-token chunk's prefix reads ({rep['layout']} slots), "
                 f"{rep['device']}")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    return path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument("--prefix", type=int, nargs="+", default=[131072, 262144],
                    help="prefix tokens before the chunk (one case each)")  # fmt: skip
    ap.add_argument("--chunk", type=int, default=8192, help="the chunk's tokens")
    ap.add_argument("--layout", choices=("scattered", "contiguous"), default="scattered",
                    help="the prefix's slots: random, or one run")  # fmt: skip
    ap.add_argument("--layers", type=int, default=8, help="layers per timed chunk")
    ap.add_argument("--reps", type=int, default=5, help="timed chunks per case")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results JSON (a PNG beside it)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.prefix) < 1 or args.chunk < 1 or args.layers < 2 or args.reps < 1:
        raise SystemExit("--prefix and --chunk must be >= 1, --layers >= 2, --reps >= 1")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = {}
    for prefix in args.prefix:
        cases[str(prefix)] = run(prefix, args.chunk, args.layers, args.reps, dev, args.layout)
        print(prefix, {k: round(v, 3) for k, v in cases[str(prefix)].items()}, flush=True)
    rep = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "versions": versions(),
        **git_state(),
        "command": " ".join([sys.executable, *sys.argv]),
        "chunk": args.chunk,
        "layout": args.layout,
        "layers": args.layers,
        "reps": args.reps,
        "what": "ms per layer of one chunk's prefix reads (module docstring)",
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rep, indent=1))
    print(f"wrote {args.out} and {plot(rep, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
