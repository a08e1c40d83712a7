"""FlashInfer decode over a different token list per (request, KV head): "head as batch".

SGLang's KV pool of a layer is ``[slots, Hkv, D]``. Viewed as ``[slots * Hkv, 1, 1, D]``
(pages of one token, one KV head), the key of (slot, head) is page ``slot * Hkv + head``,
so one FlashInfer batch row per (request, KV head) attends to its own retrieved tokens,
with that KV head's GQA group as the row's query heads. Row lengths depend only on the
sequence lengths, so the wrapper is planned once per decode batch on the host (from
``DecodeWorkspace.plan``) and every layer's ``DecodeWorkspace.run`` rewrites the index
buffer the wrapper reads. With ``graph_batch`` set, the wrapper uses fixed buffers so the
per-layer work can be captured in a CUDA graph and replayed after each re-plan.

In a mixed batch SGLang's dense call is planned with one token per sparse request
(:func:`dense_rows_only`), so each request pays for one attention.
"""

from __future__ import annotations

import contextlib

import torch
from flashinfer import BatchDecodeWithPagedKVCacheWrapper

from sglang_pariskv.kernels.workspace import DecodeWorkspace

#: Float workspace for split-KV partial results. One buffer serves every wrapper of a
#: backend (eager and each captured batch size): it is scratch for the duration of a run,
#: and a backend's sparse calls run one at a time (the plan lives in each wrapper's own
#: int workspace), as SGLang's FlashInfer backend shares one buffer across its wrappers.
WORKSPACE_BYTES = 128 * 1024 * 1024


def float_workspace(device: torch.device | str) -> torch.Tensor:
    """A float workspace for :class:`HeadAsBatchDecode` wrappers to share."""
    return torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)


@contextlib.contextmanager
def dense_rows_only(forward_batch, dense_cpu: torch.Tensor, dense_dev: torch.Tensor):
    """Show the dense planner of a mixed batch its sparse requests (``~dense_cpu``) as
    1-token rows: their output comes from the sparse call, their dense one is discarded.
    ``dense_dev``: ``dense_cpu`` on the device."""
    fb = forward_batch
    saved = (fb.seq_lens, fb.seq_lens_cpu, fb.seq_lens_sum)
    bs = dense_cpu.numel()
    seq = fb.seq_lens.clone()
    seq[:bs] = torch.where(dense_dev, fb.seq_lens[:bs], 1)
    seq_cpu = fb.seq_lens_cpu.clone()
    seq_cpu[:bs] = torch.where(dense_cpu, fb.seq_lens_cpu[:bs], 1)
    fb.seq_lens, fb.seq_lens_cpu, fb.seq_lens_sum = seq, seq_cpu, int(seq_cpu[:bs].sum())
    try:
        yield
    finally:
        fb.seq_lens, fb.seq_lens_cpu, fb.seq_lens_sum = saved


class HeadAsBatchDecode:
    """plan (host, per batch) / run (device, per layer) around FlashInfer decode."""

    def __init__(
        self,
        workspace: DecodeWorkspace,
        kv_dtype: torch.dtype,
        graph_batch: int | None = None,
        shared_float_workspace: torch.Tensor | None = None,
    ) -> None:
        self.ws = workspace
        self.kv_dtype = kv_dtype
        self.group = workspace.hq // workspace.hkv
        dev = workspace.device
        self.float_workspace = (
            float_workspace(dev) if shared_float_workspace is None else shared_float_workspace
        )
        self.rows = 0  #: head-as-batch rows of the last plan (batch x Hkv)
        kwargs = {}
        if graph_batch is not None:
            rows = graph_batch * workspace.hkv
            self._last_page_len = torch.ones(rows, dtype=torch.int32, device=dev)
            kwargs = dict(
                use_cuda_graph=True,
                paged_kv_indptr_buffer=workspace.kv_indptr[: rows + 1],
                paged_kv_indices_buffer=workspace.kv_indices,
                paged_kv_last_page_len_buffer=self._last_page_len,
            )
        # Tensor-core decode handles every GQA group size (the CUDA-core kernel does not).
        self.wrapper = BatchDecodeWithPagedKVCacheWrapper(
            self.float_workspace, "NHD", use_tensor_cores=True, **kwargs
        )

    def plan(
        self,
        seq_lens_cpu: torch.Tensor,
        sm_scale: float | None = None,
        logits_soft_cap: float = 0.0,
    ) -> None:
        """Host-side planning from the CPU sequence lengths. FlashInfer fixes the softmax
        scale and soft cap at plan time, so every layer of the batch shares them."""
        indptr = self.ws.plan(seq_lens_cpu)
        rows = self.rows = indptr.numel() - 1
        self.wrapper.plan(
            indptr,
            self.ws.kv_indices,  # written by ws.run, read by wrapper.run (same tensor)
            torch.ones(rows, dtype=torch.int32),
            num_qo_heads=self.group,
            num_kv_heads=1,
            head_dim=self.ws.d,
            page_size=1,
            q_data_type=self.kv_dtype,
            kv_data_type=self.kv_dtype,
            sm_scale=sm_scale,
            logits_soft_cap=logits_soft_cap or None,
        )

    def _query_rows(self, q: torch.Tensor) -> torch.Tensor:
        """q ``[R, Hq, D]`` as FlashInfer rows ``[R * Hkv, G, D]``: the workspace's
        contiguous copy of this query when its last run made one (no copy kernel)."""
        r, _, d = q.shape
        qc = self.ws.contiguous_query(q)
        return (q if qc is None else qc).reshape(r * self.ws.hkv, self.group, d)

    def run(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """Attention of q ``[R, Hq, D]`` over the indices of the last ``ws.run``."""
        r, hq, d = q.shape
        k = k_pool.view(-1, 1, 1, d)
        v = v_pool.view(-1, 1, 1, d)
        out = self.wrapper.run(self._query_rows(q), (k, v))
        return out.view(r, hq, d)

    def run_staged(self, q: torch.Tensor, staging_kv: torch.Tensor) -> torch.Tensor:
        """As :meth:`run`, over a staging buffer ``[rows, 2, 1, 1, D]`` (host offload's
        hot cache) whose row numbers ``offload.fetch`` wrote into the same index buffer."""
        r, hq, d = q.shape
        out = self.wrapper.run(self._query_rows(q), staging_kv)
        return out.view(r, hq, d)

    def entries(self) -> int:
        """Upper bound of this plan's ``kv_indices`` entries: rows x the longest row."""
        return self.rows * self.ws.max_row
