"""Record the post-RoPE queries, keys and values a real model attends with.

ParisKV's codec and retrieval are judged on real attention traces, not random vectors: real
keys have outlier channels, RoPE structure and attention sinks that random data lacks. This
module runs a transformers causal LM on CPU over a prompt plus greedy decoding and records,
per layer:

* the key and value of every position (prompt and generated), as they sit in the KV cache,
  i.e. keys after RoPE;
* the query of the last prompt position and of every decode step, after RoPE;
* the attention output per head (before ``o_proj``) for those same queries, so a retrieval
  scheme can be scored against the exact output the model computed.

Here are the :class:`Capture` a run produces, with its file format, and the :func:`capture`
driver, which runs the prefill and the decode loop. The recording itself is an attention hook
registered with transformers (:mod:`.capture_hook`), so generation is bit-identical to plain
``sdpa``; the command line is :mod:`.capture_cli`.

Step convention, for a prompt of P tokens and ``n_decode`` generated tokens: the prefill
query at position P-1 produces generated token 0; every generated token is then fed back
(including the last, whose own prediction is discarded) so that every token in
``token_ids`` has a key. Hence ``keys`` has ``P + n_decode`` rows, ``queries`` has
``n_decode + 1`` rows and ``query_positions == arange(P - 1, P + n_decode)``; the query at
position ``p`` attends to ``keys[: p + 1]``.

The prefill and every decode step ask the model for the last position's logits only
(:func:`.models.last_logits_kwargs`): the full ``[prompt, vocab]`` logits of a long prompt
on a large-vocabulary model would take gigabytes for one row of use.

CLI: ``python -m pariskv_tools.workloads.capture --out FILE [--model PATH] [options]``
(run by :func:`.capture_cli.main`; ``--help`` lists the options with their defaults).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .capture_hook import Recorder, capture_attention, recording
from .models import head_dim, last_logits_kwargs

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FORMAT_VERSION = 1


@dataclass
class Capture:
    """Attention inputs/outputs of one prompt + greedy decode, per layer.

    Shapes (N = prompt_len + n_decode, S = n_decode + 1):
    ``keys[l]``/``values[l]``: [N, Hkv, D]; ``queries[l]``/``outputs[l]``: [S, Hq, D];
    ``query_positions``: [S]; ``token_ids``: [N].
    """

    keys: list[Tensor]
    values: list[Tensor]
    queries: list[Tensor]
    query_positions: Tensor
    prompt_len: int
    token_ids: Tensor
    text: str
    outputs: list[Tensor] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    @property
    def n_decode(self) -> int:
        return int(self.token_ids.numel()) - self.prompt_len

    def save(self, path: str | Path) -> None:
        """Write with ``torch.save``; a plain dict of tensors so it loads without this class."""
        torch.save(
            {
                "format_version": FORMAT_VERSION,
                "keys": self.keys,
                "values": self.values,
                "queries": self.queries,
                "outputs": self.outputs,
                "query_positions": self.query_positions,
                "prompt_len": self.prompt_len,
                "token_ids": self.token_ids,
                "text": self.text,
                "meta": self.meta,
            },
            Path(path),
        )

    @classmethod
    def load(cls, path: str | Path) -> Capture:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path} has capture format {version!r}, this code reads {FORMAT_VERSION}; "
                "re-run `python -m pariskv_tools.workloads.capture` to regenerate it."
            )
        return cls(
            keys=data["keys"],
            values=data["values"],
            queries=data["queries"],
            outputs=data["outputs"],
            query_positions=data["query_positions"],
            prompt_len=int(data["prompt_len"]),
            token_ids=data["token_ids"],
            text=data["text"],
            meta=data["meta"],
        )


def _preallocated_cache(n_layers: int, capacity: int) -> Any:
    """A cache that behaves like ``DynamicCache`` but never reallocates.

    Why: ``DynamicCache`` re-concatenates every layer's keys and values at each decode step
    (O(N) copy per step; at 8K tokens two thirds of the step time on CPU), and
    ``StaticCache`` hands attention the whole padded buffer plus an explicit mask, which
    pushes CPU sdpa onto a slower path. Returning growing views of one preallocated buffer
    keeps the exact inputs sdpa would see with ``DynamicCache`` at none of the copy cost.
    """
    from transformers.cache_utils import Cache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            b, h, _, _ = key_states.shape
            kw = {"dtype": key_states.dtype, "device": key_states.device}
            self._k = torch.empty(b, h, capacity, key_states.shape[-1], **kw)
            self._v = torch.empty(b, h, capacity, value_states.shape[-1], **kw)
            self._len = 0

        def update(
            self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
        ) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, end = self._len, self._len + key_states.shape[-2]
            if end > capacity:
                raise RuntimeError(f"capture cache overflow: {end} > capacity {capacity}")
            self._k[:, :, start:end] = key_states
            self._v[:, :, start:end] = value_states
            self._len = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
            return self.keys, self.values

    return Cache(layers=[PreallocatedLayer() for _ in range(n_layers)])


def _eos_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return {i for i in ids if i is not None}


def answer_text(tokenizer: PreTrainedTokenizerBase, generated: Tensor) -> str:
    """Decode generated ids up to (not including) the first end-of-turn token."""
    ids = generated.tolist()
    stops = _eos_ids(tokenizer)
    for i, tok in enumerate(ids):
        if tok in stops:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


@torch.no_grad()
def capture(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Tensor,
    n_decode: int,
    progress: bool = True,
    store_dtype: torch.dtype = torch.float32,
) -> Capture:
    """Prefill ``prompt_ids`` then greedily generate ``n_decode`` tokens, recording attention.

    Generation does not stop at end-of-turn: a fixed ``n_decode`` keeps trace shapes
    predictable (``text`` is cut at the first end-of-turn token; ``token_ids`` is not).
    ``store_dtype=torch.float16`` halves memory for long captures.
    """
    ids = prompt_ids.reshape(-1).to(torch.long)
    if ids.numel() < 1 or n_decode < 1:
        raise ValueError(
            f"need a non-empty prompt and n_decode >= 1, got {ids.numel()}, {n_decode}"
        )
    cfg = model.config
    prompt_len = int(ids.numel())
    n_total = prompt_len + n_decode
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and n_total > limit:
        raise ValueError(
            f"prompt ({prompt_len}) + n_decode ({n_decode}) = {n_total} tokens exceeds the "
            f"model's max_position_embeddings ({limit}); shorten the prompt or n_decode."
        )
    n_steps = n_decode + 1
    rec = Recorder(
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        cfg.num_attention_heads,
        head_dim(cfg),
        n_total,
        n_steps,
        store_dtype,
    )
    device = model.device
    last_only = last_logits_kwargs(model)
    cache = _preallocated_cache(cfg.num_hidden_layers, n_total)
    token_ids = torch.empty(n_total, dtype=torch.long)
    token_ids[:prompt_len] = ids

    t0 = time.monotonic()
    with recording(rec), capture_attention(model):
        rec.kv_start, rec.kv_end, rec.q_row = 0, prompt_len, 0
        out = model(
            input_ids=ids[None].to(device),
            past_key_values=cache,
            use_cache=True,
            **last_only,
        )
        prefill_s = time.monotonic() - t0
        bar = _progress(n_decode, progress)
        for step in range(n_decode):
            pos = prompt_len + step
            nxt = int(out.logits[0, -1].argmax())
            token_ids[pos] = nxt
            rec.kv_start, rec.kv_end, rec.q_row = pos, pos + 1, step + 1
            out = model(
                input_ids=torch.tensor([[nxt]], device=device),
                position_ids=torch.tensor([[pos]], device=device),
                past_key_values=cache,
                use_cache=True,
                **last_only,
            )
            bar.update(1)
        bar.close()

    if any(n != n_steps for n in rec.seen):
        raise RuntimeError(
            f"capture attention ran {rec.seen} times per layer, expected {n_steps}: the model "
            "does not route attention through transformers' AttentionInterface."
        )
    total_s = time.monotonic() - t0
    return Capture(
        keys=rec.keys,
        values=rec.values,
        queries=rec.queries,
        outputs=rec.outputs,
        query_positions=torch.arange(prompt_len - 1, n_total),
        prompt_len=prompt_len,
        token_ids=token_ids,
        text=answer_text(tokenizer, token_ids[prompt_len:]),
        meta={
            "model": getattr(cfg, "name_or_path", ""),
            "store_dtype": str(store_dtype),
            "prefill_s": prefill_s,
            "total_s": total_s,
        },
    )


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="decode", unit="tok", file=sys.stderr)


if __name__ == "__main__":
    from pariskv_tools.workloads.capture_cli import main

    main()
