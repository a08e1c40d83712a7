"""The byte floor of a ParisKV decode step with host offload in ``bench_offload.py``: the
bytes read from HBM (weights, sign rows scanned, rerank codes of the candidates, attended
rows read from the staging buffer) at the HBM copy bandwidth, plus the rows fetched over
PCIe at the UVA gather bandwidth of the same 256 B rows, both measured in the same run.
"""

from __future__ import annotations

from offload_cases import HKV, HQ, SHAPE, D, L, OffloadState
from step_floor import step_bytes


def weights_nbytes() -> int:
    """bf16 bytes of the matrices one decode step reads (the embedding is a gather)."""
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    per_layer = h * (HQ + 2 * HKV) * D + HQ * D * h + h * 2 * i + i * h
    return 2 * (L * per_layer + h * v)


def uva_gather_gbps(st: OffloadState, rows: int) -> float:
    """GB/s of the UVA gather of ``rows`` 256 B rows from the host pool."""
    from sglang_pariskv.kernels.uva_gather import gather_bandwidth

    return gather_bandwidth(st.host.layer_rows(0, 0), rows)["gbps"]


def floor_ms(
    n: int, batch: int, weights_bytes: int, miss_rows: float, hbm: float, uva: float
) -> tuple[float, float, float]:
    """(bytes from HBM) / hbm + (bytes over PCIe) / uva, in ms; see the module docstring."""
    b = step_bytes(SHAPE, n, batch, {"topk": 2048, "sink": 64, "local": 256})
    gpu_bytes = weights_bytes + batch * b["per_request"]
    pcie_bytes = miss_rows * 2 * D * 2
    return 1000 * (gpu_bytes / (hbm * 1e9) + pcie_bytes / (uva * 1e9)), gpu_bytes, pcie_bytes
