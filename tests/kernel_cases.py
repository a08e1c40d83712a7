"""Scenario builders and the Triton-interpreter guard shared by the kernel tests.

A scenario is what SGLang hands the attention backend at a decode step: a slot-keyed code
pool and histograms filled by :func:`encode_to_pool`, a ``req_to_token`` table mapping
each request's positions to scattered slots, and the batch's ``req_pool_indices`` /
``seq_lens``. :func:`padded_codes` gathers the pool back into the padded per-request
layout that :func:`codec.pipeline.retrieve` takes, so a test feeds the codec exactly the
codes the kernels read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_pariskv.codec.encode import KeyCodes
from sglang_pariskv.kernels.encode import encode_to_pool


@dataclass
class Scenario:
    keys: list[torch.Tensor]  #: per request [seq_len, Hkv, D]
    pool: KeyCodes  #: [slots, Hkv, ...]
    hist: torch.Tensor  #: int32 [max_reqs, Hkv, B, 256]
    req_to_token: torch.Tensor  #: int32 [max_reqs, max_context]
    req_pool_indices: torch.Tensor  #: int32 [R]
    seq_lens: torch.Tensor  #: int32 [R]


def empty_pool(slots: int, num_kv_heads: int, head_dim: int, device) -> KeyCodes:
    b = head_dim // 8
    return KeyCodes(
        signs=torch.zeros(slots, num_kv_heads, b, dtype=torch.uint8, device=device),
        mags=torch.zeros(slots, num_kv_heads, 3 * b, dtype=torch.uint8, device=device),
        weights=torch.zeros(slots, num_kv_heads, b, dtype=torch.float16, device=device),
    )


def make_scenario(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    max_context: int,
    device,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    keys_fn=None,
) -> Scenario:
    """Random keys (or ``keys_fn(r, n, gen)``) for each request, encoded into scattered
    slots (slot 0 stays padding, as in SGLang); request r uses req_pool_index ``2r + 1``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = len(seq_lens)
    total = sum(seq_lens)
    slots_all = torch.randperm(total + 16, generator=gen)[:total] + 1
    pool = empty_pool(total + 17, num_kv_heads, head_dim, device)
    max_reqs = 2 * r + 1
    hist = torch.zeros(max_reqs, num_kv_heads, head_dim // 8, 256, dtype=torch.int32, device=device)
    rtt = torch.zeros(max_reqs, max_context, dtype=torch.int32, device=device)
    rpi = torch.arange(r, dtype=torch.int32) * 2 + 1
    keys, off = [], 0
    for i, n in enumerate(seq_lens):
        if keys_fn is None:
            k = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        else:
            k = keys_fn(i, n, gen)
        k = k.to(dtype).to(device)
        slots = slots_all[off : off + n].to(device)
        off += n
        rtt[int(rpi[i]), :n] = slots.to(torch.int32)
        ids = torch.full((n,), int(rpi[i]), dtype=torch.int32, device=device)
        encode_to_pool(k, slots, pool, hist, ids)
        keys.append(k)
    return Scenario(
        keys=keys,
        pool=pool,
        hist=hist,
        req_to_token=rtt,
        req_pool_indices=rpi.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
    )


def padded_codes(sc: Scenario) -> KeyCodes:
    """Pool codes gathered to [R, Nmax, Hkv, ...] (padding rows are slot 0's codes)."""
    n = int(sc.seq_lens.max())
    slots = sc.req_to_token[sc.req_pool_indices.long(), :n].long()
    return KeyCodes(sc.pool.signs[slots], sc.pool.mags[slots], sc.pool.weights[slots])


def interpreter_broken() -> bool:
    """True in a CPU-only process where Triton was imported before ``TRITON_INTERPRET=1``
    was set (by another module of the same pytest run, e.g. through SGLang): Triton's own
    standard library (``tl.sum``...) is then compiled-mode and cannot run in the
    interpreter, so the kernel tests must run in a fresh process."""
    if torch.cuda.is_available():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from sglang_pariskv.kernels import encode

    return not (
        isinstance(tl.sum, InterpretedFunction)
        and isinstance(encode._encode_kernel, InterpretedFunction)
    )


def fresh_interpreter_fallback(test_file: str):
    """(autouse fixture, test) for a kernel test module: when :func:`interpreter_broken`,
    every test of the module is skipped in this process and the returned test reruns the
    whole module in a subprocess with ``TRITON_INTERPRET=1`` (and fails if it fails)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    broken = interpreter_broken()

    @pytest.fixture(autouse=True)
    def _interpreter_guard(request):
        if broken and request.node.name != "test_module_in_fresh_interpreter":
            pytest.skip(
                "Triton was imported before the interpreter was enabled: this module "
                "runs in a subprocess (test_module_in_fresh_interpreter)"
            )

    @pytest.mark.skipif(not broken, reason="the module's tests run in this process")
    def test_module_in_fresh_interpreter():
        env = dict(os.environ, TRITON_INTERPRET="1")
        root = Path(test_file).resolve().parents[1]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]

    return _interpreter_guard, test_module_in_fresh_interpreter
