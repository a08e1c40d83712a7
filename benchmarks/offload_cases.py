"""The timed pieces of one decode step of ``bench_offload.py``, on a Qwen2.5-7B-Instruct-1M
shape in bf16: the step's GEMVs, dense FlashInfer decode over a GPU KV pool of all layers,
and ParisKV's retrieval, hot-cache fetch and attention over a pinned host K/V pool. Each is
a CUDA graph of all 28 layers; what each covers is in ``bench_offload.py``'s docstring.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from bench_kernels import graph_of

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


def time_steps(
    replay: Callable[[], object],
    before_step: Callable[[], object] | None = None,
    steps: int = 12,
    warmup: int = 3,
) -> float:
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


class Weights:
    """The step's GEMVs: one layer's matrices (re-read by every layer) and the LM head."""

    def __init__(self, batch: int, dev: torch.device) -> None:
        h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
        shapes = [(h, (HQ + 2 * HKV) * D), (HQ * D, h), (h, 2 * i), (i, h), (h, v)]
        self.mats = [torch.randn(*s, device=dev, dtype=DTYPE) * 0.01 for s in shapes]
        self.ins = [torch.randn(batch, s[0], device=dev, dtype=DTYPE) for s in shapes]
        self.outs = [torch.empty(batch, s[1], device=dev, dtype=DTYPE) for s in shapes]

    def step(self) -> None:
        for _ in range(L):
            for j in range(4):
                torch.mm(self.ins[j], self.mats[j], out=self.outs[j])
        torch.mm(self.ins[4], self.mats[4], out=self.outs[4])


def weights_case(batch: int, dev: torch.device) -> float:
    """Median ms of the step's GEMVs for ``batch`` requests."""
    w = Weights(batch, dev)
    return time_steps(graph_of(w.step).replay)


def dense_case(n: int, batch: int, weights_bytes: int, dev: torch.device) -> dict:
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

    def __init__(self, slots: int, dev: torch.device) -> None:
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
    dev: torch.device,
    steps: int,
    direct: bool = True,
    stages: tuple[str, ...] | None = None,
) -> dict:
    """Times the step graphs named in ``stages`` (all four by default) for one case; what each
    covers is in ``bench_offload.py``'s docstring."""
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
