"""ParisKV retrieval kernels inside a model-like decode step vs alone: where do they slow down?

SGLang's profile of a 128K x 2 step (results/profile_decode_128k_b2.json) times the
candidate write + rerank at 36 us per layer, while the same kernel takes about 19.5 us
alone. This bench replays one CUDA graph of ``--layers``
layers' retrieval in several settings and reports each retrieval kernel's mean duration
(torch.profiler, CUPTI kernel times):

* ``alone``: every layer reads the same code pool, nothing else runs;
* ``per_layer_pools``: each layer has its own code pool (as in SGLang: 32 pools);
* ``step``: per-layer pools plus a weight-streaming matmul between layers sized like the
  layer's weight GEMMs (Llama-3.1-8B: about 436 MB per layer in bf16);
* ``lagged_step``: ``step`` with each layer's collision stage (scan and count) moved off the
  critical path: it runs on a side stream from this step's query table and leaves its
  scores for the next step, while the layer's rerank, top-k and assembly read the scores the
  previous step left (candidates from the previous step's query, reranked with this step's;
  its quality: ``python -m pariskv_tools.eval reuse``, docs/retrieval_quality.md); the
  side stream starts once the layer's query table is made, beside the rerank;
* ``lagged_late_step``: the same, with the side stream started after the layer's rerank,
  so that it runs beside the top-k, the assembly and the next layer's matmul instead;
* ``weights``: the matmuls alone, the floor the other step modes add retrieval to.

``step_ms`` of ``step`` and of a lagged mode against ``weights`` is what the collision stage
costs a decode step on its critical path, and what running it a step ahead would save.
``--rerank keys`` times the rerank by the stored keys (``--pariskv-rerank keys``): the code
pools hold signs only, and every layer reads one shared K buffer (a request's keys are
megabytes per layer, far beyond L2, so sharing it changes no read).

    python benchmarks/bench_retrieval_in_step.py --out benchmarks/results/retrieval_in_step.json

``--combine`` gathers runs of several batch sizes (each with the ``weights`` mode) into one
file with, per batch, what retrieval adds to a step in each step mode, and draws it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from pariskv_tools.cli import HelpFormatter

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_kernels as bk  # noqa: E402

#: Kernel-name fragments of the retrieval stages, in pipeline order.
STAGE_KERNELS = {
    "query_table": "query_table_kernel",
    "scan": "scan_",
    "count": "_count_kernel",
    "write_rerank": "select_rerank_kernel",
    "write": "_write_kernel",
    "rerank": "rerank_kernel",
    "topk": "topk_kernel",
    "assemble": "_assemble_kernel",
}
MODES = ("alone", "per_layer_pools", "step", "lagged_step", "lagged_late_step", "weights")
#: The step modes that run the collision stage a step ahead.
LAGGED = ("lagged_step", "lagged_late_step")
#: The modes with a matmul between layers, which the ``weights`` mode is the floor of.
STEP_MODES = ("step", *LAGGED)


def stage_means_us(events: list[tuple[str, float]]) -> dict[str, float]:
    """Mean duration (us) per retrieval stage from (kernel name, duration us) pairs; kernels
    of no stage (the matmul, copies) are left out."""
    acc: dict[str, list[float]] = defaultdict(list)
    for name, us in events:
        for stage, frag in STAGE_KERNELS.items():
            if frag in name:
                acc[stage].append(us)
                break
    return {s: sum(v) / len(v) for s, v in acc.items()}


def kernel_events(prof) -> list[tuple[str, float]]:
    out = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out.append((e.name, e.time_range.elapsed_us()))
    return out


def profiled_graph(step, replays: int = 5):
    """Capture ``step`` in a CUDA graph, warm it up, and profile ``replays`` replays:
    (the graph, (kernel name, duration us) of every kernel run)."""
    g = bk.graph_of(step)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    return g, kernel_events(prof)


def run(
    n: int,
    batch: int,
    layers: int,
    weight_mb: float,
    dev,
    modes: tuple[str, ...] = MODES,
    candidate_ratio: float | None = None,
    rerank: str = "code",
) -> dict:
    """{mode: stage means (us) and step_ms} of the workspace's retrieval, ``layers``
    layers per CUDA graph; ``candidate_ratio`` None: the served length-adaptive one;
    ``rerank``: "code" or "keys" (``--pariskv-rerank``)."""
    from sglang_pariskv.codec.encode import KeyCodes
    from sglang_pariskv.config import ParisKVConfig
    from sglang_pariskv.kernels import DecodeWorkspace

    pools = bk.Pools(n * batch + 1, dev)
    # request r holds slots [r * n + 1, (r + 1) * n], as bench_kernels' cases
    rtt = (torch.arange(batch * n, device=dev, dtype=torch.int32) + 1).view(batch, n)
    rpi = torch.arange(batch, device=dev, dtype=torch.int32)
    seq = torch.full((batch,), n, dtype=torch.int32)
    q = torch.randn(batch, bk.HQ, bk.D, device=dev, dtype=bk.DTYPE)
    keys = pools.k if rerank == "keys" else None
    del pools.k, pools.v
    first = pools.codes
    if keys is not None:  # a pool without records, as --pariskv-rerank keys serves
        first = KeyCodes(first.signs, first.mags[..., :0], first.weights[..., :0])
    codes = [first] + [KeyCodes(*(t.clone() for t in first)) for _ in range(layers - 1)]
    cols = int(weight_mb * 1e6 / 2 / 4096)
    w = torch.randn(4096, cols, device=dev, dtype=torch.bfloat16)
    x = torch.randn(batch, 4096, device=dev, dtype=torch.bfloat16)
    cfg = ParisKVConfig(
        topk=2048, sink=64, local=256, candidate_ratio=candidate_ratio, rerank=rerank
    )
    ws = DecodeWorkspace(cfg, bk.HQ, bk.HKV, bk.D, batch, n, dev)
    ws.plan(seq)
    return modes_of(ws, codes, q, rtt, rpi, x, w, layers, modes, keys)


class LaggedCollision:
    """Per-layer buffers of the collision stage run a step ahead, in two sets (steps
    alternate between them): the step of parity ``p`` writes set ``p`` on the side stream
    and reranks from set ``1 - p``, which the previous step wrote. The query table is per
    layer too, so that the side stream of layer ``l`` reads its own while the main stream
    has moved on to layer ``l + 1``."""

    def __init__(self, ws, layers: int, keys=None) -> None:
        from sglang_pariskv.kernels.select import CandidateBuffers

        if not ws.use_cuda:
            raise SystemExit("lagged_step needs the csrc/ kernels (a CUDA build)")
        rows = ws.max_batch * ws.hkv
        self.ws, self.keys = ws, keys
        self.side = torch.cuda.Stream(ws.device)
        self.table = [torch.empty_like(ws.table) for _ in range(layers)]
        self.scores = [[torch.zeros_like(ws.scores) for _ in range(layers)] for _ in range(2)]
        self.hist = [[torch.zeros_like(ws.score_hist) for _ in range(layers)] for _ in range(2)]
        self.sel = [
            [CandidateBuffers(rows, ws.max_context, ws.sel.chunk, ws.device) for _ in range(layers)]
            for _ in range(2)
        ]

    def _collide_into(self, p: int, layer: int, q, codes, rtt, rpi) -> None:
        """Bind the workspace to set ``p`` of ``layer`` and run the query table there."""
        ws = self.ws
        ws.table, ws.score_hist = self.table[layer], self.hist[p][layer]
        ws.scores, ws.sel = self.scores[p][layer], self.sel[p][layer]
        ws.bind(q, codes, rtt, rpi, keys=self.keys)
        ws._stage_query_table()

    def prime(self, q, codes: list, rtt, rpi) -> None:
        """Fill both sets of every layer, as a request's first sparse step would inline:
        the first lagged step then reranks from valid scores and thresholds."""
        for p in (0, 1):
            for layer, c in enumerate(codes):
                self._collide_into(p, layer, q, c, rtt, rpi)
                self.ws._stage_scan()
                self.ws._stage_select()
        torch.cuda.synchronize()

    def layer(self, p: int, layer: int, q, codes, rtt, rpi, late: bool = False) -> None:
        """One layer of a step of parity ``p``; ``late``: the side stream starts after the
        layer's rerank instead of after its query table."""
        ws = self.ws
        self._collide_into(p, layer, q, codes, rtt, rpi)
        st = ws._st
        ahead = (self.scores[p][layer][: st.r], self.sel[p][layer])
        behind = (self.scores[1 - p][layer][: st.r], self.sel[1 - p][layer])

        def collide_ahead() -> None:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                st.scores, ws.sel = ahead
                ws._stage_scan()
                ws._stage_select()

        if not late:
            collide_ahead()
        st.scores, ws.sel = behind
        ws._stage_rerank()
        if late:
            collide_ahead()
        ws._stage_topk()
        ws._stage_assemble()

    def join(self) -> None:
        torch.cuda.current_stream().wait_stream(self.side)


