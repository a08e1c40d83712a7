"""Decode retrieval per layer, launch variants side by side: the same inputs, the same run.

Each variant is a set of ``DecodeWorkspace`` keyword arguments (which kernel does the
query + tier table, how many blocks share each top-k row). For every (N, batch)
case each variant's whole ``DecodeWorkspace.run`` is captured in a CUDA graph and timed
(``triton.testing.do_bench`` median, L2 flushed before each repetition, as in
bench_kernels.py), with each stage also timed alone; the retrieved index set of every
row must equal the first variant's (all variants are exact implementations of one spec).

    python benchmarks/bench_retrieval_variants.py --out benchmarks/results/retrieval_variants.json
    python benchmarks/bench_retrieval_variants.py --plot benchmarks/results/retrieval_variants.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pariskv_tools.cli import HelpFormatter

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_kernels as bk  # noqa: E402

#: name -> DecodeWorkspace keyword arguments; the first is the reference. Session 7's
#: variants (fused write + rerank, scan warps and lane layout) are in
#: results/retrieval_variants_session7.json; its winner is the "session7" row here (with
#: this session's top-k code at cluster 1: session 7's single-block kernel, whose
#: compaction is unchanged).
VARIANTS = {
    "session7": dict(cuda_query_tiers=False, cuda_topk_cluster=1),
    "cuda_query_tiers": dict(cuda_query_tiers=True, cuda_topk_cluster=1),
    "topk_cluster8": dict(cuda_query_tiers=False, cuda_topk_cluster=8),
    "session8": dict(),  # the defaults: CUDA query + tiers, top-k cluster by row length
    # (session 8 also timed the scan's two lane layouts here; session 10 replaced both with
    # the staged scan: results/scan_kernels.json)
}


def row_sets(out) -> list[torch.Tensor]:
    ip = out.kv_indptr.tolist()
    return [out.kv_indices[ip[i] : ip[i + 1]].sort().values for i in range(len(ip) - 1)]


def run_case(n: int, batch: int, pools, dev, variants: dict) -> dict:
    from sglang_pariskv.config import ParisKVConfig
    from sglang_pariskv.kernels import DecodeWorkspace

    cfg = ParisKVConfig(topk=2048, sink=64, local=256)
    rtt, rpi, seq, hist, q = bk.case_inputs(n, batch, pools, dev)
    args = (q, pools.codes, hist, rtt, rpi)
    res = {"N": n, "batch": batch, "variants": {}}
    ref = None
    for name, kwargs in variants.items():
        try:
            ws = DecodeWorkspace(cfg, bk.HQ, bk.HKV, bk.D, batch, n, dev, **kwargs)
            ws.plan(seq.cpu())
            sets = row_sets(ws.run(*args))
            same = None
            if ref is None:
                ref = sets
            else:
                same = all(torch.equal(a, b) for a, b in zip(sets, ref))
            g = bk.graph_of(lambda ws=ws: ws.run(*args))
            ms = bk.bench_ms(g.replay)
            ws.bind(*args)
            stages = {s: bk.bench_ms(bk.graph_of(fn).replay) for s, fn in ws.stages()}
            res["variants"][name] = {
                "kwargs": kwargs,
                "retrieval_ms": ms,
                "stages_ms": stages,
                "same_rows_as_reference": same,
            }
        except Exception as e:  # a variant that fails is reported, not fatal
            res["variants"][name] = {"kwargs": kwargs, "error": f"{type(e).__name__}: {e}"[:300]}
        torch.cuda.empty_cache()
    base = res["variants"][next(iter(variants))].get("retrieval_ms")
    for v in res["variants"].values():
        if base and "retrieval_ms" in v:
            v["speedup_vs_reference"] = base / v["retrieval_ms"]
    return res


def print_table(report: dict) -> None:
    names = list(report["variants"])
    print(f"\n{report['device']}: retrieval us per layer (x = speedup over {names[0]})")
    print(f"{'case':>10} " + " ".join(f"{n[:22]:>22}" for n in names))
    for c in report["cases"]:
        cells = []
        for n in names:
            v = c["variants"].get(n, {})
            if "retrieval_ms" in v:
                flag = "" if v["same_rows_as_reference"] in (None, True) else " DIFF"
                cells.append(
                    f"{1000 * v['retrieval_ms']:>9.1f} x{v['speedup_vs_reference']:.2f}{flag}"
                )
            else:
                cells.append("ERR " + v.get("error", "?")[:18])
        print(f"{c['N'] // 1024:>6}K b{c['batch']:<2} " + " ".join(f"{x:>22}" for x in cells))


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(path.read_text())
    names = list(report["variants"])
    cases = report["cases"]
    fig, ax = plt.subplots(figsize=(12, 5))
    w = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [1000 * c["variants"].get(name, {}).get("retrieval_ms", 0.0) for c in cases]
        ax.bar([j + (i - len(names) / 2 + 0.5) * w for j in range(len(cases))], vals, w,
               label=name)  # fmt: skip
    ax.set_xticks(range(len(cases)), [f"{c['N'] // 1024}K x {c['batch']}" for c in cases])
    ax.set_ylabel("retrieval per layer (us), one CUDA-graph replay")
    ax.set_title(f"ParisKV decode retrieval variants, {report['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument(
        "--cases",
        nargs="+",
        default=["131072x1", "131072x2", "131072x8"],
        help="cases NxB: N tokens per request, B requests",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="retrieval variants to time",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/retrieval_variants.json"),
        help="results JSON",
    )
    ap.add_argument("--plot", type=Path, help="only draw the PNG of an existing JSON file")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:
        print(plot(args.plot))
        return 0
    dev = torch.device("cuda")
    t0 = time.time()
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases]
    variants = {k: VARIANTS[k] for k in args.variants}
    report = {
        "device": torch.cuda.get_device_name(dev),
        "versions": bk.versions(),
        "command": "python " + " ".join(sys.argv),
        "shapes": {"q_heads": bk.HQ, "kv_heads": bk.HKV, "head_dim": bk.D},
        "config": {"topk": 2048, "sink": 64, "local": 256},
        "variants": variants,
        "cases": [],
    }
    pools = bk.Pools(max(n * b for n, b in cases) + 1, dev)
    for n, b in cases:
        report["cases"].append(run_case(n, b, pools, dev, variants))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    report["wall_s"] = time.time() - t0
    args.out.write_text(json.dumps(report, indent=1))
    print_table(report)
    plot(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
