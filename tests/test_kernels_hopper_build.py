"""The decode-side Triton kernels lower to Hopper (sm_90) code on a machine without a GPU.

The CPU suite runs every Triton kernel in Triton's interpreter, which accepts programs the
GPU compiler rejects (types of loop-carried values, 0-d tensors, casts). Compiling the
query-table and scan kernels for sm_90 here, in a process without the interpreter, catches
those before a GPU host does; the table's float64 arithmetic must also stay correctly
rounded (``div.rn``, no fused multiply-add), which is what makes it bit-identical to the
codec's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sglang_pariskv.kernels.collision import _scan_kernel
from sglang_pariskv.kernels.query_table import _query_table_kernel

def build(fn, sig, const):
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]

out = {}
for d, g in ((64, 3), (128, 4)):
    ptx = build(
        _query_table_kernel,
        {"q_ptr": "*bf16", "stride_qr": "i64", "stride_qh": "i64", "scale_ptr": "*fp32",
         "rot_ptr": "*fp32", "blocks_ptr": "*fp32", "norm_ptr": "*fp32", "table_ptr": "*i8",
         "shist_ptr": "*i32"},
        {"H": 8, "B": d // 8, "G": g, "GP": 4, "D": d, "NBP": 256, "HAS_SCALE": d == 128},
    )
    out[f"query_table_{d}"] = sorted(set(re.findall(r"\b(?:div|fma)\.[a-z0-9.]*f64", ptx)))
ptx = build(
    _scan_kernel,
    {"signs_ptr": "*u8", "rtt_ptr": "*i32", "stride_rtt": "i64", "req_ptr": "*i32",
     "seq_ptr": "*i64", "zend_ptr": "*i64", "table_ptr": "*i8", "scores_ptr": "*u8",
     "shist_ptr": "*i32", "zone_start": "i64", "NMAX": "i64"},
    {"H": 8, "B": 16, "HP": 8, "NBP": 256, "BLOCK_N": 64, "TILES": 16},
)
out["scan"] = len(ptx)
print(json.dumps(out))
"""


def test_query_table_and_scan_compile_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for d in (64, 128):
        # the table's one float64 division is IEEE-rounded, and nothing is contracted
        assert out[f"query_table_{d}"] == ["div.rn.f64"], out
    assert out["scan"] > 0