def lagged_indices_match(ws, replay, q, codes, rtt, rpi, keys=None) -> bool:
    """The query does not move between the bench's steps, so the candidates a step ahead
    are the step's own and the lagged pipeline must attend to the very indices of the
    inline one (the last layer's, which the index buffer holds after a step)."""
    replay()
    torch.cuda.synchronize()
    lagged = ws.kv_indices.clone()
    indptr = ws.run(q, codes[-1], rtt, rpi, keys=keys).kv_indptr.tolist()
    # the top-k kernel writes a row's selection in no fixed order: compare sets per row
    return all(
        torch.equal(lagged[a:b].sort().values, ws.kv_indices[a:b].sort().values)
        for a, b in zip(indptr[:-1], indptr[1:], strict=True)
    )


def modes_of(ws, codes, q, rtt, rpi, x, w, layers: int, modes=MODES, keys=None) -> dict:
    """Time each mode; ``keys``: the K buffer the rerank by the keys reads (None: the code
    rerank)."""
    res = {}
    lagged = None
    if set(LAGGED) & set(modes):
        lagged = LaggedCollision(ws, layers, keys)
        lagged.prime(q, codes, rtt, rpi)
    for mode in modes:

        def step(mode=mode, p=0):
            for layer in range(layers):
                if mode in (*STEP_MODES, "weights"):
                    torch.matmul(x, w)
                if mode in LAGGED:
                    late = mode == "lagged_late_step"
                    lagged.layer(p, layer, q, codes[layer], rtt, rpi, late)
                elif mode != "weights":
                    ws.run(q, codes[0] if mode == "alone" else codes[layer], rtt, rpi, keys=keys)
            if mode in LAGGED:
                lagged.join()

        g, events = profiled_graph(step)
        replay = g.replay
        if mode in LAGGED:  # steps alternate between the two sets of buffers
            g1 = bk.graph_of(lambda: step(p=1))

            def replay(g=g, g1=g1):
                g.replay()
                g1.replay()

        res[mode] = stage_means_us(events)
        res[mode]["step_ms"] = bk.bench_ms(replay) / (2 if mode in LAGGED else 1)
        if mode in LAGGED:
            res[mode]["indices_match_step"] = lagged_indices_match(
                ws, replay, q, codes, rtt, rpi, keys
            )
        print(mode, {k: round(v, 1) for k, v in res[mode].items()}, flush=True)
    return res


