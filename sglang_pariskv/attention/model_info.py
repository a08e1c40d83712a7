"""What the ParisKV backend reads from SGLang's model runner: heads per rank, TP rank and
the attention's softmax scale. Each is checked once, at backend construction, so a model
ParisKV cannot serve is refused before CUDA graphs are captured."""

from __future__ import annotations

from sglang_pariskv.config import ParisKVConfigError


def attention_layers(model_runner) -> list:
    """The model's ``RadixAttention`` modules (SGLang's attention layer)."""
    model = getattr(model_runner, "model", None)
    modules = model.modules() if model is not None else ()
    return [m for m in modules if type(m).__name__ == "RadixAttention"]


def query_heads_per_rank(model_runner, layers: list | None = None) -> int:
    """Query heads this rank attends with, as the model's attention layers were built.

    The layers' ``tp_q_head_num`` is what the query tensor is shaped by. ``ModelRunner``
    has no ``tp_size`` attribute (the parallel state is in ``get_parallel()``), so a
    default of 1 would give every TP rank the full head count."""
    layers = attention_layers(model_runner) if layers is None else layers
    heads = {int(m.tp_q_head_num) for m in layers}
    if len(heads) > 1:
        raise ParisKVConfigError(
            f"attention layers with different query head counts {sorted(heads)}: ParisKV "
            "needs one shape for all layers; serve this model without --enable-pariskv"
        )
    if heads:
        return heads.pop()
    from sglang.srt.runtime_context import get_parallel

    return model_runner.model_config.get_num_attention_heads(get_parallel().attn_tp_size)


def tp_rank(model_runner) -> int:
    """This process's tensor-parallel rank (0 without TP)."""
    ps = getattr(model_runner, "ps", None)
    if ps is not None and getattr(ps, "tp_rank", None) is not None:
        return int(ps.tp_rank)
    from sglang.srt.runtime_context import get_parallel

    return int(get_parallel().tp_rank)


def attention_scale(layers: list, model_name: str = "this model") -> tuple[float, float]:
    """(softmax scale, logit soft cap) shared by every attention layer.

    FlashInfer plans them per batch and a captured CUDA graph bakes them in, so all layers
    must agree; and they must be known before the first capture, so a model whose
    attention layers cannot be found is refused rather than served with a guessed scale."""
    if not layers:
        raise ParisKVConfigError(
            f"{model_name}: no RadixAttention layer found in the loaded model, so ParisKV "
            "cannot read its softmax scale; serve this model without --enable-pariskv"
        )
    scales = {(float(m.scaling), float(m.logit_cap or 0.0)) for m in layers}
    if len(scales) > 1:
        raise ParisKVConfigError(
            f"{model_name}: attention layers use different softmax scales / soft caps "
            f"{sorted(scales)}; ParisKV needs one for all layers: serve this model without "
            "--enable-pariskv"
        )
    return scales.pop()
