"""Which model the tools run: SmolLM2 by default, or the one ``--model PATH`` names.

ParisKV is meant to be checked on the model that will be served, so every tool that runs a
model (the retrieval evaluation, the capture CLI, the demo) takes ``--model PATH``:

* a Hugging Face directory (``config.json``, weights, tokenizer) of a Llama, Qwen2 or
  Mistral-family causal LM, loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer`` from
  local files only (no network);
* a ``.gguf`` file, dequantised once into a float32 Hugging Face directory in the cache root
  (the same conversion SmolLM2's GGUF goes through, see :mod:`.smollm2`); note that the
  float32 copy takes 4 bytes per parameter on disk and in memory;
* nothing: SmolLM2-135M-Instruct, fetched and converted on first use.

Why only those families: the capture hooks transformers' attention interface and the
evaluation reads ``num_hidden_layers`` / ``num_attention_heads`` / ``num_key_value_heads`` /
``head_dim`` from the config; these families are the decoder-only RoPE models with plain GQA
attention whose configs and attention modules follow that layout. Anything else is refused
with a one-line message naming ``--model`` rather than failing deep inside a capture.

:func:`resolve_model` validates the path and reads the config only (cheap: enough to size
the contexts and describe the model); :meth:`ModelSource.load` loads the weights once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

#: ``config.model_type`` values accepted by ``--model``.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
FLAG = "--model"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def head_dim(config: Any) -> int:
    """Per-head width: ``config.head_dim`` when the config sets it, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def last_logits_kwargs(model: Any) -> dict[str, int]:
    """The forward kwarg that keeps only the last position's logits.

    Why: a prefill otherwise materialises ``[prompt, vocab]`` float logits (10 GB for a
    150K vocabulary at 16K tokens) of which only the last row is used. transformers calls
    it ``logits_to_keep`` (>= 4.50) and ``num_logits_to_keep`` before that.
    """
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    raise RuntimeError(
        f"{type(model).__name__}.forward takes neither logits_to_keep nor num_logits_to_keep; "
        "the installed transformers is too old for the tools (see pyproject.toml)."
    )