def grouped_bars(ax, groups: list[str], series: dict[str, list[float]]) -> None:
    """One bar per (group, series), the series side by side within each group."""
    wdt = 0.8 / max(len(series), 1)
    for i, (label, vals) in enumerate(series.items()):
        off = (i - (len(series) - 1) / 2) * wdt
        ax.bar([j + off for j in range(len(groups))], vals, wdt, label=label)
    ax.set_xticks(range(len(groups)), groups)


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = json.loads(path.read_text())
    stages = list(STAGE_KERNELS)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    shown = [m for m in MODES if m in rep["modes"] and m != "weights"]
    grouped_bars(ax, stages, {m: [rep["modes"][m].get(s, 0.0) for s in stages] for m in shown})
    ax.set_ylabel("mean kernel time per layer (us)")
    ax.set_title(f"retrieval kernels in a step vs alone, {rep['N'] // 1024}K x {rep['batch']}, "
                 f"{rep['device']}")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def combine(paths: list[Path], git_commit: str | None = None) -> dict:
    """Runs of one device (one file per batch size and rerank, each with the ``weights``
    mode) as one results file: the runs as written, and per batch and rerank what retrieval
    adds to a step in each step mode (its ``step_ms`` minus the weights-only step's)."""
    runs = [json.loads(p.read_text()) for p in paths]
    devices = sorted({r["device"] for r in runs})
    if len(devices) != 1:
        raise SystemExit(f"--combine: runs from several devices {devices}; combine one device's")
    added = {}
    for path, r in zip(paths, runs, strict=True):
        modes = r["modes"]
        if "weights" not in modes:
            raise SystemExit(f"--combine: {path} has no 'weights' mode; rerun it with one")
        floor = modes["weights"]["step_ms"]
        rerank = r.get("rerank", "code")  # runs of both reranks: one column each per batch
        added[str(r["batch"]) if rerank == "code" else f"{r['batch']} ({rerank})"] = {
            m: modes[m]["step_ms"] - floor for m in STEP_MODES if m in modes
        }  # fmt: skip
    out = {"device": devices[0], "versions": runs[0]["versions"]}
    if git_commit:
        out["git_commit"] = git_commit
    return out | {
        "what": f"{runs[0]['layers']} layers of retrieval at {runs[0]['N']} tokens per request "
        f"in one CUDA graph, a {runs[0]['weight_mb_per_layer']:g} MB matmul between layers; "
        "added_ms: each step mode's step_ms minus the weights-only step's",
        "runs": runs,
        "added_ms": added,
    }


