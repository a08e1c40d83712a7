"""``ParisKVAttnBackend``: SGLang's FlashInfer backend with ParisKV sparse decoding.

Extend (prefill, chunked prefill, prefix-cache hits) runs FlashInfer's dense attention
unchanged; the KV pool encodes every key it stores (``index.kv_pool``). Decode batches
whose requests are all at or below the dense threshold also run unchanged. Otherwise each
layer retrieves per (request, KV head) and one FlashInfer call attends over
sink + local window + top-k (dense rows for the short requests of a mixed batch).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sglang_pariskv.attention.sparse_decode import HeadAsBatchDecode
from sglang_pariskv.codec.pipeline import retrieve
from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.index.kv_pool import ParisKVTokenToKVPool
from sglang_pariskv.server_flags import ParisKVConfigError

logger = logging.getLogger("sglang_pariskv")


@dataclass
class DecodeStats:
    """Counters an operator reads (exported as metrics by the plugin)."""

    sparse_steps: int = 0
    dense_steps: int = 0
    dense_fallback_requests: int = 0
    attended_tokens: int = 0
    context_tokens: int = 0
    retrieval_seconds: float = 0.0


class ParisKVAttnBackend(FlashInferAttnBackend):
    def __init__(self, model_runner, config: ParisKVConfig):
        super().__init__(model_runner, init_new_workspace=model_runner.init_new_workspace)
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, ParisKVTokenToKVPool):
            raise ParisKVConfigError(
                f"the KV pool is {type(pool).__name__}, not ParisKV's: this model or mode "
                "builds a KV pool ParisKV does not support; serve without --enable-pariskv"
            )
        self.config = config
        self.codes = pool.pariskv
        mc = model_runner.model_config
        self.num_kv_heads = pool.head_num
        self.num_q_heads = mc.num_attention_heads // max(1, model_runner.tp_size)
        self.head_dim = pool.head_dim
        self.sparse = HeadAsBatchDecode(
            self.num_kv_heads,
            self.num_q_heads // self.num_kv_heads,
            self.head_dim,
            torch.device(model_runner.device),
        )
        self._sparse_batch = False
        self.stats = DecodeStats()

    def init_cuda_graph_state(self, *args, **kwargs):
        raise ParisKVConfigError(
            "ParisKV decode does not run inside CUDA graphs yet: pass "
            "--cuda-graph-backend-decode disabled together with --enable-pariskv"
        )

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self._sparse_batch = False
        if not forward_batch.forward_mode.is_decode():
            return
        seq_lens = forward_batch.seq_lens_cpu
        if seq_lens is None:
            seq_lens = forward_batch.seq_lens.cpu()
        dense = torch.tensor([self.config.is_dense(int(s)) for s in seq_lens])
        if bool(dense.all()):
            self.stats.dense_steps += 1
            return
        self._sparse_batch = True
        self.stats.sparse_steps += 1
        self.stats.dense_fallback_requests += int(dense.sum())
        row = torch.where(dense, seq_lens.to(torch.int64), self.config.budget)
        self.stats.attended_tokens += int(row.sum())
        self.stats.context_tokens += int(seq_lens.sum())
        self.sparse.plan(
            row.repeat_interleave(self.num_kv_heads),
            q_dtype=self.token_to_kv_pool.dtype,
            kv_dtype=self.token_to_kv_pool.dtype,
        )

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if not self._sparse_batch or layer.is_cross_attention:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        if k is not None and save_kv_cache:
            self.token_to_kv_pool.set_kv_buffer(
                layer,
                KVWriteLoc(forward_batch.out_cache_loc, None),
                k,
                v,
                *self._kv_write_scales(layer),
            )
        t0 = time.perf_counter()
        flat = self.retrieve_indices(q, layer.layer_id, forward_batch)
        self.stats.retrieval_seconds += time.perf_counter() - t0
        bs = forward_batch.batch_size
        out = self.sparse.run(
            q.reshape(bs, self.num_q_heads, self.head_dim),
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            flat,
            sm_scale=layer.scaling,
            logits_soft_cap=layer.logit_cap or 0.0,
        )
        return out.reshape(bs, self.num_q_heads * self.head_dim)

    def retrieve_indices(self, q, layer_id: int, forward_batch) -> torch.Tensor:
        """Pages (``slot * Hkv + head``) each row attends, concatenated in row order."""
        bs, hkv = forward_batch.batch_size, self.num_kv_heads
        seq_lens = forward_batch.seq_lens.to(torch.int64)
        n_max = (
            int(forward_batch.seq_lens_cpu.max())
            if forward_batch.seq_lens_cpu is not None
            else int(seq_lens.max())
        )
        slots = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices, :n_max]
        slots = slots.to(torch.int64)
        local = layer_id - self.token_to_kv_pool.start_layer
        codes = self.codes.gather(local, slots)  # [bs, n_max, Hkv, ...]
        ret = retrieve(q.reshape(bs, self.num_q_heads, self.head_dim), codes, seq_lens, self.config)
        pos = ret.positions.clamp_min(0)  # [bs, Hkv, M]
        slot_of = torch.gather(slots, 1, pos.reshape(bs, -1)).reshape(pos.shape)
        pages = slot_of * hkv + torch.arange(hkv, device=pos.device)[None, :, None]
        return pages[ret.valid].to(torch.int32)
