"""FlashInfer decode over a :class:`DecodeWorkspace`'s output ("head as batch").

The K/V pool ``[slots, Hkv, D]`` is viewed as ``[slots * Hkv, 1, 1, D]`` pages (page size 1,
one KV head per page) and each (request, KV head) is one batch row whose query heads are
its GQA group, so every KV head attends to its own retrieved set in one call. Imports
flashinfer lazily: the rest of the package does not need it.
"""

from __future__ import annotations

import torch

from sglang_pariskv.kernels.workspace import DecodeWorkspace


class HeadAsBatchDecode:
    """plan/run pair around ``flashinfer.BatchDecodeWithPagedKVCacheWrapper``."""

    def __init__(
        self, workspace: DecodeWorkspace, kv_dtype: torch.dtype, workspace_bytes: int = 256 << 20
    ) -> None:
        import flashinfer

        self.ws = workspace
        self.kv_dtype = kv_dtype
        self.group = workspace.hq // workspace.hkv
        buf = torch.empty(workspace_bytes, dtype=torch.uint8, device=workspace.device)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            buf, "NHD", use_tensor_cores=self.group > 4
        )

    def plan(self, seq_lens_cpu: torch.Tensor) -> None:
        """Host-side planning from the CPU sequence lengths (no device sync)."""
        indptr = self.ws.plan(seq_lens_cpu)
        rows = indptr.numel() - 1
        last = torch.ones(rows, dtype=torch.int32)
        self.wrapper.plan(
            indptr,
            self.ws.kv_indices,  # filled by ws.run, read by wrapper.run (same tensor)
            last,
            self.group,
            1,
            self.ws.d,
            1,
            q_data_type=self.kv_dtype,
            kv_data_type=self.kv_dtype,
        )

    def run(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """Attention of q ``[R, Hq, D]`` over the indices of the last ``ws.run``."""
        r, hq, d = q.shape
        rows = r * self.ws.hkv
        k = k_pool.view(-1, 1, 1, d)
        v = v_pool.view(-1, 1, 1, d)
        out = self.wrapper.run(q.reshape(rows, self.group, d), (k, v))
        return out.view(r, hq, d)