def plot_added(path: Path) -> Path:
    """Bars of what retrieval adds to a step, per batch and step mode, of a combined file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = json.loads(path.read_text())
    batches = list(rep["added_ms"])
    shown = [m for m in STEP_MODES if any(m in v for v in rep["added_ms"].values())]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    added = {m: [rep["added_ms"][b].get(m, 0.0) for b in batches] for m in shown}
    grouped_bars(ax, [f"batch {b}" for b in batches], added)
    ax.set_ylabel("ms retrieval adds to a step")
    ax.set_title(f"{rep['runs'][0]['N'] // 1024}K tokens per request, {rep['device']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument("--n", type=int, default=131072, help="tokens per request")
    ap.add_argument("--batch", type=int, default=2, help="requests")
    ap.add_argument("--layers", type=int, default=32, help="layers in the replayed graph")
    ap.add_argument(
        "--weight-mb",
        type=float,
        default=436.0,
        help="weights streamed between layers in the 'step' mode, MB per layer",
    )
    ap.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="settings to time"
    )
    ap.add_argument(
        "--candidate-ratio",
        type=float,
        help="candidates per zone token (the rerank's reads; default: the served "
        "length-adaptive ratio, 0.1 from 30K tokens)",
    )
    ap.add_argument(
        "--rerank",
        choices=("code", "keys"),
        default="code",
        help="what the rerank reads: the 3-bit codes or the stored keys (--pariskv-rerank)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/retrieval_in_step.json"),
        help="results JSON",
    )
    ap.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="run nothing: write the runs in these results files (one device, one batch "
        "each, with the weights mode) to --out as one file, and draw it",
    )
    ap.add_argument(
        "--git-commit", help="with --combine: the commit the runs measured (the host has no .git)"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.combine:
        if args.out in args.combine:
            raise SystemExit("--combine: --out must not be one of the files combined")
        args.out.write_text(json.dumps(combine(args.combine, args.git_commit), indent=1))
        print(plot_added(args.out))
        return 0
    dev = torch.device("cuda")
    t0 = time.time()
    rep = {
        "device": torch.cuda.get_device_name(dev),
        "versions": bk.versions(),
        "command": "python " + " ".join(sys.argv),
        "N": args.n,
        "batch": args.batch,
        "layers": args.layers,
        "weight_mb_per_layer": args.weight_mb,
        "candidate_ratio": args.candidate_ratio,
        "rerank": args.rerank,
        "modes": run(
            args.n,
            args.batch,
            args.layers,
            args.weight_mb,
            dev,
            tuple(args.modes),
            args.candidate_ratio,
            args.rerank,
        ),
    }
    rep["wall_s"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rep, indent=1))
    try:
        print(plot(args.out))
    except ImportError as e:  # no matplotlib on the host: the JSON is the result
        print(f"no plot: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
