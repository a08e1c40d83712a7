"""``--model`` refuses what the tools cannot run, in one line naming the flag."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pariskv_tools.eval import __main__ as eval_cli
from pariskv_tools.workloads import capture_cli, models, smollm2


def _refusal(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value.code)
    assert "\n" not in msg and msg.startswith("--model ")
    return msg


def _not_a_model(tmp_path: Path) -> list[Path]:
    empty = tmp_path / "empty"
    empty.mkdir()
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0")
    return [tmp_path / "missing", empty, weights]


def test_path_that_is_no_model_is_refused(tmp_path):
    for path in _not_a_model(tmp_path):
        with pytest.raises(SystemExit) as excinfo:
            models.resolve_model(path)
        msg = _refusal(excinfo)
        assert str(path) in msg and "config.json" in msg and ".gguf" in msg


@pytest.mark.parametrize("model_type", ["gpt2", "qwen3_moe", None])
def test_unsupported_architecture_is_refused(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(SystemExit) as excinfo:
        models.resolve_model(tmp_path)
    msg = _refusal(excinfo)
    assert repr(model_type) in msg and "Llama, Qwen2 or Mistral" in msg


def test_unsupported_gguf_is_refused_before_conversion(tmp_path, monkeypatch):
    gguf = tmp_path / "phi.gguf"
    gguf.write_bytes(b"GGUF")
    converted = []
    monkeypatch.setattr(smollm2, "gguf_config", lambda p: SimpleNamespace(model_type="phi3"))
    monkeypatch.setattr(smollm2, "ensure_gguf", lambda *a: converted.append(a))
    with pytest.raises(SystemExit) as excinfo:
        models.resolve_model(gguf)
    assert "'phi3'" in _refusal(excinfo) and not converted


def test_command_lines_refuse_with_the_message(tmp_path):
    bad = tmp_path / "missing"
    for main, argv in (
        (eval_cli.main, ["retrieval", "--model", str(bad), "--out", str(tmp_path / "o.json")]),
        (capture_cli.main, ["--model", str(bad), "--out", str(tmp_path / "c.pt")]),
    ):
        with pytest.raises(SystemExit) as excinfo:
            main(argv)
        assert "not a Hugging Face model directory" in _refusal(excinfo)
    assert not list(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.slow
def test_gguf_model_is_converted_and_described(tmp_path):
    """A .gguf given to --model goes through the GGUF conversion (SmolLM2's, when cached)."""
    gguf = smollm2.cache_root() / smollm2.GGUF_NAME
    if not gguf.is_file():
        pytest.skip(f"{gguf} not cached")
    source = models.resolve_model(gguf, cache_dir=tmp_path)
    assert source.kind == "gguf" and source.hf_dir.parent == tmp_path
    desc = source.describe()
    assert (desc["layers"], desc["q_heads"], desc["kv_heads"], desc["head_dim"]) == (30, 9, 3, 64)
    assert desc["path"] == str(gguf) and desc["model_type"] == "llama"
    model, tok = source.load()
    assert tok.eos_token == smollm2.IM_END
    assert "Paris" in smollm2.check_smollm2(model, tok)
