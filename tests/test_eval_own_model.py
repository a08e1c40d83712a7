"""``--model PATH``: the capture and the retrieval evaluation run on a model of the user's.

Tiny random Llama and Qwen2 checkpoints (``tiny_models``) are saved as Hugging Face
directories and driven through the real command lines. The expectations come from the
shapes the checkpoints were built with, not from the code under test; the layer-0 values are
recomputed from the checkpoint's own weights.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from tiny_models import MAX_POSITIONS, SHAPES, save_tiny_model
from transformers import AutoConfig

from pariskv_tools import demo
from pariskv_tools.cli import parse_layers
from pariskv_tools.eval import __main__ as eval_cli
from pariskv_tools.eval.captures import (
    DEFAULT_CONTEXTS,
    default_contexts,
    parse_contexts,
)
from pariskv_tools.eval.methods import default_methods
from pariskv_tools.workloads import capture_cli, models, task_generators, tasks
from pariskv_tools.workloads.capture import Capture

ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def tiny(request, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    return family, save_tiny_model(tmp_path_factory.mktemp(family) / f"tiny-{family}", family)


class ForwardSpy:
    """Records (input length, forward kwargs, logits rows returned) of every model call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[dict] = []
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self.calls.append({"len": kwargs["input_ids"].shape[1], "kwargs": dict(kwargs)})

    def _post(self, module, args, kwargs, output):
        self.calls[-1]["logit_rows"] = output.logits.shape[1]


