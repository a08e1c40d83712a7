"""Pinned host storage of K and V for every layer, indexed by SGLang's KV slot id.

Layout: one tensor ``data`` of shape ``[layers, 2, slots, Hkv, D]`` (2 = K, V), so that
``data[l, 0]`` and ``data[l, 1]`` are exactly the contiguous ``[slots, Hkv, D]`` buffers
SGLang's ``MHATokenToKVPool`` keeps per layer on the GPU.

* That is what lets SGLang run unchanged over host-resident K/V (``offload.kv_pool``):
  :meth:`cuda_views` wraps each layer's K and V as CUDA tensors over the same memory
  (``offload.cuda_alias``), and SGLang's store kernel, KV moves and FlashInfer's prefill
  and dense decode read and write them over PCIe. An interleaved ``[slots, Hkv, 2, D]``
  layout (one 512 B row per (slot, head) instead of two 256 B rows) would halve the
  scattered reads of a fetch, but SGLang's store path views the cache as ``[-1, Hkv·D]``
  rows, which a strided K view cannot be; serving unchanged won.
* Rows are keyed by slot, like :class:`sglang_pariskv.index.code_pool.CodePool`: a radix
  cache prefix hit hands out slot ids whose host rows are already written, and a reused
  slot is overwritten by its next writer. Nothing here tracks requests.
* The unit of retrieval is one (slot, head) pair: :meth:`layer_rows` views a layer's K
  (or V) as ``[slots·Hkv, D]``; row ``slot·Hkv + head`` is the number FlashInfer's "head
  as batch" ``kv_indices`` already hold. UVA reads over PCIe (H100: 50 GB/s for 2 KB
  rows, 13 GB/s for 256 B rows scattered over a 4 GB pool) charge per scattered row.
* Layer-major: one layer's K occupies one contiguous ``slots·Hkv·D`` range, so a layer's
  fetch touches a small part of the pool's address range (fewer translations).

Pinning: with CUDA, the memory is a plain CPU allocation registered with
``cudaHostRegister`` (portable | mapped), as SGLang's HiCache host pool does, rather than
``torch.empty(pin_memory=True)``: torch's caching host allocator rounds every block up to
a power of two, so a 40 GiB pool would pin 64 GiB. Without CUDA (tests) it is plain memory.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sglang_pariskv.config import ParisKVConfigError

#: Host memory left to the OS, SGLang and the Python process by :func:`check_host_memory`.
RESERVE_BYTES = 4 * 2**30
_CUDA_HOST_REGISTER_PORTABLE_MAPPED = 0x01 | 0x02


def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Host bytes one KV slot takes across all layers (K and V)."""
    return num_layers * num_kv_heads * 2 * head_dim * torch.empty((), dtype=dtype).element_size()


