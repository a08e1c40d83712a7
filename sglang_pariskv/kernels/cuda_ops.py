"""Loader of the CUDA kernels under csrc/ (query + centroid table, collision scan, candidate
write + rerank, top-k); Triton / torch are the fallbacks.

Each CUDA source is compiled on first use with plain ``nvcc`` into a shared library (no
torch headers, so seconds rather than a minute) cached under
``~/.cache/sglang_pariskv/<hash of the source and the csrc/ headers>/``, and called
through ctypes on the current stream (CUDA-graph capturable). Anything that stops that (no
nvcc, no source file, compile error) makes :func:`cuda_available` false and callers use
the Triton kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from sglang_pariskv.kernels.encode import check_head_rows

#: Shipped inside the package (package data) so a wheel install has the sources too.
CSRC = Path(__file__).resolve().parents[1] / "csrc"
logger = logging.getLogger("sglang_pariskv")


def _nvcc() -> str | None:
    for cand in (
        os.environ.get("CUDA_HOME", "") + "/bin/nvcc",
        shutil.which("nvcc") or "",
        "/usr/local/cuda/bin/nvcc",
    ):
        if cand and os.path.exists(cand):
            return cand
    return None


_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
#: csrc/<name>.cu: what it computes (for messages) and the argument types of its entry
#: point ``pariskv_<name>`` (the last argument is always the stream).
_KERNELS: dict[str, tuple[str, list]] = {
    "collision_scan": (
        "collision scan",
        [_P, _P, _I64, _P, _P, _P, _P, _P, _P, _I64, _I64] + [_I32] * 5 + [_P],
    ),
    "select_rerank": (
        "candidate write + rerank",
        [_P] * 9
        + [_I64]
        + [_P] * 9
        + [_I32] * 2
        + [_P] * 2
        + [_I64, _I64, _I32, _I64]
        + [_I32] * 4
        + [_P],
    ),
    "topk": ("top-k", [_P, _P, _P, _P, _I64] + [_I32] * 4 + [_P]),
    "query_table": (
        "query + centroid table",
        [_P, _I64, _I64, _I32] + [_P] * 7 + [_I32] * 5 + [_P],
    ),
}


def nvcc_command(nvcc: str, source: Path, arch: str, out: str | Path) -> list[str]:
    """The build of one kernel source into a shared library for compute capability
    ``arch`` (e.g. "90")."""
    cmd = [nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17"]
    return cmd + [f"-gencode=arch=compute_{arch},code=sm_{arch}", "-o", str(out), str(source)]


@cache
def _library(name: str) -> ctypes.CDLL | None:
    source = CSRC / f"{name}.cu"
    if not torch.cuda.is_available() or not source.exists():
        return None
    nvcc = _nvcc()
    if nvcc is None:
        logger.warning(
            "ParisKV: nvcc not found (set CUDA_HOME); the CUDA %s kernel falls back to "
            "its slower Triton/torch version",
            name,
        )
        return None
    src = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.cuh")))
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    tag = hashlib.sha256(src + arch.encode()).hexdigest()[:16]
    out_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sglang_pariskv"
    lib = out_dir / tag / f"libpariskv_{name}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            subprocess.run(
                nvcc_command(nvcc, source, arch, tmp), check=True, capture_output=True, timeout=300
            )
        except (subprocess.SubprocessError, OSError) as e:
            Path(tmp).unlink(missing_ok=True)
            detail = getattr(e, "stderr", b"") or b""
            logger.warning(
                "ParisKV: building the CUDA %s kernel failed (%s); falling back to its "
                "slower Triton/torch version. %s",
                name,
                e,
                detail.decode(errors="replace")[-2000:],
            )
            return None
        os.replace(tmp, lib)  # atomic: concurrent builders (TP ranks) never see half a file
    dll = ctypes.CDLL(str(lib))
    fn = getattr(dll, f"pariskv_{name}")
    fn.argtypes = _KERNELS[name][1]
    fn.restype = ctypes.c_int
    return dll


def _launch(name: str, device: torch.device, *args) -> None:
    """Call ``pariskv_<name>(*args, stream)`` on ``device``'s current stream (so it is
    CUDA-graph capturable); a missing build or a nonzero return code raises."""
    lib = _library(name)
    if lib is None:
        raise RuntimeError(f"the CUDA {_KERNELS[name][0]} is unavailable (no nvcc or no source)")
    rc = getattr(lib, f"pariskv_{name}")(*args, torch.cuda.current_stream(device).cuda_stream)
    if rc != 0:
        raise RuntimeError(f"pariskv_{name} failed with code {rc}")


def _require_dtypes(op: str, **tensors: tuple[torch.Tensor, torch.dtype]) -> None:
    """The ctypes calls pass raw pointers: a wrong dtype would be read as garbage."""
    for name, (t, dt) in tensors.items():
        if t.dtype != dt:
            raise TypeError(f"{op}: {name} must be {dt}, got {t.dtype}")


def cuda_available() -> bool:
    """Every CUDA kernel built (or already cached) for this GPU."""
    return all(_library(n) is not None for n in _KERNELS)


#: dtype codes of csrc/query_table.cu's query argument.
_QUERY_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def query_table_cuda(
    q: torch.Tensor,
    rotation: torch.Tensor,
    query_out,
    table_out: torch.Tensor,
    score_hist: torch.Tensor,
    query_copy: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> None:
    """CUDA twin of :func:`query_table.query_table` (csrc/query_table.cu): same arguments
    and outputs; ``query_out`` is a :class:`codec.query.PreparedQuery`. ``query_copy``,
    when given (contiguous ``[R, Hq, D]``, q's dtype), receives a copy of ``q`` from the
    same launch."""
    if q.dtype not in _QUERY_DTYPES:
        raise TypeError(f"query_table_cuda: q must be one of {list(_QUERY_DTYPES)}")
    _require_dtypes(
        "query_table_cuda",
        rotation=(rotation, torch.float32),
        blocks=(query_out.blocks, torch.float32),
        norm=(query_out.norm, torch.float32),
        table=(table_out, torch.int8),
        score_hist=(score_hist, torch.int32),
    )
    r, hq, d = q.shape
    _, h, b, _ = table_out.shape
    check_head_rows("scale", scale, h, d)
    if rotation.shape != (d, d) or not rotation.is_contiguous():
        raise ValueError(
            f"query_table_cuda: rotation must be a contiguous [{d}, {d}] matrix, "
            f"got {tuple(rotation.shape)} with strides {rotation.stride()}"
        )
    if r == 0:
        return
    if q.stride(-1) != 1:
        q = q.contiguous()
    if query_copy is not None and (
        query_copy.shape != q.shape or query_copy.dtype != q.dtype or not query_copy.is_contiguous()
    ):
        raise ValueError(
            f"query_table_cuda: query_copy must be contiguous {tuple(q.shape)} {q.dtype}, "
            f"got {tuple(query_copy.shape)} {query_copy.dtype}"
        )
    _launch(
        "query_table",
        q.device,
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        _QUERY_DTYPES[q.dtype],
        0 if scale is None else scale.data_ptr(),
        rotation.data_ptr(),
        query_out.blocks.data_ptr(),
        query_out.norm.data_ptr(),
        table_out.data_ptr(),
        score_hist.data_ptr(),
        0 if query_copy is None else query_copy.data_ptr(),
        r,
        h,
        b,
        hq // h,
        score_hist.shape[-1],
    )


def collision_scan_cuda(
    signs: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    zone_end: torch.Tensor,
    table: torch.Tensor,
    scores: torch.Tensor,
    score_hist: torch.Tensor,
    zone_start: int,
    tokens_per_block: int = 1024,
) -> None:
    """CUDA twin of :func:`collision.collision_scan` (``seq_lens`` / ``zone_end`` int64,
    ``req_pool_indices`` and ``req_to_token`` int32; every tensor contiguous). A block
    scans ``tokens_per_block`` positions of one request (the run length of
    :func:`launch_geometry.scan_tokens_per_block`), staging the signs through shared
    memory (csrc/collision_scan.cu)."""
    _, h, b = signs.shape
    r, _, nmax = scores.shape
    _require_dtypes(
        "collision_scan_cuda",
        req_to_token=(req_to_token, torch.int32),
        req_pool_indices=(req_pool_indices, torch.int32),
        seq_lens=(seq_lens, torch.int64),
        zone_end=(zone_end, torch.int64),
        table=(table, torch.int8),
    )
    _launch(
        "collision_scan",
        signs.device,
        signs.data_ptr(),
        req_to_token.data_ptr(),
        req_to_token.stride(0),
        req_pool_indices.data_ptr(),
        seq_lens.data_ptr(),
        zone_end.data_ptr(),
        table.data_ptr(),
        scores.data_ptr(),
        score_hist.data_ptr(),
        zone_start,
        nmax,
        r,
        h,
        b,
        score_hist.shape[-1],
        tokens_per_block,
    )


#: csrc/select_rerank.cu's code of a 16-bit dtype, for keys and queries alike.
_HALF_CODES = {torch.float16: 0, torch.bfloat16: 1}


def select_rerank_cuda(
    scores: torch.Tensor,
    buf,
    counts: torch.Tensor,
    zone_start: int,
    zone_end: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    signs: torch.Tensor,
    mags: torch.Tensor,
    weights: torch.Tensor,
    query_blocks: torch.Tensor,
    query_norm: torch.Tensor,
    levels: torch.Tensor,
    cand: torch.Tensor,
    est: torch.Tensor,
    keys: torch.Tensor | None = None,
    query: torch.Tensor | None = None,
) -> None:
    """Candidate write + rerank in one launch (csrc/select_rerank.cu), after
    :func:`select.count_candidates` filled ``buf`` (a :class:`select.CandidateBuffers`):
    ``cand`` receives exactly the KV slots the Triton write would, ``est`` their
    estimates (as :func:`rerank.rerank_estimates`), -inf at and past each row's C.

    With ``keys`` (the layer's K buffer, contiguous fp16/bf16 ``[slots, Hkv, D]``) and
    ``query`` (the decode queries, contiguous fp16/bf16 ``[R, Hq, D]``), ``est`` is the
    exact inner product of each candidate's key with its group's mean query (as
    :func:`rerank.rerank_by_keys`), and ``mags`` / ``weights`` / ``query_blocks`` /
    ``query_norm`` are not read."""
    _require_dtypes(
        "select_rerank_cuda",
        counts=(counts, torch.int64),
        zone_end=(zone_end, torch.int64),
        req_to_token=(req_to_token, torch.int32),
        req_pool_indices=(req_pool_indices, torch.int32),
        cand=(cand, torch.int32),
        est=(est, torch.float32),
    )
    r, h, nmax = scores.shape
    key_dtype, groups = 0, 1
    if keys is not None:
        _check_keys_and_query(keys, query, r, h, signs.shape[-1] * 8)
        key_dtype = 1 + _HALF_CODES[keys.dtype] + 2 * _HALF_CODES[query.dtype]
        groups = query.shape[1] // h
    _launch(
        "select_rerank",
        scores.device,
        scores.data_ptr(),
        buf.thr.data_ptr(),
        buf.take.data_ptr(),
        buf.ngt.data_ptr(),
        buf.gt.data_ptr(),
        buf.eq.data_ptr(),
        zone_end.data_ptr(),
        counts.data_ptr(),
        req_to_token.data_ptr(),
        req_to_token.stride(0),
        req_pool_indices.data_ptr(),
        signs.data_ptr(),
        mags.data_ptr(),
        weights.data_ptr(),
        query_blocks.data_ptr(),
        query_norm.data_ptr(),
        levels.data_ptr(),
        0 if keys is None else keys.data_ptr(),
        0 if query is None else query.data_ptr(),
        groups,
        key_dtype,
        cand.data_ptr(),
        est.data_ptr(),
        zone_start,
        nmax,
        buf.nch,
        cand.shape[-1],
        r,
        h,
        signs.shape[-1],
        buf.chunk,
    )


def _check_keys_and_query(
    keys: torch.Tensor, query: torch.Tensor | None, r: int, h: int, d: int
) -> None:
    """The rerank by the keys reads raw rows: 16-byte aligned, contiguous, 16-bit."""
    if query is None:
        raise ValueError("select_rerank_cuda: the rerank by the keys needs the query")
    for name, x, lead in (("keys", keys, None), ("query", query, r)):
        bad = x.dim() != 3 or x.shape[-1] != d or (lead is not None and x.shape[0] != lead)
        if bad or x.dtype not in _HALF_CODES or not x.is_contiguous() or x.data_ptr() % 16:
            raise ValueError(
                f"select_rerank_cuda: {name} must be a contiguous, 16-byte aligned fp16/bf16 "
                f"[{'slots' if lead is None else lead}, heads, {d}] tensor, got "
                f"{tuple(x.shape)} {x.dtype}"
            )
    if keys.shape[1] != h or query.shape[1] % h:
        raise ValueError(
            f"select_rerank_cuda: keys of {keys.shape[1]} heads and a query of "
            f"{query.shape[1]} heads for {h} KV heads"
        )


#: Thread blocks per row of the CUDA top-k (a Hopper thread-block cluster; see topk.cu).
TOPK_CLUSTER_SIZES = (1, 2, 4, 8)


def topk_cuda(
    est: torch.Tensor,
    cand: torch.Tensor,
    counts: torch.Tensor,
    out: torch.Tensor,
    cluster: int = 1,
) -> None:
    """CUDA twin of :func:`rerank.topk_slots`: ``out`` int32 [R, Hkv, k] receives the KV
    slots of each row's min(k, C) best estimates (unordered); rows with C = 0 untouched.
    ``cluster``: blocks per row, one of :data:`TOPK_CLUSTER_SIZES` (above 1 needs
    thread-block clusters: compute capability 9.0 or newer)."""
    if cluster not in TOPK_CLUSTER_SIZES:
        raise ValueError(f"topk_cuda: cluster {cluster} is not one of {TOPK_CLUSTER_SIZES}")
    r, h, cmax = est.shape
    _launch(
        "topk",
        est.device,
        est.data_ptr(),
        cand.data_ptr(),
        counts.data_ptr(),
        out.data_ptr(),
        cmax,
        out.shape[-1],
        r,
        h,
        cluster,
    )
