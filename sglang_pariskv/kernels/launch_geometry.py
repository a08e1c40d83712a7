"""Launch geometry of the CUDA retrieval kernels (csrc/), chosen by rule from the shapes.

:class:`kernels.workspace.DecodeWorkspace` asks these functions, never a caller: the CUDA
scan's run length per batch (:func:`scan_tokens_per_block`), the top-k's blocks per row
(:func:`topk_cluster_for`), and whether the scan's shared memory fits this GPU at all
(:func:`check_cuda_kernels_fit`). The constants mirror the kernels' own.
"""

from __future__ import annotations

import torch

#: Positions per block of csrc/select_rerank.cu (its count pass must use the same chunks).
SELECT_RERANK_CHUNK = 1024

#: Scan block sizes (positions per CUDA block) the choice picks from, largest first.
SCAN_TOKENS_PER_BLOCK = (1024, 512, 256)
#: Code blocks per key (head_dim / 8) that csrc/collision_scan.cu and select_rerank.cu
#: are instantiated for: head_dim 64 and 128.
CUDA_CODE_BLOCKS = (8, 16)
#: The CUDA scan's shortest chunk of staged tokens (csrc/collision_scan.cu's kChunks).
CUDA_SCAN_MIN_CHUNK = 32

#: Blocks per row of the CUDA top-k for rows longer than one block's registers hold
#: (:data:`TOPK_ONE_BLOCK_KEYS`), on GPUs with thread-block clusters (compute 9.0+).
CUDA_TOPK_CLUSTER = 8
#: Candidates one top-k block keeps in registers (csrc/topk.cu: 1024 threads x 16).
TOPK_ONE_BLOCK_KEYS = 16 * 1024


def scan_tokens_per_block(max_context: int, batch: int, num_sms: int) -> int:
    """Positions per block of the CUDA scan for a batch of ``batch`` requests.

    The grid is fixed by ``max_context`` (CUDA graphs bake it in), one block per run of
    positions per request. Every block first copies the request's whole centroid table (32 KiB
    at 8 KV heads x head dim 128) into shared memory, so short runs spend as many bytes on
    tables as on signs: 1024-position runs were the fastest or within
    1% at 128K x 1/2/8 and 1M x 1 on an H100 (at 128K x 2: 32.4 us against 39.7 us for
    256-position runs; with the staged scan 21.0 us against 22.2 us for 512; 2048-position
    runs took 55.9 us against 48.7 at 128K x 5). Shorter runs
    only when 1024 would leave more than every other SM idle."""
    for tpb in SCAN_TOKENS_PER_BLOCK:
        if -(-max_context // tpb) * batch * 2 >= num_sms:
            return tpb
    return SCAN_TOKENS_PER_BLOCK[-1]


def has_clusters(device: torch.device) -> bool:
    """Thread-block clusters: a CUDA device of compute capability 9.0 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def topk_cluster_for(cmax: int, device: torch.device) -> int:
    """Blocks per top-k row. Rows that fit one block's registers stay on one block: an
    8-block cluster made 128K x 2 slower on an H100 (42 vs 29 us: a cluster needs 8 free
    SMs of one GPC, so 16 rows of 8 did not all fit at once) and 128K x 1 no faster.
    Longer rows (1M tokens: C = 104826) are split: 35 us at 1M x 1 against 87.5 us on one
    block."""
    if not has_clusters(device):
        return 1
    return 1 if cmax <= TOPK_ONE_BLOCK_KEYS else CUDA_TOPK_CLUSTER


def cuda_scan_shared_bytes(hkv: int, b: int, nbp: int, tpb: int, chunk: int) -> int:
    """Shared memory of one CUDA scan block (csrc/collision_scan.cu's scan_smem_bytes):
    centroid table, score histogram, the run's slots, two chunks of staged sign rows."""
    stride = hkv * b + (0 if hkv % 2 else b)
    return hkv * b * 256 + hkv * nbp * 4 + -(-tpb // 4) * 4 * 4 + 2 * chunk * stride


def check_cuda_kernels_fit(hkv: int, b: int, nbp: int, device: torch.device) -> None:
    """A ValueError when the CUDA kernels cannot run this shape: a head_dim they are not
    built for, or more shared memory than this GPU gives a block even at the scan's
    shortest chunks (very many KV heads per rank). The workspace then runs the Triton
    kernels; more tensor parallelism would bring the CUDA scan back."""
    if b not in CUDA_CODE_BLOCKS:
        raise ValueError(
            f"the CUDA retrieval kernels are built for head_dim "
            f"{[8 * x for x in CUDA_CODE_BLOCKS]}, not {8 * b}"
        )
    optin = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    need = cuda_scan_shared_bytes(hkv, b, nbp, max(SCAN_TOKENS_PER_BLOCK), CUDA_SCAN_MIN_CHUNK)
    if need > optin:
        raise ValueError(
            f"the CUDA collision scan needs {need} bytes of shared memory per block for "
            f"{hkv} KV heads x head_dim {8 * b}, more than this GPU's {optin}; split the "
            "KV heads over more GPUs (--tp-size) to use it"
        )
