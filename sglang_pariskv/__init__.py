"""sglang-pariskv: ParisKV KV-cache retrieval for SGLang.

Layers (data flows down): ``codec`` (plain-torch spec and oracle) -> ``kernels`` (fast
paths, each tested against ``codec``) -> ``index`` -> ``attention`` -> ``plugin``.
"""

from sglang_pariskv.config import ParisKVConfig

__all__ = ["ParisKVConfig"]
__version__ = "0.1.0"
