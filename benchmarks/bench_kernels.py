"""ParisKV decode kernels vs FlashInfer dense decode, per layer, on one GPU.

For each (N tokens per request, batch) case: FlashInfer dense decode (page size 1, NHD,
32 q / 8 KV heads, D 128, bf16) against ParisKV retrieval (one CUDA-graph replay of
``DecodeWorkspace.run``) + FlashInfer sparse decode over the retrieved indices ("head as
batch"), with each retrieval stage also timed alone (its own graph). Also: the HBM
ceiling (device-to-device copy, same run), the scan's achieved bandwidth, and ParisKV's
write work at prefill (encode-at-write, a block-size / warps sweep) against FlashInfer
prefill attention at 32K.

Every timing is ``triton.testing.do_bench`` (median, L2 flushed before each repetition,
so a layer's data is read cold, as when layers run one after another).

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels.json
    python benchmarks/bench_kernels.py --plot benchmarks/results/kernels.json  # -> .png
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

HQ, HKV, D = 32, 8, 128
B = D // 8
DTYPE = torch.bfloat16
KV_BYTES_PER_SLOT = 2 * HKV * D * 2  # K and V, bf16
CODE_BYTES_PER_SLOT = HKV * 6 * B
STAGES = ("query_table", "scan", "select", "rerank", "topk", "assemble")


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def graph_of(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def hbm_ceiling_gbps(dev) -> float:
    """Device-to-device copy of 2 GiB: (bytes read + bytes written) / time."""
    n = 1 << 31
    src = torch.empty(n, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * n / ms / 1e6


def fits(n: int, batch: int, free_bytes: int) -> bool:
    slots = n * batch + 1
    need = slots * (KV_BYTES_PER_SLOT + CODE_BYTES_PER_SLOT) + batch * HKV * n * 3
    return need < 0.85 * free_bytes


class Pools:
    """K/V pools and the ParisKV code pool for the largest case, shared by all cases."""

    def __init__(self, slots: int, dev) -> None:
        from sglang_pariskv.index.code_pool import CodePool
        from sglang_pariskv.kernels import encode_to_pool

        self.slots = slots
        self.k = torch.randn(slots, HKV, D, device=dev, dtype=DTYPE)
        self.v = torch.randn(slots, HKV, D, device=dev, dtype=DTYPE)
        self.codes = CodePool(slots, HKV, D, num_layers=1, device=dev).layers[0]
        step = 1 << 20
        for s in range(1, slots, step):
            e = min(s + step, slots)
            idx = torch.arange(s, e, device=dev)
            encode_to_pool(self.k[s:e], idx, self.codes)
        torch.cuda.synchronize()


def bench_encode(pools: Pools, dev, n: int = 32768, backends=("fa2", "auto")) -> dict:
    """ParisKV's write work for one layer's n prefill tokens, as serving does it: encode
    the keys into the code pool (a block-size / warps sweep); against FlashInfer prefill
    attention over the same tokens."""
    import flashinfer

    from sglang_pariskv.kernels import encode_to_pool

    keys = pools.k[1 : n + 1]
    slots = torch.arange(1, n + 1, device=dev)
    out = {"tokens": n}
    for bm, nw in ((16, 4), (32, 4), (64, 4)):

        def fn(bm=bm, nw=nw):
            encode_to_pool(keys, slots, pools.codes, block_m=bm, num_warps=nw)

        try:
            out[f"encode_ms[bm{bm},w{nw}]"] = bench_ms(fn)
        except Exception as e:  # a setting that fails to compile is reported, not fatal
            out[f"encode_ms[bm{bm},w{nw}]"] = f"failed: {type(e).__name__}: {e}"[:200]
    encode_to_pool(keys, slots, pools.codes)  # leave the pool as the default encodes it
    q = torch.randn(n, HQ, D, device=dev, dtype=DTYPE)
    k, v = pools.k[1 : n + 1], pools.v[1 : n + 1]
    for backend in backends:
        try:

            def fn(backend=backend):
                flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True, backend=backend)

            out[f"prefill_ms[{backend}]"] = bench_ms(fn)
        except Exception as e:
            out[f"prefill_ms[{backend}]"] = f"failed: {type(e).__name__}: {e}"[:200]
    enc = [v for kk, v in out.items() if kk.startswith("encode_ms") and isinstance(v, float)]
    pre = [v for kk, v in out.items() if kk.startswith("prefill_ms") and isinstance(v, float)]
    out["encode_ms"] = min(enc) if enc else None
    out["prefill_ms"] = min(pre) if pre else None
    if enc and pre:
        out["write_ms"] = out["encode_ms"]
        out["write_over_prefill"] = out["write_ms"] / out["prefill_ms"]
    return out


def scan_bytes(n: int, batch: int) -> int:
    """Bytes the scan must move: sign rows, req_to_token entries, uint8 scores."""
    return batch * n * (HKV * B + 4 + HKV)


def case_inputs(n: int, batch: int, pools: Pools, dev):
    rtt = (torch.arange(batch * n, device=dev, dtype=torch.int32) + 1).view(batch, n)
    rpi = torch.arange(batch, device=dev, dtype=torch.int32)
    seq = torch.full((batch,), n, device=dev, dtype=torch.int32)
    q = torch.randn(batch, HQ, D, device=dev, dtype=DTYPE)
    return rtt, rpi, seq, q


def dense_decode_ms(n: int, batch: int, rtt, q, pools: Pools, dev) -> float:
    import flashinfer

    wbuf = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(wbuf, "NHD", use_tensor_cores=False)
    indptr = torch.arange(batch + 1, device=dev, dtype=torch.int32) * n
    last = torch.ones(batch, device=dev, dtype=torch.int32)
    w.plan(indptr, rtt.flatten(), last, HQ, HKV, D, 1, q_data_type=DTYPE, kv_data_type=DTYPE)
    k = pools.k.view(-1, 1, HKV, D)
    v = pools.v.view(-1, 1, HKV, D)
    return bench_ms(lambda: w.run(q, (k, v)))


def bench_case(n: int, batch: int, pools: Pools, dev, hbm: float) -> dict:
    from sglang_pariskv.attention.sparse_decode import HeadAsBatchDecode
    from sglang_pariskv.config import ParisKVConfig
    from sglang_pariskv.kernels import DecodeWorkspace

    cfg = ParisKVConfig(topk=2048, sink=64, local=256)
    rtt, rpi, seq, q = case_inputs(n, batch, pools, dev)
    res = {"N": n, "batch": batch}
    res["dense_ms"] = dense_decode_ms(n, batch, rtt, q, pools, dev)

    ws = DecodeWorkspace(cfg, HQ, HKV, D, batch, n, dev)
    dec = HeadAsBatchDecode(ws, DTYPE)
    dec.plan(seq.cpu())  # plans the workspace too
    args = (q, pools.codes, rtt, rpi)
    out = ws.run(*args)
    rows = out.kv_indptr.diff()
    assert bool((rows == cfg.budget).all()), "every row of a long request holds the budget"
    g_all = graph_of(lambda: ws.run(*args))
    retrieval = bench_ms(g_all.replay)
    sparse = bench_ms(lambda: dec.run(q, pools.k, pools.v))
    stages = {}
    ws.bind(*args)
    graphs = [(name, graph_of(fn)) for name, fn in ws.stages()]
    for name, g in graphs:
        stages[name] = bench_ms(g.replay)
    stages["sparse_attention"] = sparse
    res.update(
        pariskv_ms=retrieval + sparse,
        retrieval_ms=retrieval,
        stages_ms=stages,
        scan_gbps=scan_bytes(n, batch) / stages["scan"] / 1e6,
        hbm_gbps=hbm,
        num_candidates=int(out.num_candidates[0]),
    )
    res["scan_fraction_of_hbm"] = res["scan_gbps"] / hbm
    res["speedup"] = res["dense_ms"] / res["pariskv_ms"]
    return res


def versions() -> dict:
    import triton

    out = {"python": platform.python_version(), "torch": torch.__version__}
    out["triton"] = triton.__version__
    try:
        import flashinfer

        out["flashinfer"] = flashinfer.__version__
    except Exception as e:
        out["flashinfer"] = f"unavailable: {e}"
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument(
        "--ns", default="32768,131072,524288,1048576", help="comma list of tokens per request"
    )
    ap.add_argument("--batches", default="1,8,32", help="comma list of batch sizes")
    ap.add_argument("--out", default="benchmarks/results/kernels.json", help="results JSON")
    ap.add_argument(
        "--auto-prefill-before-s",
        type=float,
        default=200.0,
        help="time the 'auto' FlashInfer prefill backend (a minutes-long JIT on a fresh host) "
        "only while the run is younger than this many seconds",
    )
    ap.add_argument("--plot", help="only draw the PNG of an existing JSON file")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.plot:
        plot(Path(args.plot))
        return
    dev = torch.device("cuda")
    t0 = time.time()
    report = {
        "device": torch.cuda.get_device_name(dev),
        "versions": versions(),
        "command": "python " + " ".join(sys.argv),
        "shapes": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": "bf16"},
        "config": {"topk": 2048, "sink": 64, "local": 256, "dense_threshold": 8192},
    }
    hbm = hbm_ceiling_gbps(dev)
    torch.cuda.empty_cache()
    report["hbm_copy_gbps"] = hbm
    print(f"HBM copy ceiling: {hbm:.0f} GB/s", flush=True)
    free, _ = torch.cuda.mem_get_info(dev)
    ns = [int(x) for x in args.ns.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    cases, skipped = [], []
    for n in ns:
        for b in batches:
            (cases if fits(n, b, free) else skipped).append((n, b))
    report["skipped"] = [
        {"N": n, "batch": b, "why": "KV + codes do not fit in GPU memory"} for n, b in skipped
    ]
    slots = max(n * b for n, b in cases) + 1
    pools = Pools(slots, dev)
    print(f"pools: {slots} slots ready after {time.time() - t0:.0f}s", flush=True)

    report["cases"] = []
    for n, b in cases:
        try:
            res = bench_case(n, b, pools, dev, hbm)
        except Exception as e:
            res = {"N": n, "batch": b, "error": f"{type(e).__name__}: {e}"[:400]}
        torch.cuda.empty_cache()
        report["cases"].append(res)
        print(json.dumps(res), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    try:
        # "auto" is fa3 on Hopper (what SGLang's ragged prefill uses) but JIT-compiles for
        # minutes on a fresh host: only when the run is still short.
        backends = ("fa2", "auto") if time.time() - t0 < args.auto_prefill_before_s else ("fa2",)
        report["encode"] = bench_encode(pools, dev, backends=backends)
    except Exception as e:
        report["encode"] = {"error": f"{type(e).__name__}: {e}"[:400]}
    print(f"encode: {report['encode']}", flush=True)
    report["wall_s"] = time.time() - t0
    Path(args.out).write_text(json.dumps(report, indent=1))
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\n{report['device']}  HBM copy {report['hbm_copy_gbps']:.0f} GB/s")
    e = report.get("encode", {})
    if e.get("write_over_prefill") is not None:
        print(
            f"32K tokens: encode {e['encode_ms']:.3f} ms "
            f"vs prefill attn {e['prefill_ms']:.3f} ms = {100 * e['write_over_prefill']:.2f}%"
        )
    head = f"{'N':>8} {'batch':>5} {'dense':>8} {'pariskv':>8} {'x':>6} {'scanGB/s':>8} {'%hbm':>5}"
    print(head + "  stages(ms)")
    for c in report["cases"]:
        if "error" in c:
            print(f"{c['N']:>8} {c['batch']:>5} ERROR {c['error'][:80]}")
            continue
        st = " ".join(f"{k}={v:.3f}" for k, v in c["stages_ms"].items())
        print(
            f"{c['N']:>8} {c['batch']:>5} {c['dense_ms']:>8.3f} {c['pariskv_ms']:>8.3f} "
            f"{c['speedup']:>6.1f} {c['scan_gbps']:>8.0f} {100 * c['scan_fraction_of_hbm']:>5.0f}"
            f"  {st}"
        )
    for s in report.get("skipped", []):
        print(f"{s['N']:>8} {s['batch']:>5} skipped: {s['why']}")


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(path.read_text())
    cases = [c for c in report["cases"] if "error" not in c]
    labels = [f"{c['N'] // 1024}K\nb{c['batch']}" for c in cases]
    x = range(len(cases))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    w = 0.4
    ax1.bar([i - w / 2 for i in x], [c["dense_ms"] for c in cases], w, label="FlashInfer dense")
    ax1.bar(
        [i + w / 2 for i in x],
        [c["pariskv_ms"] for c in cases],
        w,
        label="ParisKV retrieval + sparse",
    )
    ax1.set_yscale("log")
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("ms per layer (decode step)")
    ax1.set_title(f"Decode attention per layer, {report['device']}")
    ax1.legend()
    bottom = [0.0] * len(cases)
    names = list(dict.fromkeys(n for c in cases for n in c["stages_ms"]))  # as recorded
    for name in names:
        vals = [c["stages_ms"].get(name, 0.0) for c in cases]
        ax2.bar(list(x), vals, 0.6, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_xticks(list(x), labels)
    ax2.set_ylabel("ms (each stage timed alone, cold L2)")
    ax2.set_title("ParisKV stage breakdown")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