@pytest.fixture
def spied_loads(monkeypatch) -> list[ForwardSpy]:
    """Every model loaded from a Hugging Face directory gets a :class:`ForwardSpy`."""
    spies: list[ForwardSpy] = []
    real = models._load_hf_dir

    def load(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        spies.append(ForwardSpy(model))
        return model, tok

    monkeypatch.setattr(models, "_load_hf_dir", load)
    return spies


def _assert_prefill_keeps_last_logits(spy: ForwardSpy, prompt_len: int) -> None:
    prefill = spy.calls[0]
    assert prefill["len"] == prompt_len
    assert prefill["kwargs"].get("logits_to_keep") == 1
    assert all(c["logit_rows"] == 1 for c in spy.calls)


def test_retrieval_eval_on_own_model(tiny, tmp_path, spied_loads):
    family, path = tiny
    shape = SHAPES[family]
    out = tmp_path / "rq.json"
    eval_cli.main(
        [
            "retrieval",
            "--model",
            str(path),
            "--contexts",
            "300,400:variable_tracking",
            "--n-decode",
            "6",
            "--sweep",
            "0.1,0.2",
            "--sweep-stride",
            "2",
            "--chunk",
            "8",
            "--cache-root",
            str(tmp_path / "cache"),
            "--out",
            str(out),
            "--no-plots",
        ]
    )
    doc = json.loads(out.read_text())
    assert doc["model"] == {
        "name": path.name,
        "path": str(path),
        "format": "hf",
        "architecture": ARCH[family],
        "model_type": family,
        "layers": shape["layers"],
        "q_heads": shape["q_heads"],
        "kv_heads": shape["kv_heads"],
        "head_dim": shape["head_dim"],
        "max_position_embeddings": MAX_POSITIONS,
    }
    assert doc["subsampling"]["layers_evaluated"] == list(range(shape["layers"]))
    methods = {n for m in default_methods() for n in m.names}
    assert methods <= set(doc["summary"])
    for name in methods:
        r = doc["summary"][name]["recall_at_100"]
        assert math.isfinite(r) and 0.0 <= r <= 1.0
        assert set(doc["summary"][name]["by_context"]) == {"300", "400:variable_tracking"}
    assert doc["summary"]["exact_topk"]["recall_at_100"] == 1.0
    ctx = doc["contexts"]
    assert ctx["400:variable_tracking"]["task"] == "variable_tracking"
    assert abs(ctx["300"]["prompt_len"] - 300) <= 8 and ctx["300"]["n_decode"] == 6

    # One model load for both contexts; each capture's prefill asked for the last logits.
    (spy,) = spied_loads
    prefills = [c for c in spy.calls if c["len"] > 1]
    assert [c["len"] for c in prefills] == [
        ctx["300"]["prompt_len"],
        ctx["400:variable_tracking"]["prompt_len"],
    ]
    assert all(c["kwargs"].get("logits_to_keep") == 1 for c in prefills)
    assert all(c["logit_rows"] == 1 for c in spy.calls)

    # The traces are cached per model, and shaped like the model.
    cached = sorted((tmp_path / "cache" / "captures").glob("*/*.pt"))
    assert len(cached) == 2 and cached[0].parent.name.startswith(path.name)
    cap = Capture.load(cached[0])
    assert cap.meta["model"] == doc["model"]
    assert cap.n_layers == shape["layers"]
    n = cap.prompt_len + 6
    for k, v, q in zip(cap.keys, cap.values, cap.queries):
        assert k.shape == v.shape == (n, shape["kv_heads"], shape["head_dim"])
        assert q.shape == (7, shape["q_heads"], shape["head_dim"])


@torch.no_grad()
def test_capture_cli_on_own_model(tiny, tmp_path, spied_loads):
    """The capture CLI's trace: shapes from the model, layer-0 values recomputed by hand."""
    from transformers import AutoModelForCausalLM

    family, path = tiny
    shape = SHAPES[family]
    out = tmp_path / "cap.pt"
    capture_cli.main(
        ["--model", str(path), "--context", "250", "--n-decode", "4", "--out", str(out)]
    )
    cap = Capture.load(out)
    assert cap.meta["model"]["layers"] == shape["layers"]
    assert cap.n_layers == shape["layers"] and cap.n_decode == 4
    assert cap.keys[0].shape == (cap.prompt_len + 4, shape["kv_heads"], shape["head_dim"])
    assert cap.queries[-1].shape == (5, shape["q_heads"], shape["head_dim"])
    _assert_prefill_keeps_last_logits(spied_loads[0], cap.prompt_len)

    model = AutoModelForCausalLM.from_pretrained(path)
    layer = model.model.layers[0]
    x = model.model.embed_tokens(cap.token_ids)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    v = layer.self_attn.v_proj(x * layer.input_layernorm.weight)
    want = v.view(-1, shape["kv_heads"], shape["head_dim"])
    torch.testing.assert_close(cap.values[0], want, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_demo_prefill_keeps_last_logits(tiny):
    _, path = tiny
    model, tok = models.resolve_model(path).load()
    spy = ForwardSpy(model)
    task = task_generators.passkey(tok, 200, seed=0)
    prompt = tasks.format_chat(tok, task)
    demo.greedy(model, prompt, 3, "dense")
    _assert_prefill_keeps_last_logits(spy, len(prompt))


def test_default_contexts_follow_max_positions():
    # SmolLM2 (8192 positions, 1024 decode steps): today's 2K / 4K / 8K prompts.
    assert default_contexts(8192) == DEFAULT_CONTEXTS
    assert [c.prompt_tokens(1024, 8192) for c in DEFAULT_CONTEXTS] == [2048, 4096, 7104]
    assert default_contexts(131072) == DEFAULT_CONTEXTS
    small = default_contexts(1024)
    assert [(c.label, c.task, c.tokens) for c in small] == [
        ("256", "passkey", 256),
        ("512", "multikey", 512),
        ("1k", "variable_tracking", 1024),
    ]
    assert [c.prompt_tokens(8, 1024) for c in small] == [256, 512, 1024 - 8 - 64]


def test_parse_contexts():
    got = parse_contexts("2k,300,8k,500:passkey")
    assert [(c.label, c.task, c.tokens) for c in got] == [
        ("2k", "passkey", 2048),
        ("300", "multikey", 300),
        ("8k", "variable_tracking", 8192),
        ("500:passkey", "passkey", 500),
    ]
    for bad in ("two", "300:nosuchtask", ","):
        with pytest.raises(SystemExit, match="--contexts"):
            parse_contexts(bad)


def test_layers_follow_the_model():
    assert parse_layers("::2", 5) == [0, 2, 4]
    assert parse_layers("all", 5) is None
    with pytest.raises(SystemExit, match="--layers: \\[7\\] outside the model's 2 layers"):
        parse_layers("0,7", 2)


def test_demo_runs_on_own_model(tiny, capsys):
    family, path = tiny
    argv = ["--model", str(path), "--context", "5000", "--max-new", "3", "--threads", "1"]
    assert demo.main([*argv, "--topk", "16", "--sink", "8", "--local", "16"]) == 0
    out = capsys.readouterr().out
    # --context is clipped to the model's positions minus the decode and the margin (the
    # generator lands within a few tokens of its target).
    prompt_len = int(re.search(r"prompt: (\d+) tokens", out).group(1))
    assert abs(prompt_len - (MAX_POSITIONS - 3 - 64)) <= 8
    last = SHAPES[family]["layers"] - 1
    assert f"late {2 * ((last + 1) // 3)}-{last} " in out and "\nall " in out
    # A context that sink + local + top-k covers has no sparse step: said, not a crash.
    assert demo.main([*argv, "--context", "200"]) == 0
    assert "no sparse step" in capsys.readouterr().out


def test_demo_takes_a_calibration_of_the_model_and_refuses_another(tiny, capsys, tmp_path):
    from pariskv_tools.workloads.models import head_dim
    from sglang_pariskv.calibration import save_calibration

    family, path = tiny
    cfg = AutoConfig.from_pretrained(path)
    layers, hkv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim(cfg)
    gen = torch.Generator().manual_seed(0)
    good, other = tmp_path / "cal.json", tmp_path / "other.json"
    save_calibration(good, torch.randn(layers, hkv, d, generator=gen), [],
                     scales=torch.rand(layers, hkv, d, generator=gen) + 0.5)  # fmt: skip
    save_calibration(other, torch.zeros(layers, hkv + 1, d), [])
    argv = ["--model", str(path), "--context", "600", "--max-new", "2", "--threads", "1",
            "--topk", "16", "--sink", "8", "--local", "16"]  # fmt: skip
    assert demo.main([*argv, "--calibration", str(good)]) == 0
    assert f"calibration: {good}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=f"^--calibration {other} has {hkv + 1} KV heads"):
        demo.main([*argv, "--calibration", str(other)])


def test_retrieval_eval_refuses_a_calibration_of_another_model_before_capturing(tiny, tmp_path):
    from sglang_pariskv.calibration import save_calibration

    family, path = tiny
    cfg = AutoConfig.from_pretrained(path)
    other = tmp_path / "other.json"
    save_calibration(other, torch.zeros(cfg.num_hidden_layers + 2, 1, 16), [])
    cache = tmp_path / "cache"
    argv = ["retrieval", "--model", str(path), "--contexts", "300", "--n-decode", "4",
            "--cache-root", str(cache), "--out", str(tmp_path / "rq.json"),
            "--calibration", str(other)]  # fmt: skip
    with pytest.raises(SystemExit, match=f"^--calibration {other} was written for"):
        eval_cli.main(argv)
    assert not list(cache.rglob("*.pt"))  # refused before any capture


def test_reuse_eval_on_own_model(tiny, tmp_path):
    """``reuse`` writes both rules per context and their means, each rule's drop measured
    against the same every-step figures."""
    family, path = tiny
    out = tmp_path / "reuse.json"
    cache = str(tmp_path / "cache")
    argv = ["reuse", "--model", str(path), "--n-decode", "6", "--intervals", "2",
            "--lags", "1,3", "--candidate-ratio", "0.3", "--cache-root", cache,
            "--out", str(out)]  # fmt: skip
    eval_cli.main(argv)
    doc = json.loads(out.read_text())
    labels = [c.label for c in default_contexts(MAX_POSITIONS)]
    assert list(doc["contexts"]) == labels and doc["candidate_ratio"] == 0.3
    metrics = ("recall_at_100", "mass_recall")
    for c in doc["contexts"].values():
        assert set(c["intervals"]) == {"1", "2"} and set(c["lagged_candidates"]) == {"1", "3"}
        assert c["n_decode"] == 6
    for m in metrics:
        every = sum(c["intervals"]["1"][m] for c in doc["contexts"].values()) / len(labels)
        assert doc["every_step"][m] == pytest.approx(every)
        for rule, key in (("summary", "intervals"), ("lagged_summary", "lagged_candidates")):
            for k, row in doc[rule].items():
                mean = sum(c[key][k][m] for c in doc["contexts"].values()) / len(labels)
                assert row[m] == pytest.approx(mean)
                assert row[f"{m}_drop"] == pytest.approx(every - mean)
                assert 0.0 <= row[m] <= 1.0
    assert (
        list(doc["summary"]) == ["2"] and doc["summary"]["2"]["fraction_of_steps_retrieving"] == 0.5
    )
    assert list(doc["lagged_summary"]) == ["1", "3"]
