"""Host offload at 128K-1M tokens on one GPU: per-token decode latency, its breakdown and
its byte floor, next to dense attention where dense fits.

    python benchmarks/bench_offload.py --cases 131072x1 131072x4 524288x1 1048576x1

Model: a Qwen2.5-7B-Instruct-1M shape (28 layers, 28 q / 4 KV heads, D 128, hidden
3584, MLP 18944, vocab 152064), bf16, batch of independent requests. What one decode step
costs is measured in pieces, each a CUDA graph of all 28 layers (as SGLang replays a
decode step), in the same run:

* ``weights``: the step's GEMVs (QKV, O, gate/up, down per layer, then the LM head) with
  random matrices of the model's shapes. Every layer reads its matrices from HBM.
* ParisKV with ``--pariskv-offload host``: the K/V of every token in a pinned
  :class:`HostKVPool` (written by the UVA scatter kernel), codes on the GPU. Per layer:
  retrieval (``DecodeWorkspace.run``), the hot-cache fetch (``OffloadFetcher.fetch``: the
  fused Triton lookup + UVA gather of the misses + insert, ``kernels.hot_cache_fetch``),
  and FlashInfer's head-as-batch decode over the staged rows. ``retrieval``, ``fetch`` and
  ``attention`` are differences of graphs (retrieval; + fetch; + attention).
  Queries follow a random walk (``q += drift * |q| * noise``), so the top-k drifts
  between steps as in decoding and the hot cache is measured, not assumed; the hit rate
  is counted on the GPU over the timed steps. ``direct``: the same step with no hot
  cache, FlashInfer reading the retrieved rows from host memory through the pool's CUDA
  views (zero-copy).
* dense: FlashInfer decode over all N tokens of a GPU KV pool of all layers, when weights
  + that pool fit in 90% of the GPU (otherwise OOM: the pool is allocated to find out).

Keys are Gaussian (timing does not depend on their values). Byte floor of a ParisKV step:
(weights + sign rows scanned + rerank codes of the candidates + attended rows read from
the staging buffer) / HBM copy bandwidth + fetched rows / measured UVA gather bandwidth of
the same 256 B rows (both measured in this run).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from pariskv_tools.cli import HelpFormatter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import graph_of  # noqa: E402
from step_floor import hbm_bandwidth_gbs, step_bytes  # noqa: E402

SHAPE = {
    "name": "Qwen2.5-7B-Instruct-1M shape",
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "vocab_size": 152064,
}
L, HQ, HKV, D = 28, 28, 4, 128
DTYPE = torch.bfloat16
KV_BYTES_PER_TOKEN = L * HKV * 2 * D * 2
RESULTS = Path(__file__).resolve().parent / "results" / "offload.json"


def time_steps(replay, before_step=None, steps: int = 12, warmup: int = 3) -> float:
    """Median ms of ``replay`` over ``steps`` steps; ``before_step`` (not timed) advances
    the queries."""
    times = []
    for i in range(warmup + steps):
        if before_step is not None:
            before_step()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        stop.record()
        stop.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def weights_nbytes() -> int:
    """bf16 bytes of the matrices one decode step reads (the embedding is a gather)."""
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    per_layer = h * (HQ + 2 * HKV) * D + HQ * D * h + h * 2 * i + i * h
    return 2 * (L * per_layer + h * v)


class Weights:
    """The step's GEMVs: one layer's matrices (re-read by every layer) and the LM head."""

    def __init__(self, batch: int, dev):
        h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
        shapes = [(h, (HQ + 2 * HKV) * D), (HQ * D, h), (h, 2 * i), (i, h), (h, v)]
        self.mats = [torch.randn(*s, device=dev, dtype=DTYPE) * 0.01 for s in shapes]
        self.ins = [torch.randn(batch, s[0], device=dev, dtype=DTYPE) for s in shapes]
        self.outs = [torch.empty(batch, s[1], device=dev, dtype=DTYPE) for s in shapes]

    def step(self):
        for _ in range(L):
            for j in range(4):
                torch.mm(self.ins[j], self.mats[j], out=self.outs[j])
        torch.mm(self.ins[4], self.mats[4], out=self.outs[4])


def dense_case(n: int, batch: int, weights_bytes: int, dev) -> dict:
    """FlashInfer decode over every token of an all-layer GPU pool, or OOM."""
    import flashinfer

    total = torch.cuda.get_device_properties(dev).total_memory
    need = weights_bytes + batch * n * KV_BYTES_PER_TOKEN
    out = {"dense_gib_needed": need / 2**30, "gpu_gib": total / 2**30}
    if need > 0.9 * total:
        out["dense_error"] = (
            f"OOM: weights + KV = {need / 2**30:.1f} GiB > 90% of {total / 2**30:.1f} GiB"
        )
        return out
    try:
        slots = batch * n + 1
        ks = [torch.empty(slots, 1, HKV, D, device=dev, dtype=DTYPE) for _ in range(L)]
        vs = [torch.empty(slots, 1, HKV, D, device=dev, dtype=DTYPE) for _ in range(L)]
    except torch.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        out["dense_error"] = f"OOM allocating the pool: {e}"
        return out
    for t in ks + vs:
        t.normal_()
    wbuf = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        wbuf, "NHD", use_cuda_graph=True,
        paged_kv_indptr_buffer=torch.arange(batch + 1, device=dev, dtype=torch.int32) * n,
        paged_kv_indices_buffer=torch.arange(1, slots, device=dev, dtype=torch.int32),
        paged_kv_last_page_len_buffer=torch.ones(batch, device=dev, dtype=torch.int32),
        use_tensor_cores=True,
    )  # fmt: skip
    w.plan(
        torch.arange(batch + 1, dtype=torch.int32) * n,
        torch.arange(1, slots, dtype=torch.int32),
        torch.ones(batch, dtype=torch.int32),
        HQ, HKV, D, 1, q_data_type=DTYPE, kv_data_type=DTYPE,
    )  # fmt: skip
    q = torch.randn(batch, HQ, D, device=dev, dtype=DTYPE)
    g = graph_of(lambda: [w.run(q, (ks[i], vs[i])) for i in range(L)])
    out["dense_attention_ms"] = time_steps(g.replay)
    return out  # the caller empties torch's cache once the pool is out of scope


class OffloadState:
    """Host K/V pool and GPU codes for ``slots`` tokens, all layers."""

    def __init__(self, slots: int, dev):
        from sglang_pariskv.index.code_pool import CodePool
        from sglang_pariskv.offload.host_pool import HostKVPool

        t0 = time.perf_counter()
        self.host = HostKVPool(slots, L, HKV, D, dtype=DTYPE)
        self.k_views, self.v_views = self.host.cuda_views(dev)
        self.codes = CodePool(slots, HKV, D, L, dev)
        step = 1 << 18
        for layer in range(L):
            for s in range(1, slots, step):
                idx = torch.arange(s, min(s + step, slots), device=dev)
                k = torch.randn(idx.numel(), HKV, D, device=dev, dtype=DTYPE)
                v = torch.randn(idx.numel(), HKV, D, device=dev, dtype=DTYPE)
                self.codes.write(layer, idx, k)
                self.host.write(layer, idx, k, v)
        torch.cuda.synchronize()
        self.setup_s = time.perf_counter() - t0


def pariskv_case(
    n: int,
    batch: int,
    st: OffloadState,
    lines: int,
    drift: float,
    dev,
    steps: int,
    direct: bool = True,
    stages: tuple[str, ...] | None = None,
) -> dict:
    """Times the step graphs named in ``stages`` (all four by default) for one case; see the
    module docstring for what each covers."""
    from sglang_pariskv.attention.sparse_decode import HeadAsBatchDecode
    from sglang_pariskv.config import ParisKVConfig
    from sglang_pariskv.kernels import DecodeWorkspace
    from sglang_pariskv.offload.fetch import OffloadFetcher
    from sglang_pariskv.offload.hot_cache import HotCache

    cfg = ParisKVConfig(topk=2048, sink=64, local=256)
    rtt = (torch.arange(batch * n, device=dev, dtype=torch.int32) + 1).view(batch, n)
    rpi = torch.arange(batch, device=dev, dtype=torch.int32)
    seq = torch.full((batch,), n, dtype=torch.int32)
    ws = DecodeWorkspace(cfg, HQ, HKV, D, batch, n, dev)
    dec = HeadAsBatchDecode(ws, DTYPE, graph_batch=batch)
    dec.plan(seq)
    rows, entries = dec.rows, dec.entries()
    cache = HotCache(L, lines, HKV, 2 * D, ws.kv_indices.numel(), DTYPE, dev)
    fetcher = OffloadFetcher(st.host, cache)
    gen = torch.Generator(device=dev).manual_seed(0)
    qs = [torch.randn(batch, HQ, D, device=dev, dtype=DTYPE, generator=gen) for _ in range(L)]
    out = torch.empty(batch, HQ, D, device=dev, dtype=DTYPE)

    def advance():
        for q in qs:
            noise = torch.randn(q.shape, device=dev, dtype=torch.float32, generator=gen)
            qf = q.float()
            q.copy_(qf + drift * qf.norm(dim=-1, keepdim=True) / D**0.5 * noise)

    def retrieve(layer):
        ws.run(qs[layer], st.codes.layers[layer], rtt, rpi)

    def fetch(layer, f=fetcher):
        idx = ws.kv_indices[:entries]
        f.fetch(layer, ws.kv_indptr[: rows + 1], idx, out=idx)

    def step_retrieval():
        for layer in range(L):
            retrieve(layer)

    def step_fetch():
        for layer in range(L):
            retrieve(layer)
            fetch(layer)

    def step_full():
        for layer in range(L):
            retrieve(layer)
            fetch(layer)
            out.copy_(dec.run_staged(qs[layer], fetcher.staging_kv()))

    def step_direct():
        for layer in range(L):
            retrieve(layer)
            out.copy_(dec.run(qs[layer], st.k_views[layer], st.v_views[layer]))

    res = {}
    for name, fn in (
        ("retrieval", step_retrieval),
        ("retrieval_fetch", step_fetch),
        ("full", step_full),
        ("direct", step_direct),
    ):
        if (name == "direct" and not direct) or (stages is not None and name not in stages):
            continue
        cache.reset()
        g = graph_of(fn)
        cache.reset()
        for _ in range(3):  # warm the cache over a few steps, then count
            advance()
            g.replay()
        cache.counters.zero_()
        res[name] = time_steps(g.replay, advance, steps=steps, warmup=0)
        if name == "full":
            res["hot_cache"] = cache.stats()
            res["hot_cache"]["steps"] = steps
        del g
    res["num_candidates"] = int(ws.run(qs[0], st.codes.layers[0], rtt, rpi).num_candidates[0])
    res["hot_cache_mib"] = cache.nbytes() / 2**20
    return res


def uva_gather_gbps(st: OffloadState, rows: int) -> float:
    from sglang_pariskv.kernels.uva_gather import gather_bandwidth

    return gather_bandwidth(st.host.layer_rows(0, 0), rows)["gbps"]


def floor_ms(n: int, batch: int, weights_bytes: int, miss_rows: float, hbm: float, uva: float):
    """(bytes from HBM) / hbm + (bytes over PCIe) / uva, in ms; see the module docstring."""
    b = step_bytes(SHAPE, n, batch, {"topk": 2048, "sink": 64, "local": 256})
    gpu_bytes = weights_bytes + batch * b["per_request"]
    pcie_bytes = miss_rows * 2 * D * 2
    return 1000 * (gpu_bytes / (hbm * 1e9) + pcie_bytes / (uva * 1e9)), gpu_bytes, pcie_bytes


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument(
        "--cases",
        nargs="+",
        default=["131072x1", "524288x1", "1048576x1"],
        help="cases NxB: N tokens per request, B requests",
    )
    ap.add_argument(
        "--hot-cache-lines", type=int, default=65536, help="hot-cache rows per layer on the GPU"
    )
    ap.add_argument(
        "--drift",
        type=float,
        default=0.25,
        help="query random-walk step between decode steps, relative to |q|",
    )
    ap.add_argument("--steps", type=int, default=12, help="timed decode steps per case")
    ap.add_argument("--no-direct", action="store_true", help="skip the no-hot-cache variant")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    ap.add_argument("--plot", type=Path, help="only draw the PNG of an existing JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:
        print(plot(args.plot))
        return 0
    dev = torch.device("cuda")
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases]
    t0 = time.perf_counter()
    hbm = hbm_bandwidth_gbs()
    report = {
        "device": torch.cuda.get_device_name(dev),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join(["python", *sys.argv]),
        "shape": SHAPE,
        "config": {
            "topk": 2048,
            "sink": 64,
            "local": 256,
            "offload": "host",
            "hot_cache_lines": args.hot_cache_lines,
        },  # fmt: skip
        "query_drift": args.drift,
        "hbm_copy_gbs": hbm,
        "method": __doc__.split("\n\n", 2)[2],
        "cases": [],
    }
    try:
        import flashinfer
        import triton

        report.update(flashinfer=flashinfer.__version__, triton=triton.__version__)
    except Exception:
        pass
    per_batch = {}
    for _, b in cases:
        if b not in per_batch:
            w = Weights(b, dev)
            g = graph_of(w.step)
            per_batch[b] = time_steps(g.replay)
            del g, w
    torch.cuda.empty_cache()
    wbytes = weights_nbytes()
    dense = {}
    for c in cases:
        dense[c] = dense_case(*c, wbytes, dev)
        torch.cuda.empty_cache()
    st = OffloadState(max(n * b for n, b in cases) + 1, dev)
    report["setup_s"] = st.setup_s
    uva = uva_gather_gbps(st, 1 << 18)
    report["uva_gather_gbs_256B_rows"] = uva
    report["weights_bytes"] = wbytes
    for n, b in cases:
        r = pariskv_case(
            n, b, st, args.hot_cache_lines, args.drift, dev, args.steps, not args.no_direct
        )
        torch.cuda.empty_cache()
        hc = r["hot_cache"]
        miss_rows = hc["rows_fetched"] / hc["steps"]
        floor, gpu_b, pcie_b = floor_ms(n, b, wbytes, miss_rows, hbm, uva)
        case = {
            "context": n,
            "batch": b,
            "weights_ms": per_batch[b],
            "retrieval_ms": r["retrieval"],
            "fetch_ms": r["retrieval_fetch"] - r["retrieval"],
            "attention_ms": r["full"] - r["retrieval_fetch"],
            "pariskv_ms_per_token": per_batch[b] + r["full"],
            "pariskv_direct_ms_per_token": per_batch[b] + r["direct"] if "direct" in r else None,
            "hot_cache_hit_rate": hc["hit_rate"],
            "hot_cache": hc,
            "hot_cache_mib": r["hot_cache_mib"],
            "num_candidates": r["num_candidates"],
            "floor_ms": floor,
            "floor_gpu_bytes": gpu_b,
            "floor_pcie_bytes": pcie_b,
            **dense[(n, b)],
        }
        case["dense_ms_per_token"] = (
            per_batch[b] + case["dense_attention_ms"] if "dense_attention_ms" in case else None
        )
        case["pariskv_over_floor"] = case["pariskv_ms_per_token"] / floor
        report["cases"].append(case)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))  # kept if a later case fails
        keys = ("context", "batch", "dense_ms_per_token", "pariskv_ms_per_token",
                "pariskv_direct_ms_per_token", "floor_ms", "hot_cache_hit_rate",
                "retrieval_ms")  # fmt: skip
        print(json.dumps({k: case.get(k) for k in keys}), flush=True)
    st.host.close()
    report["wall_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(args.out)
    print_table(report)
    return 0


def print_table(report: dict) -> None:
    print(f"{report['device']}  HBM {report['hbm_copy_gbs']:.0f} GB/s  "
          f"UVA gather (256 B rows) {report['uva_gather_gbs_256B_rows']:.1f} GB/s")  # fmt: skip
    print("context batch  dense   pariskv  direct  floor  weights retr  fetch  attn  hit")
    for c in report["cases"]:
        dense = f"{c['dense_ms_per_token']:.2f}" if c["dense_ms_per_token"] else "OOM"
        print(
            f"{c['context']:>7} {c['batch']:>5} {dense:>6} {c['pariskv_ms_per_token']:8.2f} "
            f"{c['pariskv_direct_ms_per_token'] or 0:7.2f} {c['floor_ms']:6.2f} "
            f"{c['weights_ms']:7.2f} "
            f"{c['retrieval_ms']:5.2f} {c['fetch_ms']:6.2f} {c['attention_ms']:5.2f} "
            f"{c['hot_cache_hit_rate']:.2f}"
        )


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    cases = data["cases"]
    labels = [f"{c['context'] // 1024}K x{c['batch']}" for c in cases]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    x = range(len(cases))
    parts = [("weights_ms", "weights"), ("retrieval_ms", "retrieval"), ("fetch_ms", "fetch"),
             ("attention_ms", "attention")]  # fmt: skip
    bottom = [0.0] * len(cases)
    for key, name in parts:
        vals = [max(c[key], 0.0) for c in cases]
        a.bar(x, vals, 0.5, bottom=bottom, label=name)
        bottom = [u + v for u, v in zip(bottom, vals)]
    a.scatter(x, [c["floor_ms"] for c in cases], color="k", marker="_", s=400, label="byte floor")
    a.set_xticks(list(x), labels)
    a.set_ylabel("ms per decode step")
    a.set_title("ParisKV + host offload: step breakdown")
    a.legend()
    w = 0.27
    series = (
        (-w, "dense_ms_per_token", "dense (GPU KV)"),
        (0, "pariskv_ms_per_token", "ParisKV offload + hot cache"),
        (w, "pariskv_direct_ms_per_token", "ParisKV offload, direct"),
    )
    for off, key, name in series:
        vals = [c[key] or 0.0 for c in cases]
        bars = b.bar([i + off for i in x], vals, w, label=name)
        for i, c in enumerate(cases):
            if key.startswith("dense") and c[key] is None:
                b.text(bars[i].get_x(), 0.5, "OOM", rotation=90, fontsize=8)
    b.axhline(25, color="gray", ls="--", lw=1, label="target 25 ms")
    b.set_xticks(list(x), labels)
    b.set_ylabel("ms per token")
    b.set_title(f"{data['shape']['name']}, {data['device']}")
    b.legend(fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
