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

from offload_cases import SHAPE, OffloadState, dense_case, pariskv_case, weights_case  # noqa: E402
from offload_floor import floor_ms, uva_gather_gbps, weights_nbytes  # noqa: E402
from offload_report import plot, print_table  # noqa: E402
from step_floor import hbm_bandwidth_gbs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "offload.json"


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
            per_batch[b] = weights_case(b, dev)
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


if __name__ == "__main__":
    raise SystemExit(main())
