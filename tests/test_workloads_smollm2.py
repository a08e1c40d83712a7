"""SmolLM2 fetch/convert: cache logic (offline, faked) and the real model (~93 MB download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pariskv_tools.workloads import smollm2


@pytest.fixture(scope="session")
def model_and_tokenizer():
    return smollm2.load_smollm2()


@pytest.mark.slow
def test_architecture_facts(model_and_tokenizer):
    model, _ = model_and_tokenizer
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 30
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg.head_dim == 64
    assert cfg.max_position_embeddings == 8192
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_tokenizer_chat_tokens(model_and_tokenizer):
    _, tok = model_and_tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token_id == 2
    assert tok.chat_template
    # No BOS is prepended: SmolLM2's chat template supplies <|im_start|> itself.
    assert tok("Hello world").input_ids[0] != tok.convert_tokens_to_ids("<|im_start|>")


@pytest.mark.slow
def test_paris(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert "Paris" in smollm2.check_smollm2(model, tok)


@pytest.mark.slow
def test_check_rejects_wrong_architecture(model_and_tokenizer):
    model, _ = model_and_tokenizer
    bad = type("Cfg", (), {**{k: getattr(model.config, k) for k in smollm2.EXPECTED_ARCH}})()
    bad.num_key_value_heads = 9
    with pytest.raises(RuntimeError, match="num_key_value_heads=9"):
        smollm2.check_architecture(bad)


@pytest.mark.slow
def test_ensure_is_cached(model_and_tokenizer):
    hf_dir = smollm2.ensure_smollm2()
    assert (hf_dir / smollm2.MARKER_NAME).is_file()
    assert (hf_dir / "model.safetensors").is_file()


# ---- cache logic with the download and conversion faked out (no network, fast)


def _fake_pipeline(monkeypatch, calls: list[str]) -> None:
    def fake_download(root: Path, gguf: Path | None = None) -> Path:
        calls.append("download")
        return root / "fake.gguf"

    def fake_convert(gguf: Path, out: Path) -> None:
        calls.append("convert")
        (out / "config.json").write_text("{}")
        (out / smollm2.MARKER_NAME).write_text(smollm2.CONVERSION_VERSION + "\n")

    monkeypatch.setattr(smollm2, "_download_gguf", fake_download)
    monkeypatch.setattr(smollm2, "_convert", fake_convert)


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "envcache"))
    assert smollm2.cache_root() == tmp_path / "envcache"
    assert smollm2.cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_incomplete_conversion_is_redone(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_pipeline(monkeypatch, calls)
    stale = tmp_path / smollm2.HF_DIR_NAME
    stale.mkdir()
    (stale / "half-written.safetensors").write_text("x")  # interrupted run: no marker

    out = smollm2.ensure_smollm2(tmp_path)
    assert out == stale
    assert calls == ["download", "convert"]
    assert not (out / "half-written.safetensors").exists()
    assert (out / smollm2.MARKER_NAME).is_file()
    assert not list(tmp_path.glob(f"{smollm2.HF_DIR_NAME}.tmp-*"))

    smollm2.ensure_smollm2(tmp_path)  # complete now: nothing redone
    assert calls == ["download", "convert"]


def test_failed_conversion_leaves_no_directory(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_pipeline(monkeypatch, calls)

    def boom(gguf: Path, out: Path) -> None:
        (out / "partial").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert", boom)
    with pytest.raises(KeyboardInterrupt):
        smollm2.ensure_smollm2(tmp_path)
    assert not (tmp_path / smollm2.HF_DIR_NAME).exists()
    assert not list(tmp_path.glob(f"{smollm2.HF_DIR_NAME}.tmp-*"))


def test_old_conversion_version_is_redone(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_pipeline(monkeypatch, calls)
    old = tmp_path / smollm2.HF_DIR_NAME
    old.mkdir()
    (old / smollm2.MARKER_NAME).write_text("0\n")
    smollm2.ensure_smollm2(tmp_path)
    assert calls == ["download", "convert"]


def test_missing_gguf_override_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2.GGUF_ENV, str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match=smollm2.GGUF_ENV):
        smollm2._download_gguf(tmp_path)


def test_gguf_argument_wins_over_env(tmp_path, monkeypatch):
    local = tmp_path / "local.gguf"
    local.write_bytes(b"GGUF")
    monkeypatch.setenv(smollm2.GGUF_ENV, str(tmp_path / "nope.gguf"))
    assert smollm2._download_gguf(tmp_path, local) == local
    with pytest.raises(FileNotFoundError, match="--smollm2-gguf"):
        smollm2._download_gguf(tmp_path, tmp_path / "missing.gguf")
