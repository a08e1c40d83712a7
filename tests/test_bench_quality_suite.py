"""bench_quality_suite: budgets, the summary against hand counts, and a run on a tiny model."""

import json
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_quality_suite as bench  # noqa: E402


def test_topk_fills_the_budget_fraction_and_refuses_one_below_sink_plus_local():
    assert bench.topk_for(0.02, 4000, sink=4, local=16) == 60  # 4 + 16 + 60 = 80 = 2%
    with pytest.raises(SystemExit, match="--budgets 0.001: .* --sink 4 \\+ --local 16"):
        bench.topk_for(0.001, 4000, sink=4, local=16)


def row(task, dense, exact, pariskv, same_exact=False, same_pariskv=False, tok=(1.0, 1.0)):
    return {
        "task": task,
        "correct": {"dense": dense, "exact@0.02": exact, "pariskv@0.02": pariskv},
        "identical": {"dense": True, "exact@0.02": same_exact, "pariskv@0.02": same_pariskv},
        "token_agreement": {"dense": 1.0, "exact@0.02": tok[0], "pariskv@0.02": tok[1]},
        "logprob": {"dense": -1.0, "exact@0.02": -1.0 - (1 - tok[0]), "pariskv@0.02": -1.5},
    }


def test_summary_counts_accuracy_agreement_and_identical_answers():
    rows = [
        row("passkey", True, True, False, same_exact=True),
        row("passkey", False, False, True),
        row("passkey", True, True, True, same_exact=True, same_pariskv=True),
        row("multikey_needle", False, True, False, tok=(0.25, 0.5)),
    ]
    methods = ["exact", "pariskv"]
    got = {(s["task"], s["method"]): s for s in bench.summarise(rows, [0.02], methods)}
    assert set(got) == {(t, m) for t in ("passkey", "multikey_needle") for m in methods}
    p = got["passkey", "pariskv"]
    assert (p["trials"], p["dense_acc"], p["acc"]) == (3, 2 / 3, 2 / 3)
    assert p["agreement"] == 1 / 3  # only the third prompt scores as dense does
    assert p["identical_answers"] == 1 / 3
    e = got["passkey", "exact"]
    assert (e["acc"], e["agreement"], e["identical_answers"]) == (2 / 3, 1.0, 2 / 3)
    m = got["multikey_needle", "exact"]
    assert (m["trials"], m["dense_acc"], m["acc"], m["agreement"]) == (1, 0.0, 1.0, 0.0)
    assert (m["token_agreement"], m["logprob_gap"]) == (0.25, -0.75)
    mp = got["multikey_needle", "pariskv"]
    assert (mp["token_agreement"], mp["logprob_gap"]) == (0.5, -0.5)
    assert (p["token_agreement"], p["logprob_gap"]) == (1.0, -0.5)


def test_a_run_on_a_tiny_model_reports_every_task_budget_and_method(tmp_path):
    path = save_tiny_model(tmp_path / "tiny-llama", "llama")
    out = tmp_path / "suite.json"
    methods = list(bench.METHODS)
    argv = ["--model", str(path), "--context", "300", "--trials", "1", "--budgets", "0.1",
            "0.5", "--sink", "4", "--local", "8", "--cache-root", str(tmp_path / "cache"),
            "--methods", *methods, "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["model"]["model_type"] == "llama" and doc["budgets"] == [0.1, 0.5]
    assert [(r["task"], r["seed"]) for r in doc["rows"]] == [(t, 0) for t in bench.TASKS]
    for r in doc["rows"]:
        assert abs(r["prompt_tokens"] - 300) <= 12
        sparse = {f"{m}@{f}" for m in methods for f in (0.1, 0.5)}
        assert set(r["texts"]) == {"dense"} | sparse
        assert set(r["token_agreement"]) == set(r["logprob"]) == {"dense"} | sparse
        assert r["token_agreement"]["dense"] == 1.0  # dense predicts its own greedy answer
        assert all(0.0 <= a <= 1.0 for a in r["token_agreement"].values())
    assert doc["methods"] == methods
    assert doc["summary"] == bench.summarise(doc["rows"], [0.1, 0.5], methods)
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_calibration_file_is_used_and_one_of_another_model_refused(tmp_path):
    import torch

    from sglang_pariskv.calibration import save_calibration

    path = save_tiny_model(tmp_path / "tiny-llama", "llama")
    cfg = json.loads((path / "config.json").read_text())
    layers, hkv = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    gen = torch.Generator().manual_seed(0)
    good, bad = tmp_path / "cal.json", tmp_path / "other.json"
    save_calibration(good, torch.randn(layers, hkv, d, generator=gen), [],
                     scales=torch.rand(layers, hkv, d, generator=gen) + 0.5)  # fmt: skip
    save_calibration(bad, torch.zeros(layers + 1, hkv, d), [])
    out = tmp_path / "suite.json"
    argv = ["--model", str(path), "--context", "300", "--trials", "1", "--tasks", "passkey",
            "--budgets", "0.2", "--sink", "4", "--local", "8",
            "--cache-root", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    assert bench.main([*argv, "--calibration", str(good)]) == 0
    assert json.loads(out.read_text())["calibration"] == str(good)
    with pytest.raises(SystemExit, match=f"^--calibration {bad} was written for 3 layers"):
        bench.main([*argv, "--calibration", str(bad)])


def test_greedy_continue_is_the_models_own_greedy_generation(tmp_path):
    """From a prefill's KV cache, greedy_continue gives the tokens transformers' generate
    gives greedily (same model, same prompt), and stops at an end-of-sequence id."""
    import copy

    import torch

    from pariskv_tools.workloads.models import greedy_continue, resolve_model

    path = save_tiny_model(tmp_path / "tiny-llama", "llama")
    model, _ = resolve_model(path, tmp_path / "cache").load()
    prompt = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        want = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    first = int(out.logits[0, -1].argmax())
    got = greedy_continue(model, copy.deepcopy(out.past_key_values), first, 8, eos=set())
    assert got == want[0, prompt.shape[1] :].tolist()
    stop = got[3]
    cut = greedy_continue(model, copy.deepcopy(out.past_key_values), first, 8, eos={stop})
    assert cut == [t for t in got[: got.index(stop) + 1] if t != stop]


def test_forced_agreement_matches_one_teacher_forced_forward_pass(tmp_path):
    """Step-by-step teacher forcing from a prefill's cache gives the argmax hits and mean
    log-probability that one forward pass over prompt + reference gives (float64 softmax)."""
    import copy

    import torch

    from pariskv_tools.workloads.models import forced_agreement, resolve_model

    path = save_tiny_model(tmp_path / "tiny-llama", "llama")
    model, _ = resolve_model(path, tmp_path / "cache").load()
    prompt = [5, 17, 42, 7, 99, 3]
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        first = int(out.logits[0, -1].argmax())
        reference = [first, 11, 23, 64, 8]
        full = model(input_ids=torch.tensor([prompt + reference])).logits[0].double()
    lp = full.log_softmax(-1)[len(prompt) : len(prompt) + len(reference) - 1]
    nxt = torch.tensor(reference[1:])
    want_top1 = (lp.argmax(-1) == nxt).double().mean().item()
    want_lp = lp.gather(1, nxt[:, None]).mean().item()
    top1, mean_lp = forced_agreement(model, copy.deepcopy(out.past_key_values), reference)
    assert top1 == want_top1
    assert abs(mean_lp - want_lp) < 1e-4
    assert forced_agreement(model, copy.deepcopy(out.past_key_values), [first]) == (1.0, 0.0)
