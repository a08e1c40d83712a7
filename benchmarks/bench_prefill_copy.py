"""What storing prefill K/V in host memory costs the forward pass, inline vs on a copy stream.

    python benchmarks/bench_prefill_copy.py --tokens 2048 8192 16384

With ``--pariskv-offload host`` every extend stores its K/V into the pinned host pool.
Inline (the default, ``--pariskv-prefill-copy inline``) SGLang's store kernel writes it
over PCIe from the forward stream; with ``side_stream`` the pool hands the store to a copy
stream (``offload.write_behind``) and the forward stream goes on. This bench runs one
prefill chunk of ``T`` tokens through 28 layers of the Qwen2.5-7B-1M shape, each layer
its weight GEMMs (QKV, O, gate/up, down; one layer's random matrices, re-read by every
layer) followed by the real pool's ``set_kv_buffer`` of the layer's K/V (codes encoded
too, as in serving), in four ways, same run:

* ``compute_only``: no store (the GEMMs alone);
* ``gpu_pool``: ParisKV's GPU pool (HBM store), the baseline;
* ``host_inline``: host offload, store on the forward stream;
* ``host_side_stream``: host offload, store on the copy stream. ``forward_ms`` is when
  the forward stream is done; ``drained_ms`` is after it has waited for the copies (what
  the next forward's first reader waits for at most).

Attention is left out: its FLOPs would only give the copy stream more to hide behind, so
the overlap measured here is the least serving gets. Slots are contiguous, as SGLang's
allocator hands them to a fresh prefill. Median of ``--iters`` chunks.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import types
from pathlib import Path

import torch

from pariskv_tools.cli import HelpFormatter

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_offload  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "prefill_copy.json"
# The model shape of bench_offload (its hidden/MLP sizes and KV heads matter here).
SHAPE = dict(bench_offload.SHAPE)
MODES = ("compute_only", "gpu_pool", "host_inline", "host_side_stream")


class Timer:
    """CUDA events on the GPU (device time of the forward stream), wall clock on the CPU."""

    def __init__(self, dev: torch.device):
        self.cuda = dev.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def ms(self, a, b) -> float:
        if not self.cuda:
            return 1000 * (b - a)
        b.synchronize()
        return a.elapsed_time(b)


def make_pool(mode: str, slots: int, layers: int, dev: torch.device):
    """The pool serving would build for ``mode`` (None for ``compute_only``)."""
    from sglang_pariskv.config import ParisKVConfig
    from sglang_pariskv.index.kv_pool import ParisKVTokenToKVPool
    from sglang_pariskv.offload.kv_pool import HostOffloadKVPool

    if mode == "compute_only":
        return None
    host = mode.startswith("host")
    copy = "side_stream" if mode == "host_side_stream" else "inline"
    cfg = ParisKVConfig(offload="host", host_pool_gb=1.0, prefill_copy=copy) if host else None
    cls = HostOffloadKVPool if host else ParisKVTokenToKVPool
    saved = ParisKVTokenToKVPool.pariskv_config  # read at construction (as the plugin sets it)
    ParisKVTokenToKVPool.pariskv_config = cfg or ParisKVConfig()
    try:
        pool = cls(
            size=slots, page_size=1, dtype=torch.bfloat16,
            head_num=SHAPE["num_key_value_heads"], head_dim=SHAPE["head_dim"],
            layer_num=layers, device=str(dev), enable_memory_saver=False,
            enable_alt_stream=False,
        )  # fmt: skip
    finally:
        ParisKVTokenToKVPool.pariskv_config = saved
    pool.use_native_move_kv_cache = True
    return pool


class Layer:
    """One transformer layer's GEMMs at ``tokens`` rows, with the K/V it produces."""

    def __init__(self, tokens: int, dev: torch.device):
        h, i = SHAPE["hidden_size"], SHAPE["intermediate_size"]
        hq, hkv, d = (SHAPE[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
        self.hq, self.hkv, self.d = hq, hkv, d
        bf = torch.bfloat16 if dev.type == "cuda" else torch.float32  # CPU bf16 GEMMs crawl
        self.w = [
            torch.randn(h, (hq + 2 * hkv) * d, device=dev, dtype=bf) * 0.02,
            torch.randn(hq * d, h, device=dev, dtype=bf) * 0.02,
            torch.randn(h, 2 * i, device=dev, dtype=bf) * 0.02,
            torch.randn(i, h, device=dev, dtype=bf) * 0.02,
        ]
        self.x = torch.randn(tokens, h, device=dev, dtype=bf)

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        t, (hq, hkv, d) = self.x.shape[0], (self.hq, self.hkv, self.d)
        qkv = self.x @ self.w[0]
        k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
        o = qkv[:, : hq * d] @ self.w[1]
        gu = o @ self.w[2]
        act = torch.nn.functional.silu(gu[:, : gu.shape[1] // 2]) * gu[:, gu.shape[1] // 2 :]
        self.x = (act @ self.w[3]).clamp_(-4, 4)  # keeps the values finite over layers
        return k.to(torch.bfloat16), v.to(torch.bfloat16)  # the pool's dtype (no-op on GPU)


def run_mode(mode: str, tokens: int, layers: int, iters: int, dev: torch.device) -> dict:
    pool = make_pool(mode, tokens + 1, layers, dev)
    lay, timer = Layer(tokens, dev), Timer(dev)
    loc = torch.arange(1, tokens + 1, device=dev)
    fwd, drained = [], []
    for it in range(iters + 1):  # the first chunk warms up kernels and allocator
        a = timer.mark()
        for li in range(layers):
            k, v = lay.run()
            if pool is None:
                continue
            pool.defer_writes = mode == "host_side_stream"  # as the backend sets it
            pool.set_kv_buffer(types.SimpleNamespace(layer_id=li), loc, k, v)
            pool.defer_writes = False
        b = timer.mark()
        if pool is not None and hasattr(pool, "drain_writes"):
            pool.drain_writes()
        c = timer.mark()
        if it:
            fwd.append(timer.ms(a, b))
            drained.append(timer.ms(a, c))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    stores = getattr(getattr(pool, "write_behind", None), "stores", 0)
    if pool is not None and hasattr(pool, "host"):
        pool.host.close()
    fwd.sort(), drained.sort()
    return {"forward_ms": fwd[len(fwd) // 2], "drained_ms": drained[len(drained) // 2],
            "copy_stream_stores": stores}  # fmt: skip


def run_case(tokens: int, layers: int, iters: int, dev: torch.device) -> dict:
    hkv, d = SHAPE["num_key_value_heads"], SHAPE["head_dim"]
    case = {"tokens": tokens, "layers": layers, "kv_mib_per_layer": tokens * hkv * d * 4 / 2**20}
    for mode in MODES:
        case[mode] = run_mode(mode, tokens, layers, iters, dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    base = case["gpu_pool"]["drained_ms"]
    for mode in ("host_inline", "host_side_stream"):
        case[f"{mode}_over_gpu_pool"] = case[mode]["drained_ms"] / base
    store_ms = case["host_inline"]["forward_ms"] - case["gpu_pool"]["forward_ms"]
    case["inline_store_gbs"] = (
        layers * case["kv_mib_per_layer"] * 2**20 / (store_ms * 1e6) if store_ms > 0 else None
    )
    return case


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[2048, 8192, 16384],
        help="prefill chunk sizes T in tokens",
    )
    ap.add_argument(
        "--layers", type=int, default=SHAPE["num_hidden_layers"], help="layers per forward"
    )
    ap.add_argument("--iters", type=int, default=5, help="chunks timed per case (median)")
    ap.add_argument("--device", default="cuda", help="torch device")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    ap.add_argument("--plot", type=Path, help="only draw the PNG of an existing JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:
        print(plot(args.plot))
        return 0
    dev = torch.device(args.device)
    report = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join(["python", *sys.argv]),
        "shape": SHAPE,
        "method": __doc__.split("\n\n", 2)[2],
        "cases": [run_case(t, args.layers, args.iters, dev) for t in args.tokens],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(args.out)
    print(f"{report['device']}: ms per {args.layers}-layer prefill chunk (forward | drained)")
    print(" tokens  MiB/layer " + " ".join(f"{m:>22}" for m in MODES))
    for c in report["cases"]:
        cells = " ".join(f"{c[m]['forward_ms']:>10.2f} | {c[m]['drained_ms']:>9.2f}" for m in MODES)
        print(f"{c['tokens']:>7} {c['kv_mib_per_layer']:>10.1f} {cells}")
    return 0


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    cases = data["cases"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.2
    for j, mode in enumerate(MODES):
        xs = [i + (j - 1.5) * width for i in range(len(cases))]
        ax.bar(xs, [c[mode]["drained_ms"] for c in cases], width, label=mode)
    ax.set_xticks(range(len(cases)), [f"{c['tokens']} tokens" for c in cases])
    ax.set_ylabel(f"ms per prefill chunk ({cases[0]['layers']} layers, until K/V stored)")
    ax.set_title(f"Prefill K/V store to host memory: inline vs copy stream\n{data['device']}")
    ax.legend()
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    sys.exit(main())
