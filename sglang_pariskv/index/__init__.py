"""Slot-keyed ParisKV metadata stored alongside SGLang's paged KV pool."""

from sglang_pariskv.index.code_pool import CodePool, code_bytes_per_token

__all__ = ["CodePool", "code_bytes_per_token"]
