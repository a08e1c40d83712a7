"""bench_million_tokens on the CPU: the model config, the host-pool size, the prefill
estimates against brute-force counts, and a whole run against an in-process server that
streams like SGLang's ``/v1/completions`` with known delays."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_million_tokens as bench  # noqa: E402
import offload_cases  # noqa: E402
import step_floor  # noqa: E402

from tests.test_bench_mixed_traffic import DELAYS, LONG_AT, _fake_server
from tests.test_prefill_log import server_log


def _model_dir(tmp_path, cfg: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_model_config_is_the_qwen_1m_shape_to_transformers(tmp_path):
    from transformers import AutoConfig

    d = _model_dir(tmp_path, bench.model_config(1_000_128))
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.model_type == "qwen2" and cfg.max_position_embeddings == 1_000_128
    assert cfg.hidden_size // cfg.num_attention_heads == 128
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (28, 4)
    assert step_floor.kv_bytes_per_token(bench.model_config_of(d)) == (
        offload_cases.KV_BYTES_PER_TOKEN
    )
    assert bench.model_config_of(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("tokens", [1, 20_000, 1_000_128])
def test_host_pool_holds_the_tokens_and_not_much_more(tmp_path, tokens):
    cfg = bench.model_config_of(_model_dir(tmp_path, bench.model_config(tokens)))
    gb = bench.host_pool_gb(cfg, tokens)

    def holds(g: float) -> int:  # tokens a pool of g GiB holds, as pool_sizing counts them
        return int(g * 2**30) // offload_cases.KV_BYTES_PER_TOKEN

    assert gb * 2 == int(gb * 2)  # half GiB steps
    assert holds(gb) >= tokens + bench.POOL_SLACK_TOKENS > holds(gb - 0.5)


def _tiny_cfg() -> dict:
    return bench.model_config(256) | {
        "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 64,
    }  # fmt: skip


@pytest.mark.parametrize("n,chunk", [(1, 4), (10, 4), (12, 4), (37, 8), (64, 64)])
def test_prefill_estimates_match_brute_force_counts(tmp_path, n, chunk):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = _tiny_cfg()
    est = bench.prefill_estimates(bench.model_config_of(_model_dir(tmp_path, cfg)), n, chunk)
    # linear: 2 FLOPs per weight of the layers' projections, per token (a real model's)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    weights = sum(
        m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)
    )
    assert est["linear_flops"] == 2 * n * weights
    # attention: every (query, earlier-or-same key) pair, q.k and the V sum, every q head
    pairs = sum(i + 1 for i in range(n))
    layers, hq = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    hkv = cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // hq
    assert est["attention_flops"] == pairs * 4 * d * hq * layers
    # prefix: each chunk reads the K/V of every token before it
    starts = range(0, n, chunk)
    assert est["chunks"] == len(starts)
    kv_bytes = 2 * layers * hkv * d * 2  # K and V of every layer, bf16
    assert est["prefix_kv_bytes_read"] == sum(starts) * kv_bytes


def test_kernel_reference_is_the_nearest_batch_one_case(tmp_path):
    f = tmp_path / "offload.json"
    cases = [
        {"context": 131072, "batch": 1, "pariskv_ms_per_token": 9.0},
        {"context": 1048576, "batch": 1, "pariskv_ms_per_token": 18.0},
        {"context": 1048576, "batch": 2, "pariskv_ms_per_token": 30.0},
    ]
    f.write_text(json.dumps({"device": "H", "uva_gather_gbs_256B_rows": 29.0, "cases": cases}))
    ref = bench.kernel_reference(1_000_000, f)
    assert ref["context"] == 1048576 and ref["pariskv_ms_per_token"] == 18.0
    assert ref["uva_gather_gbs"] == 29.0 and ref["device"] == "H"
    assert bench.kernel_reference(200_000, f)["context"] == 131072
    assert bench.kernel_reference(1, tmp_path / "none.json") is None


class _FakeServer:
    """What ``server_for`` returns, pointing at the in-process ``/v1/completions``."""

    def __init__(self, url: str, log_path: Path):
        self.url, self.log_path, self.cmd = url, log_path, ["launch_server", "--fake"]
        self.flushed = 0

    def start(self, timeout):
        # SGLang's log lines for the prefill chunks of the warm-up and of the request
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text(server_log(chunked(WARM, 0) + chunked(N, 10)))

    def stop(self):
        pass

    def flush_cache(self):
        self.flushed += 1

    def log_tail(self):
        return ""


N, WARM, CHUNK = 3 * LONG_AT, 2 * LONG_AT, 64  # the timed run's lengths


def chunked(total: int, start_s: int) -> list[tuple[int, int]]:
    """(second, new tokens) of a prompt of ``total`` tokens in chunks of CHUNK, one a second."""
    return [
        (start_s + i, min(CHUNK, total - done)) for i, done in enumerate(range(0, total, CHUNK))
    ]


def _run(monkeypatch, tmp_path, stats: dict, argv: list[str]):
    log: list = []
    srv = _fake_server(log)
    asked: dict = {}

    def server_for(name, args, model, flags, log_dir, context, pariskv):
        asked.update(model=model, flags=flags, context=context, pariskv=pariskv)
        asked["server"] = _FakeServer(srv.url, log_dir / "fake.log")
        return asked["server"], tmp_path / "stats"

    monkeypatch.setattr(bench, "server_for", server_for)
    monkeypatch.setattr(bench, "_check_plugin_installed", lambda: None)
    monkeypatch.setattr(bench, "_server_info", lambda url: {"chunked_prefill_size": CHUNK})
    monkeypatch.setattr(bench, "_read_stats", lambda d: stats)
    monkeypatch.setattr(bench, "_device_info", lambda: {"device": "fake GPU"})
    monkeypatch.setattr(bench.signal, "signal", lambda *a: None)
    try:
        code = bench.main(argv + ["--log-dir", str(tmp_path / "logs")])
    finally:
        srv.close()
    return code, log, asked


def test_a_run_times_the_request_and_writes_its_limits(tmp_path, monkeypatch):
    n, out_len, warm = N, 8, WARM
    out = tmp_path / "m.json"
    stats = {"sparse_request_steps": out_len - 1, "dense_request_steps": 0}
    code, log, asked = _run(monkeypatch, tmp_path, stats, [
        "--input-len", str(n), "--output-len", str(out_len), "--warm-up-len", str(warm),
        "--out", str(out)])  # fmt: skip
    assert code == 0
    # the server: host offload with a pool for the request, context for input + output
    cfg = bench.model_config_of(asked["model"])
    assert asked["pariskv"] == {
        "offload": "host",
        "host_pool_gb": bench.host_pool_gb(cfg, n + out_len + 64),
    }
    assert asked["context"] == n + out_len + 64 and "--load-format" in asked["flags"]
    # what it was sent: the warm-up, a flush, then the request itself
    assert [len(e["req"]["prompt"]) for e in log] == [warm, n]
    assert log[1]["req"]["max_tokens"] == out_len
    assert asked["server"].flushed == 1
    data = json.loads(out.read_text())
    ttft, itl = DELAYS["long"]
    assert ttft <= data["ttft_s"] < ttft + 0.1
    assert itl * 1000 <= data["tpot_ms"] < itl * 1000 + 10
    assert itl * 1000 <= data["tpot_p50_ms"] < itl * 1000 + 10
    assert data["output_tokens"] == out_len == data["token_times_s"][-1][1]
    # the request's chunks from the server log, not the warm-up's
    assert data["prefill_progress"] == {
        "chunk_tokens": [64, 64, 64, 64, 44],
        "prefix_tokens": [0, 64, 128, 192, 256],
        "seconds": [0.0, 1.0, 2.0, 3.0, 4.0],
    }
    pre = data["limits"]["prefill"]
    est = bench.prefill_estimates(cfg, n, CHUNK)
    assert {k: pre[k] for k in est} == est
    flops = est["linear_flops"] + est["attention_flops"]
    assert pre["achieved_tflops"] == pytest.approx(flops / data["ttft_s"] / 1e12)
    ref = data["kernel_reference"]
    if ref is not None:  # the committed offload.json
        dec = data["limits"]["decode"]
        assert dec["tpot_over_kernel_level"] == pytest.approx(
            data["tpot_ms"] / ref["pariskv_ms_per_token"]
        )
    assert out.with_suffix(".png").stat().st_size > 0


def test_results_refused_unless_pariskv_decoded_sparsely(tmp_path, monkeypatch):
    out = tmp_path / "m.json"
    with pytest.raises(RuntimeError, match="no sparse decode steps"):
        _run(monkeypatch, tmp_path, {"dense_request_steps": 7}, [
            "--input-len", str(2 * LONG_AT), "--output-len", "4", "--warm-up-len", "8",
            "--out", str(out)])  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--output-len", "1"], ["--input-len", "0"]])
def test_bad_lengths_are_refused(argv):
    with pytest.raises(SystemExit, match="--output-len"):
        bench.main(argv)