def host_pool_slots(
    gb: float, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Slots that ``--pariskv-host-pool-gb gb`` (GiB) holds."""
    return int(gb * 2**30) // bytes_per_slot(num_layers, num_kv_heads, head_dim, dtype)


def _mem_available(meminfo: str | Path) -> int:
    for line in Path(meminfo).read_text().splitlines():
        if line.startswith("MemAvailable:"):
            value, unit = line.split()[1:3]
            if unit.lower() != "kb":
                break
            return int(value) * 1024
    raise ParisKVConfigError(
        f"cannot read MemAvailable from {meminfo} to check --pariskv-host-pool-gb: "
        "run on Linux >= 3.14 or serve without --pariskv-offload host"
    )


def check_host_memory(
    nbytes: int,
    meminfo: str | Path = "/proc/meminfo",
    ranks: int = 1,
) -> None:
    """Refuse host pools of ``nbytes`` in all that would not fit in available host memory.

    Pinned pages cannot be swapped or reclaimed, so overcommitting them starves the OS
    and SGLang (or gets the server OOM-killed mid-run); this check runs before anything is
    allocated. MemAvailable counts reclaimable page cache as available. ``ranks``: how
    many schedulers share ``nbytes`` (one pool each: TP ranks times DP replicas), so the suggested
    ``--pariskv-host-pool-gb``, a per-rank size, fits when every rank pins it.
    """
    avail = _mem_available(meminfo)
    usable = avail - RESERVE_BYTES
    if nbytes <= usable:
        return
    gib = 2**30
    per_rank = math.floor(usable / ranks / gib)
    if per_rank < 1:
        fix = "this host has no room for a host pool: serve without --pariskv-offload host"
    else:
        fix = (
            f"pass --pariskv-host-pool-gb {per_rank} or less"
            + (f" (each of the {ranks} ranks pins its own pool)" if ranks > 1 else "")
            + ", or free host memory (other processes) first"
        )
    raise ParisKVConfigError(
        f"--pariskv-host-pool-gb asks for {nbytes / gib:.1f} GiB of pinned host memory, but "
        f"{meminfo} reports {avail / gib:.1f} GiB available and "
        f"{RESERVE_BYTES / gib:.1f} GiB is kept for the system: {fix}"
    )


def check_host_pools(config, args) -> None:
    """With ``--pariskv-offload host`` every scheduler of ``args`` (server arguments, raw
    or resolved; one per TP rank of each of the ``--dp-size`` replicas) pins its own pool
    at the same time: check them together against the host's free memory before any model
    work (one rank alone cannot see the others)."""
    if not config.offloaded:
        return
    ranks = int(getattr(args, "tp_size", 1) or 1) * int(getattr(args, "dp_size", 1) or 1)
    check_host_memory(int(config.host_pool_gb * 2**30) * ranks, ranks=ranks)


def _register(t: torch.Tensor) -> None:
    cudart = torch.cuda.cudart()
    rc = cudart.cudaHostRegister(
        t.data_ptr(), t.numel() * t.element_size(), _CUDA_HOST_REGISTER_PORTABLE_MAPPED
    )
    if int(rc) != 0:
        raise RuntimeError(
            f"cudaHostRegister of the {t.numel() * t.element_size() / 2**30:.1f} GiB host KV "
            f"pool failed ({cudart.cudaGetErrorString(rc)}): lower --pariskv-host-pool-gb"
        )


class HostKVPool:
    """K/V of ``num_slots`` slots x ``num_layers`` layers in (pinned) host memory."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        pin: bool | None = None,
        check_memory: bool = True,
        meminfo: str | Path = "/proc/meminfo",
    ):
        """``pin``: None pins when CUDA is available. ``check_memory`` runs
        :func:`check_host_memory` (reading ``meminfo``) before allocating."""
        if pin is None:
            pin = torch.cuda.is_available()
        if pin and not torch.cuda.is_available():
            raise ValueError("a pinned host pool needs CUDA")
        self.num_slots, self.num_layers = num_slots, num_layers
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        shape = (num_layers, 2, num_slots, num_kv_heads, head_dim)
        if check_memory:
            check_host_memory(
                num_slots * bytes_per_slot(num_layers, num_kv_heads, head_dim, dtype), meminfo
            )
        self.data = torch.empty(shape, dtype=dtype)
        self.pinned = False
        if pin:
            _register(self.data)
            self.pinned = True

    # -- views -----------------------------------------------------------------------
    @property
    def row_width(self) -> int:
        """Elements of one (slot, head) pair, K and V together (a hot-cache row)."""
        return 2 * self.head_dim

    def layer_rows(self, layer: int, part: int) -> torch.Tensor:
        """``[slots·Hkv, D]`` of K (``part`` 0) or V (1): row ``slot·Hkv + head``."""
        return self.data[layer, part].view(self.num_slots * self.num_kv_heads, self.head_dim)

    def slot_rows(self, layer: int, part: int) -> torch.Tensor:
        """``[slots, Hkv·D]``: all heads of a slot's K (or V), one contiguous row."""
        return self.data[layer, part].view(self.num_slots, self.num_kv_heads * self.head_dim)

    def cuda_views(self, device: torch.device | str) -> tuple[list, list]:
        """Per-layer K and V ``[slots, Hkv, D]`` as CUDA tensors over this host memory
        (SGLang's ``k_buffer`` / ``v_buffer``). Kept on the pool: the aliases borrow its
        memory, so the pool must outlive them."""
        if not self.pinned:
            raise ValueError("CUDA views need a pinned pool (pin=True, CUDA available)")
        from sglang_pariskv.offload.cuda_alias import cuda_alias

        self._views = (
            [cuda_alias(self.data[layer, 0], device) for layer in range(self.num_layers)],
            [cuda_alias(self.data[layer, 1], device) for layer in range(self.num_layers)],
        )
        return self._views

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    # -- writes ----------------------------------------------------------------------
    def write(
        self,
        layer: int,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        use_kernel: bool | None = None,
    ) -> None:
        """Store ``k``, ``v`` ``[T, Hkv, D]`` (or ``[T, Hkv·D]``) at ``slots`` [T] of ``layer``.

        GPU sources are written by a UVA scatter kernel on the current stream (no host
        sync, CUDA-graph safe); CPU sources are copied by torch. ``use_kernel`` forces the
        kernel path (tests run it under Triton's interpreter on CPU).
        """
        if k.shape[0] == 0:
            return
        if use_kernel is None:
            use_kernel = k.is_cuda and self.pinned
        if use_kernel:
            self._write_kernel(layer, slots, k, v)
        else:
            self._write_torch(layer, slots, k, v)

    def _shape_kv(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.num_kv_heads, self.head_dim).to(self.dtype)

    def _write_torch(self, layer, slots, k, v) -> None:
        idx = slots.to("cpu", torch.int64)
        self.data[layer, 0, idx] = self._shape_kv(k).cpu()
        self.data[layer, 1, idx] = self._shape_kv(v).cpu()

    def _write_kernel(self, layer, slots, k, v) -> None:
        from sglang_pariskv.kernels.uva_gather import scatter_rows

        w = self.num_kv_heads * self.head_dim
        for part, x in ((0, k), (1, v)):
            scatter_rows(self._shape_kv(x).reshape(-1, w), self.slot_rows(layer, part), slots)

    def close(self) -> None:
        """Unregister the pinned memory (the tensor stays usable as plain memory)."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
            self.pinned = False

    def __del__(self):
        # Freeing registered memory without unregistering leaves the pages pinned.
        try:
            self.close()
        except Exception:
            pass
