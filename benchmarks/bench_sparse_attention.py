"""The attention side of a ParisKV decode step, per layer, inside a 32-layer CUDA graph.

After retrieval, every ParisKV decode layer runs (attention/backend.py ``forward_decode``):

* SGLang's own FlashInfer decode, planned with one token per sparse request (its output is
  discarded for those rows, but the call is in the CUDA graph);
* the head-as-batch FlashInfer decode over the retrieved indices
  (attention/sparse_decode.py: one batch row per (request, KV head), page size 1);
* a ``torch.where`` that picks dense or sparse output per request.

This bench replays ``--layers`` layers of each variant in one CUDA graph (per-layer K/V
pools, so no layer reads another's rows from L2) and reports each kernel's mean time
(torch.profiler / CUPTI), beside the byte floor of the sparse call: the K and V rows it
must read at the device-copy bandwidth measured in the same run, and a plain
``index_select`` gather of the same rows. Variants of the sparse call: tensor-core
FlashInfer decode (the default), CUDA-core decode, tensor cores without split-KV or with
a fixed split size, and FlashInfer's Hopper (FA3) backend.

    python benchmarks/bench_sparse_attention.py --out benchmarks/results/sparse_attention.json
    python benchmarks/bench_sparse_attention.py --plot benchmarks/results/sparse_attention.json
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
from bench_retrieval_in_step import profiled_graph  # noqa: E402

#: Sparse-call variants: (FlashInfer wrapper kwargs, plan kwargs).
SPARSE_VARIANTS = {
    "tensor_cores": ({"use_tensor_cores": True}, {}),
    "cuda_cores": ({"use_tensor_cores": False}, {}),
    "tensor_cores_no_split": ({"use_tensor_cores": True}, {"disable_split_kv": True}),
    "tensor_cores_split_256": ({"use_tensor_cores": True}, {"fixed_split_size": 256}),
    "tensor_cores_split_512": ({"use_tensor_cores": True}, {"fixed_split_size": 512}),
    "tensor_cores_fa3": ({"use_tensor_cores": True, "backend": "fa3"}, {}),
}


def retrieved_indices(seq_cpu, ws, slots_of_req: torch.Tensor, gen: torch.Generator):
    """Fill the workspace's kv_indices as the retrieval would: per (request, KV head) row,
    sink + local positions plus distinct random positions of the middle, as pages
    ``slot * Hkv + head``."""
    indptr = ws.plan(seq_cpu)
    n_rows = indptr.numel() - 1
    hkv = ws.hkv
    out = torch.empty(int(indptr[-1]), dtype=torch.int32)
    for row in range(n_rows):
        r, h = divmod(row, hkv)
        length = int(indptr[row + 1] - indptr[row])
        n = int(seq_cpu[r])
        pos = torch.randperm(n, generator=gen)[:length].sort().values
        out[int(indptr[row]) : int(indptr[row + 1])] = slots_of_req[r, pos].cpu() * hkv + h
    ws.kv_indices[: out.numel()].copy_(out)
    return indptr


def mean_by_kernel(events: list[tuple[str, float]], layers: int, replays: int) -> dict:
    """Per-layer time of each kernel name (total over the profiled replays / layers)."""
    acc: dict[str, float] = defaultdict(float)
    for name, us in events:
        acc[name] += us
    return {k: v / (layers * replays) for k, v in sorted(acc.items(), key=lambda x: -x[1])}


def short(name: str) -> str:
    return name.split("<")[0].split("(")[0].replace("void ", "")[:60]


def profile_graph(step, layers: int, replays: int = 5) -> tuple[dict, float]:
    """(per-layer time of each kernel, per-layer wall time) of ``layers`` layers of
    ``step`` replayed as one CUDA graph."""
    g, events = profiled_graph(step, replays)
    return mean_by_kernel(events, layers, replays), bk.bench_ms(g.replay) * 1e3 / layers


def run(n: int, batch: int, layers: int, dev) -> dict:
    import flashinfer

    from sglang_pariskv.attention.sparse_decode import HeadAsBatchDecode
    from sglang_pariskv.config import ParisKVConfig
    from sglang_pariskv.kernels import DecodeWorkspace

    hq, hkv, d, dt = bk.HQ, bk.HKV, bk.D, bk.DTYPE
    slots = n * batch + 1
    kv = [torch.randn(2, slots, hkv, d, device=dev, dtype=dt) for _ in range(layers)]
    slots_of_req = (torch.arange(batch * n, device=dev, dtype=torch.int64) + 1).view(batch, n)
    seq_cpu = torch.full((batch,), n, dtype=torch.int64)
    q = torch.randn(batch, hq, d, device=dev, dtype=dt)
    cfg = ParisKVConfig(topk=2048, sink=64, local=256)
    gen = torch.Generator().manual_seed(0)
    res: dict = {"variants": {}}

    # The byte floor: K + V rows the sparse call reads, at the measured copy bandwidth.
    ws = DecodeWorkspace(cfg, hq, hkv, d, batch, n, dev)
    indptr = retrieved_indices(seq_cpu, ws, slots_of_req, gen)
    entries = int(indptr[-1])
    hbm = bk.hbm_ceiling_gbps(dev)
    floor_us = entries * 2 * d * 2 / hbm / 1e3
    res.update(rows=entries, hbm_copy_gbs=hbm, floor_us=floor_us)
    idx = ws.kv_indices[:entries].long()

    def gather():
        for layer in range(layers):
            kv[layer].view(2, -1, d).index_select(1, idx)

    res["index_select_gather_us"] = profile_graph(gather, layers)[1]

    # SGLang's dense decode planned with one token per (sparse) request, plus the where.
    wbuf = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    dense = flashinfer.BatchDecodeWithPagedKVCacheWrapper(wbuf, "NHD", use_tensor_cores=True)
    dense.plan(
        torch.arange(batch + 1, dtype=torch.int32),
        torch.arange(batch, dtype=torch.int32) + 1,
        torch.ones(batch, dtype=torch.int32),
        hq,
        hkv,
        d,
        1,
        q_data_type=dt,
        kv_data_type=dt,
    )
    keep = torch.zeros(batch, 1, dtype=torch.bool, device=dev)
    out = torch.empty(batch, hq * d, device=dev, dtype=dt)
    sparse_out = torch.randn(batch, hq * d, device=dev, dtype=dt)

    def dense_one_token():
        for layer in range(layers):
            o = dense.run(q, (kv[layer][0].view(-1, 1, hkv, d), kv[layer][1].view(-1, 1, hkv, d)))
            out.copy_(o.view(batch, -1))
            torch.where(keep, out, sparse_out, out=out)

    k_, us = profile_graph(dense_one_token, layers)
    res["dense_one_token_and_where"] = {"us_per_layer": us, "kernels": k_}

    for name, (wkw, pkw) in SPARSE_VARIANTS.items():
        sp = HeadAsBatchDecode(ws, dt, graph_batch=batch)
        sp.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            sp.float_workspace,
            "NHD",
            use_cuda_graph=True,
            paged_kv_indptr_buffer=ws.kv_indptr[: batch * hkv + 1],
            paged_kv_indices_buffer=ws.kv_indices,
            paged_kv_last_page_len_buffer=sp._last_page_len,
            **wkw,
        )
        try:
            sp.wrapper.plan(
                indptr,
                ws.kv_indices,
                torch.ones(indptr.numel() - 1, dtype=torch.int32),
                num_qo_heads=hq // hkv,
                num_kv_heads=1,
                head_dim=d,
                page_size=1,
                q_data_type=dt,
                kv_data_type=dt,
                **pkw,
            )
            ref = sp.run(q, kv[0][0], kv[0][1]).float()

            def sparse_step(sp=sp):
                for layer in range(layers):
                    sp.run(q, kv[layer][0], kv[layer][1])

            k_, us = profile_graph(sparse_step, layers)
        except Exception as e:  # a variant FlashInfer refuses for this shape
            res["variants"][name] = {"error": repr(e)[:300]}
            print(name, "error", repr(e)[:200], flush=True)
            continue
        res["variants"][name] = {"us_per_layer": us, "kernels": k_, "out": ref}
        print(name, round(us, 2), {short(k): round(v, 2) for k, v in k_.items()}, flush=True)

    # Every variant must compute the same attention (bf16 tolerance).
    base = next((v["out"] for v in res["variants"].values() if "out" in v), None)
    for v in res["variants"].values():
        if "out" in v:
            v["max_abs_diff_vs_first"] = float((v.pop("out") - base).abs().max())
    return res


def plot(path: Path) -> Path:
    """Bar chart of the per-layer times in the report at ``path`` (written beside it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = json.loads(path.read_text())
    bars = [
        ("byte floor of the sparse call", rep["floor_us"]),
        ("dense one-token call + where", rep["dense_one_token_and_where"]["us_per_layer"]),
    ]
    bars += [
        (f"sparse: {name}", v["us_per_layer"])
        for name, v in rep["variants"].items()
        if "us_per_layer" in v
    ]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1.2))
    ax.barh([b[0] for b in bars][::-1], [b[1] for b in bars][::-1], color="tab:blue")
    for i, (_, v) in enumerate(bars[::-1]):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xlabel("us per layer (32-layer CUDA graph)")
    ax.set_title(
        f"attention side of a ParisKV decode layer, {rep['N'] // 1024}K x {rep['batch']}, "
        f"{rep['device']}",
        fontsize=9,
    )
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
        "--out",
        type=Path,
        default=Path("benchmarks/results/sparse_attention.json"),
        help="results JSON",
    )
    ap.add_argument("--plot", type=Path, help="only redraw the PNG of an earlier report")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:
        print(plot(args.plot))
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
        **run(args.n, args.batch, args.layers, dev),
    }
    rep["wall_s"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rep, indent=1))
    print(f"{'part':<40} {'us/layer':>9}")
    print(f"{'byte floor (K+V rows / copy bw)':<40} {rep['floor_us']:>9.2f}")
    print(f"{'index_select gather of the rows':<40} {rep['index_select_gather_us']:>9.2f}")
    dense_us = rep["dense_one_token_and_where"]["us_per_layer"]
    print(f"{'dense 1-token call + where':<40} {dense_us:>9.2f}")
    for name, v in rep["variants"].items():
        print(f"{'sparse ' + name:<40} {v.get('us_per_layer', float('nan')):>9.2f}")
    try:
        print(plot(args.out))
    except ImportError as e:  # no matplotlib on the host: the JSON is the result
        print(f"no plot: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
