"""Tiny random Llama / Qwen2 checkpoints saved as ordinary Hugging Face directories.

They stand in for "your own model" in the ``--model`` tests: same file layout and loading
path as a real checkpoint, seconds to run on CPU. The tokenizer is a byte-level BPE trained
here on the task generators' own text (so a few hundred tokens hold a whole task prompt)
and carries a ChatML template, like the instruct models the tools target.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from pariskv_tools.workloads import task_generators

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Shapes of the two families. Llama sets head_dim (32) apart from hidden / heads (16), so a
#: test passes only if head_dim is read from the config; Qwen2 derives it.
SHAPES = {
    "llama": {"layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 32},
    "qwen2": {"layers": 3, "q_heads": 4, "kv_heads": 2, "head_dim": 16},
}
MAX_POSITIONS = 1024


class _WordCounter:
    """Whitespace "tokenizer": enough for the generators to size the training text."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return text.split()


@cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    counter = _WordCounter()
    corpus = [
        task_generators.make_task(name, counter, 1500, seed=seed).prompt
        for name in task_generators.TASKS
        for seed in range(3)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_model(directory: Path, family: str, seed: int = 0) -> Path:
    """Write a random ``family`` ("llama" | "qwen2") model + tokenizer into ``directory``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tok = tiny_tokenizer()
    shape = SHAPES[family]
    common = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["q_heads"],
        "num_key_value_heads": shape["kv_heads"],
        "max_position_embeddings": MAX_POSITIONS,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": None,
    }
    if family == "llama":
        config = LlamaConfig(head_dim=shape["head_dim"], **common)
    else:
        config = Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