def eos_ids(model: Any) -> set[int]:
    """The model's end-of-sequence token ids (its generation config may list several)."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


@torch.inference_mode()
def greedy_continue(model: Any, past: Any, first: int, steps: int, eos: set[int]) -> list[int]:
    """Greedy tokens after ``first`` (already chosen by a prefill), decoded from the KV cache
    ``past``: at most ``steps`` tokens, ``first`` included, stopping at an id in ``eos``
    (end-of-sequence ids are left out of the result)."""
    out_ids, tok = [first], first
    for _ in range(steps - 1):
        if tok in eos:
            break
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        tok = int(out.logits[0, -1].argmax())
        out_ids.append(tok)
    return [t for t in out_ids if t not in eos]


@torch.inference_mode()
def forced_agreement(model: Any, past: Any, reference: list[int]) -> tuple[float, float]:
    """Teacher-force ``reference`` (an answer whose first token came from the prefill that
    filled ``past``) and return (the fraction of its later tokens that are the model's
    argmax, their mean log-probability). Greedy answers part at the first differing token;
    these keep comparing after it, so methods whose answers are all wrong, or all right,
    can still be told apart. A one-token reference has nothing to compare: (1.0, 0.0)."""
    hits, logp = [], []
    for tok, nxt in zip(reference, reference[1:]):
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        lp = out.logits[0, -1].double().log_softmax(-1)
        hits.append(int(lp.argmax()) == nxt)
        logp.append(float(lp[nxt]))
    if not hits:
        return 1.0, 0.0
    return sum(hits) / len(hits), sum(logp) / len(logp)


def _check_model_type(model_type: object, path: Path) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SystemExit(
            f"{FLAG} {path}: model_type {model_type!r} is not supported; {FLAG} takes a "
            f"Llama, Qwen2 or Mistral-family causal LM (model_type one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)})"
        )


@dataclass
class ModelSource:
    """A resolved model: the Hugging Face directory to load and where it came from.

    ``origin`` is what the user named (``--model``'s path; for the default, its converted
    directory); ``kind`` is ``"hf"``, ``"gguf"`` or ``"default"``; ``config`` is the loaded
    ``PretrainedConfig``.
    """

    hf_dir: Path
    origin: str
    kind: str
    config: PretrainedConfig
    _loaded: tuple[Any, Any] | None = field(default=None, repr=False)

    @property
    def max_positions(self) -> int:
        return int(self.config.max_position_embeddings)

    @property
    def cache_name(self) -> str:
        """Sub-directory of the capture cache for this model's traces.

        Empty for the default model, whose captures sit directly in the capture cache; any
        other model gets its own directory keyed by its name and a digest of its config and
        weight files, so traces of different models never mix.
        """
        if self.kind == "default":
            return ""
        digest = hashlib.sha256(str(self.hf_dir.resolve()).encode())
        digest.update((self.hf_dir / "config.json").read_bytes())
        for p in sorted(self.hf_dir.glob("*.safetensors")) + sorted(self.hf_dir.glob("*.bin")):
            st = p.stat()
            digest.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return f"{self.hf_dir.name}-{digest.hexdigest()[:12]}"

    def describe(self) -> dict[str, Any]:
        """The model as the result JSON records it: path, architecture and attention shape."""
        cfg = self.config
        archs = getattr(cfg, "architectures", None) or [cfg.model_type]
        out = {
            "name": DEFAULT_NAME if self.kind == "default" else Path(self.origin).name,
            "path": self.origin,
            "format": self.kind,
            "architecture": archs[0],
            "model_type": cfg.model_type,
            "layers": cfg.num_hidden_layers,
            "q_heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "head_dim": head_dim(cfg),
            "max_position_embeddings": self.max_positions,
        }
        if str(self.hf_dir) != self.origin:
            out["loaded_from"] = str(self.hf_dir)
        return out

    def load(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The model (eval mode, ``sdpa`` attention) and tokenizer, loaded on first call."""
        if self._loaded is None:
            if self.kind == "default":
                from .smollm2 import load_smollm2

                self._loaded = load_smollm2(
                    device=device, dtype=dtype, cache_dir=self.hf_dir.parent
                )
            else:
                self._loaded = _load_hf_dir(self.hf_dir, device, dtype)
        return self._loaded


def _load_hf_dir(
    hf_dir: Path, device: str | torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=dtype, attn_implementation="sdpa", local_files_only=True
    )
    model.to(device)
    model.eval()
    return model, tokenizer


def _hf_config(hf_dir: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(hf_dir, local_files_only=True)


def resolve_model(
    path: Path | None,
    cache_dir: Path | None = None,
    smollm2_gguf: Path | None = None,
) -> ModelSource:
    """Validate ``--model`` and read its config (converting a GGUF on first use).

    ``path`` None selects SmolLM2, with ``cache_dir`` / ``smollm2_gguf`` as in
    :func:`.smollm2.ensure_smollm2`; ``cache_dir`` is also where a GGUF is converted to.
    Raises SystemExit with a one-line message for a path that is neither a Hugging Face
    directory with a ``config.json`` nor a ``.gguf`` file, or for an unsupported
    ``model_type``.
    """
    if path is None:
        from .smollm2 import ensure_smollm2

        hf_dir = ensure_smollm2(cache_dir, smollm2_gguf)
        return ModelSource(hf_dir, str(hf_dir), "default", _hf_config(hf_dir))
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        raw = json.loads((path / "config.json").read_text())
        _check_model_type(raw.get("model_type"), path)
        return ModelSource(path, str(path), "hf", _hf_config(path))
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .smollm2 import ensure_gguf, gguf_config

        _check_model_type(gguf_config(path).model_type, path)
        hf_dir = ensure_gguf(path, cache_dir)
        return ModelSource(hf_dir, str(path), "gguf", _hf_config(hf_dir))
    raise SystemExit(
        f"{FLAG} {path}: not a Hugging Face model directory with a config.json, nor a .gguf file"
    )
