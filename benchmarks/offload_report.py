"""The report of ``bench_offload.py``'s results: a table of each case's per-token times and
a PNG of the step breakdown beside dense and the byte floor.
"""

from __future__ import annotations

import json
from pathlib import Path


def print_table(report: dict) -> None:
    """Prints the device, its bandwidths and each case's per-token times and breakdown."""
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
    """Draws the results file ``path`` as a PNG beside it (its path returned): the step
    breakdown against the byte floor, and per-token times against dense's."""
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
