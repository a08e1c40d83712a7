"""End-to-end smoke test of the retrieval-quality run on a synthetic two-layer capture."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from pariskv_tools.eval.captures import ContextSpec
from pariskv_tools.eval.methods import default_methods
from pariskv_tools.eval.retrieval import RetrievalSettings, run_retrieval
from pariskv_tools.eval.summary import drift


def fake_capture(prompt: int = 700, decode: int = 24, layers: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = prompt + decode
    return SimpleNamespace(
        keys=[torch.randn(n, 3, 64, generator=g) for _ in range(layers)],
        values=[torch.randn(n, 3, 64, generator=g) for _ in range(layers)],
        queries=[torch.randn(decode + 1, 9, 64, generator=g) for _ in range(layers)],
        query_positions=torch.arange(prompt - 1, n),
        prompt_len=prompt,
        n_decode=decode,
        n_layers=layers,
        text="",
        meta={"task": "synthetic"},
    )


def test_run_writes_summary_and_plots(tmp_path):
    spec = ContextSpec("tiny", "synthetic", 700)
    settings = RetrievalSettings(
        sweep=(0.05, 0.1, 0.2),
        sweep_stride=4,
        n_decode=24,
        chunk=8,
        contexts=(spec,),
        dense_first=1,
    )
    out = tmp_path / "rq.json"
    doc = run_retrieval(
        settings, default_methods(), tmp_path, out, "test", captures={"tiny": fake_capture()}
    )
    saved = json.loads(out.read_text())
    assert saved["summary"].keys() == doc["summary"].keys()
    for e in saved["summary"].values():
        assert len(e["recall_at_100_by_step"]) == 24
        assert 0.0 <= e["mass_recall"] <= 1.0 + 1e-6
        assert set(e["mass_recall_vs_budget"]) == {"0.05", "0.10", "0.20"}
    exact = saved["summary"]["exact_topk"]
    assert exact["recall_at_100"] == 1.0 and exact["recall_at_budget"] == 1.0
    # The sweep at the configured fraction reproduces the main pass on the same steps.
    assert abs(exact["mass_recall_vs_budget"]["0.10"] - exact["mass_recall"]) < 0.05
    assert len(list(tmp_path.glob("rq_*.png"))) == 3
    dense = saved["summary"]["pariskv_dense_first1"]
    assert dense["by_layer"]["mass_recall"][0] == 1.0
    assert dense["attended_fraction"] > saved["summary"]["pariskv"]["attended_fraction"]
    assert "pq_rel_err_generated_keys" in saved["diagnostics"]["tiny"]


def test_drift_slope():
    d = drift(torch.linspace(1.0, 0.0, 1001))
    assert abs(d["slope_per_1000_steps"] + 1.0) < 1e-6
    assert d["first_steps_mean"] > d["last_steps_mean"]
