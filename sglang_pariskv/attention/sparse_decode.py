"""FlashInfer decode over a different token list per (request, KV head): "head as batch".

SGLang's KV pool of a layer is ``[slots, Hkv, D]``. Viewed as ``[slots * Hkv, 1, 1, D]``
(pages of one token, one KV head), the key of (slot, head) is page ``slot * Hkv + head``,
so one FlashInfer batch row per (request, KV head) can attend to its own retrieved tokens,
with that KV head's GQA group as the row's query heads. Row lengths (sink + local + top-k
for sparse requests, the full length for dense ones) are the same in every layer, so the
wrapper is planned once per decode batch and each layer only rewrites the index buffer.
"""

from __future__ import annotations

import torch
from flashinfer import BatchDecodeWithPagedKVCacheWrapper

#: Float workspace for split-KV partial results (same order as SGLang's own).
WORKSPACE_BYTES = 128 * 1024 * 1024


class HeadAsBatchDecode:
    """Plan once per batch (row lengths), run per layer (row indices)."""

    def __init__(self, num_kv_heads: int, group: int, head_dim: int, device: torch.device):
        self.num_kv_heads, self.group, self.head_dim = num_kv_heads, group, head_dim
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # Tensor-core decode handles any GQA group size (the CUDA-core kernel does not).
        self.wrapper = BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=True
        )
        self.indices: torch.Tensor | None = None
        self.row_lens: torch.Tensor | None = None

    def plan(self, row_lens: torch.Tensor, q_dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
        """row_lens: int [R * Hkv] tokens per row (request-major, head-minor)."""
        dev = self.workspace.device
        row_lens = row_lens.to(device=dev, dtype=torch.int32)
        indptr = torch.zeros(row_lens.numel() + 1, dtype=torch.int32, device=dev)
        indptr[1:] = torch.cumsum(row_lens, 0)
        total = int(indptr[-1])
        self.indices = torch.zeros(max(total, 1), dtype=torch.int32, device=dev)
        self.row_lens = row_lens
        self.wrapper.plan(
            indptr,
            self.indices,
            torch.ones(row_lens.numel(), dtype=torch.int32, device=dev),
            num_qo_heads=self.group,
            num_kv_heads=1,
            head_dim=self.head_dim,
            page_size=1,
            q_data_type=q_dtype,
            kv_data_type=kv_dtype,
        )

    def run(
        self,
        q: torch.Tensor,
        k_buffer: torch.Tensor,
        v_buffer: torch.Tensor,
        flat_indices: torch.Tensor,
        sm_scale: float,
        logits_soft_cap: float = 0.0,
    ) -> torch.Tensor:
        """q [R, Hq, D]; k/v_buffer [slots, Hkv, D]; flat_indices: the rows' pages
        (``slot * Hkv + head``) concatenated in row order. Returns [R, Hq, D]."""
        if self.indices is None:
            raise RuntimeError("HeadAsBatchDecode.run called before plan")
        n = flat_indices.numel()
        if n != int(self.row_lens.sum()):
            raise RuntimeError(
                f"ParisKV retrieved {n} tokens but the plan holds {int(self.row_lens.sum())}"
            )
        self.indices[:n] = flat_indices
        r, hq, d = q.shape
        pages = k_buffer.shape[0] * k_buffer.shape[1]
        k = k_buffer.view(pages, 1, 1, d)
        v = v_buffer.view(pages, 1, 1, d)
        q_rows = q.reshape(r * self.num_kv_heads, self.group, d)
        out = self.wrapper.run(q_rows, (k, v), sm_scale=sm_scale, logits_soft_cap=logits_soft_cap)
        return out.reshape(r, hq, d)
