"""The stress suite's distortions, its loss attribution and the calibrate tool, against
independent float64 oracles on synthetic traces."""

from __future__ import annotations

import pytest
import torch

from pariskv_tools.eval import calibrate
from pariskv_tools.eval.budget import Budget
from pariskv_tools.eval.layer_eval import evaluate_layer, exact_scores
from pariskv_tools.eval.methods import ExactTopK, ParisKV
from pariskv_tools.eval.stress import LossTracker, case_calibration
from pariskv_tools.eval.stress_cases import Case, apply_case, common_cosine, rope
from pariskv_tools.eval.trace import LayerTrace
from pariskv_tools.workloads.capture import Capture
from sglang_pariskv.calibration import load_calibration

HKV, G, D, N, S = 3, 3, 32, 700, 12
BUDGET = Budget(fraction=0.2, sink=8, local=32)


def trace(seed: int = 0, layer: int = 0) -> LayerTrace:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(N, HKV, D, generator=g) + torch.randn(HKV, D, generator=g)
    queries = torch.randn(S, HKV * G, D, generator=g)
    values = torch.randn(N, HKV, D, generator=g)
    return LayerTrace(keys, values, queries, torch.arange(N - S + 1, N + 1), N - S, layer)


def logits(t: LayerTrace) -> torch.Tensor:
    """Per query head q·k in float64 [S, Hq, N] (query head j reads KV head j // group)."""
    group = t.queries.shape[1] // t.keys.shape[1]
    k = t.keys.double().repeat_interleave(group, 1)
    return torch.einsum("shd,nhd->shn", t.queries.double(), k)


@pytest.mark.parametrize(
    "case", [Case("c", common=4.0), Case("o", outliers=5), Case("co", common=2.0, outliers=3)]
)
def test_common_and_outlier_maps_shift_each_logit_row_by_a_constant(case):
    """q·k changes by one constant per (step, query head): exact top-k and softmax are the
    real trace's."""
    t = trace()
    new = apply_case(case, t, 1e4)
    diff = logits(new) - logits(t)
    assert torch.allclose(diff, diff[..., :1].expand_as(diff), atol=1e-3)
    if case.common >= 4:
        assert common_cosine(new.keys) > 0.9 > common_cosine(t.keys)


def unit_calibrated_keys(t: LayerTrace, centre, scale) -> torch.Tensor:
    return torch.nn.functional.normalize((t.keys.double() - centre) / scale, dim=-1)


@pytest.mark.parametrize("case", [Case("c", common=4.0), Case("co", common=2.0, outliers=3)])
def test_the_calibration_of_a_distorted_model_undoes_common_and_outlier_maps(case):
    """The calibrate tool's centres and scales, measured on the distorted calibration
    trace, give the distorted keys the same calibrated directions as the real keys get
    from the real calibration (float64): the codes cannot tell the two models apart."""
    ref, t = trace(1), trace(2)
    real = unit_calibrated_keys(t, *map(torch.Tensor.double, case_calibration(Case("r"), ref, 1e4)))
    new = apply_case(case, t, 1e4, ref=ref)
    c, s = case_calibration(case, ref, 1e4)
    bent = unit_calibrated_keys(new, c.double(), s.double())
    assert torch.allclose(bent, real, atol=1e-4)


def test_a_reference_trace_fixes_the_distortion_for_every_trace_of_the_layer():
    """Magnitudes come from ``ref``: the common vector added to another trace of the same
    layer is the one added to the reference itself."""
    case = Case("c", common=3.0)
    ref, other = trace(1), trace(2)
    added_ref = apply_case(case, ref, 1e4).keys - ref.keys
    added_other = apply_case(case, other, 1e4, ref=ref).keys - other.keys
    assert torch.allclose(added_ref, added_other, atol=1e-4)
    own = apply_case(case, other, 1e4).keys - other.keys
    assert not torch.allclose(own, added_other, atol=1e-4)


def test_rope_is_a_pairwise_rotation():
    """HF rotate_half convention: channels i and i + D/2 turn by pos · theta^(-2i/D)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 3, 50])
    got = rope(x, pos, 100.0)
    for p_i, p in enumerate(pos.tolist()):
        for i in range(4):
            a = p * 100.0 ** (-2 * i / 8)
            x1, x2 = x[:, i], x[:, i + 4]
            assert torch.allclose(
                got[p_i, :, i], x1 * torch.cos(torch.tensor(a)) - x2 * torch.sin(torch.tensor(a))
            )
            assert torch.allclose(
                got[p_i, :, i + 4],
                x2 * torch.cos(torch.tensor(a)) + x1 * torch.sin(torch.tensor(a)),
            )


def test_bias_is_added_before_rope():
    t = trace()
    new = apply_case(Case("b", bias=3.0), t, 1e4)
    added = (new.keys - t.keys).double()
    # One pre-RoPE vector b per head: un-rotating each position's addition gives b back.
    back = rope(added[7], torch.tensor([-7]), 1e4)[0]
    assert torch.allclose(rope(back, torch.tensor([123]), 1e4)[0], added[123], atol=1e-4)


def test_widen_sums_two_heads_logits_and_regroup_keeps_own_heads_first():
    t = trace()
    new = apply_case(Case("w", widen=True), t, 1e4)
    assert new.keys.shape == (N, HKV, 2 * D)
    want = logits(t)
    got = logits(new)
    for j in range(HKV):
        nxt = (j + 1) % HKV
        for i in range(G):
            assert torch.allclose(
                got[:, j * G + i], want[:, j * G + i] + want[:, nxt * G + i], atol=1e-3
            )
    g7 = apply_case(Case("g", group=7), t, 1e4)
    assert g7.queries.shape == (S, HKV * 7, D)
    assert torch.equal(g7.queries[:, 7 : 7 + G], t.queries[:, G : 2 * G])  # KV head 1's own


def test_losses_by_stage_add_up_to_the_recall_gap():
    """Collision + rerank losses equal 1 - recall@100 measured by the evaluation's own
    (independent) metric path, and a candidate ratio of 1 loses nothing at collision."""
    t = trace(3)
    tracker = LossTracker(ParisKV(name="p", outputs=("full",)), k=100)
    every = LossTracker(
        ParisKV(ParisKV().config.__class__(candidate_ratio=1.0), name="a", outputs=("full",))
    )
    res = evaluate_layer(t, [tracker, every, ExactTopK()], BUDGET).metrics
    for tr, name in ((tracker, "p"), (every, "a")):
        lost = torch.cat(tr.lost["collision"]) + torch.cat(tr.lost["rerank"])
        assert torch.allclose(lost, 1 - res[name]["recall_at_100"], atol=1e-6)
    assert float(torch.cat(every.lost["collision"]).sum()) == 0.0
    assert float(torch.cat(tracker.lost["collision"]).sum()) > 0.0


def test_exact_scores_of_a_distorted_trace_rank_like_the_real_one():
    t = trace(4)
    new = apply_case(Case("c", common=8.0), t, 1e4)
    batch = BUDGET.batch(t.queries, t.seq_lens)
    a = exact_scores(batch, t.keys).argsort(-1)[..., -50:]
    b = exact_scores(BUDGET.batch(new.queries, new.seq_lens), new.keys).argsort(-1)[..., -50:]
    assert (a == b).float().mean() > 0.99


def fake_capture(n_layers: int = 2) -> Capture:
    """Layer 0 attends almost uniformly (tiny queries); layer 1 has peaked attention."""
    g = torch.Generator().manual_seed(5)
    p, dec = 600, 40
    keys = [torch.randn(p + dec, HKV, D, generator=g) + 2.0 for _ in range(n_layers)]
    queries = []
    for layer in range(n_layers):
        scale = 0.001 if layer == 0 else 3.0
        q = keys[layer][torch.randint(0, p, (dec + 1,), generator=g)].repeat_interleave(G, 1)
        queries.append(q * scale)
    return Capture(
        keys=keys,
        values=[torch.randn(p + dec, HKV, D, generator=g) for _ in range(n_layers)],
        queries=queries,
        query_positions=torch.arange(p - 1, p + dec),
        prompt_len=p,
        token_ids=torch.zeros(p + dec, dtype=torch.long),
        text="",
    )


def test_calibrate_writes_key_means_and_scales_and_recommends_the_weak_layer(
    tmp_path, monkeypatch, capsys
):
    cap = fake_capture()
    monkeypatch.setattr(calibrate, "load_or_capture", lambda *a, **k: cap)
    model = type(
        "M",
        (),
        {"describe": lambda self: {"name": "fake"}, "config": {"rope_theta": 10000.0}},
    )()
    out = tmp_path / "cal.json"
    settings = calibrate.CalibrateSettings(dense_below=0.9, max_dense=1, step_stride=2)
    doc = calibrate.run_calibrate(model, out, tmp_path, settings, "cmd")
    cal = load_calibration(out)
    assert cal.extra["rope"] == doc["rope"] == {"rope_theta": 10000.0, "rope_type": "default"}
    want = torch.stack([k[cap.prompt_len :].double().mean(0) for k in cap.keys])
    assert torch.allclose(cal.centres.double(), want, atol=1e-5)
    # Scales: sqrt(key std / query RMS) per channel, normalised to mean 1 (float64 loops).
    for li in range(len(cap.keys)):
        gen_keys = cap.keys[li][cap.prompt_len :].double()
        dec_q = cap.queries[li][1:].double()  # the decode steps' queries
        for h in range(HKV):
            ks = (gen_keys[:, h] - gen_keys[:, h].mean(0)).pow(2).mean(0).sqrt()
            qr = dec_q[:, h * G : (h + 1) * G].pow(2).mean((0, 1)).sqrt()
            s = (ks / qr).sqrt()
            assert torch.allclose(cal.scales[li, h].double(), s / s.mean(), rtol=1e-4)
    assert cal.dense_layers == (0,) and doc["layer_mass_recall"][0] < 0.9
    assert doc["layer_mass_recall"][1] > doc["layer_mass_recall"][0]
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("dense layers recommended: 0 (mean mass with them dense")
    want = f"serve with: --enable-pariskv --pariskv-calibration {out} --pariskv-dense-layers auto"
    assert printed[-1] == want


def test_recommendation_keeps_the_weakest_layers_under_the_threshold():
    mass = [0.5, 0.95, 0.85, 0.88, 0.99]
    assert calibrate.recommend_dense(mass, 0.9, 2) == [0, 2]
    assert calibrate.recommend_dense(mass, 0.9, 5) == [0, 2, 3]
    assert calibrate.recommend_dense(mass, 0.4, 5) == []


def test_calibrate_cli_passes_its_device_and_refuses_a_missing_gpu(monkeypatch, tmp_path):
    """``calibrate --device``: the capture runs where asked; a GPU that is not there is
    refused before any model work, naming the flag."""
    from pariskv_tools.eval import __main__ as cli

    model = type("M", (), {"max_positions": 8192})()
    monkeypatch.setattr(cli, "resolve_model", lambda *a: model)
    seen = []
    monkeypatch.setattr(cli, "run_calibrate", lambda m, out, cache, s, cmd: seen.append(s))
    argv = ["calibrate", "--out", str(tmp_path / "c.json")]
    cli.main([*argv, "--device", "cpu"])
    assert [s.capture_device for s in seen] == ["cpu"]
    with pytest.raises(SystemExit, match="--device gpu9: not a torch device"):
        cli.main([*argv, "--device", "gpu9"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: no CUDA device is visible"):
            cli.main([*argv, "--device", "cuda"])
    assert len(seen) == 1


def test_a_capture_loads_the_model_on_the_asked_device_in_its_serving_dtype(monkeypatch, tmp_path):
    """load_or_capture: float32 on the CPU, bfloat16 on a GPU (the model is asked for it;
    the stand-in stops the capture right after)."""
    from pariskv_tools.eval import captures

    asked = []

    class Source:
        max_positions, cache_name = 8192, "m"

        def load(self, device="cpu", dtype=torch.float32):
            asked.append((str(device), dtype))
            raise RuntimeError("stop")

    spec = captures.ContextSpec("c", "passkey", 256)
    for device in ("cpu", "cuda:1"):
        with pytest.raises(RuntimeError, match="stop"):
            captures.load_or_capture(spec, 8, 0, tmp_path, Source(), device=device)
    assert asked == [("cpu", torch.float32), ("cuda:1", torch.bfloat16)]


def test_the_calibration_summary_names_what_it_measured_and_the_flags_to_serve_with():
    mass = {"pariskv": [0.5, 0.99, 0.97, 0.98], "exact_topk": [0.52, 0.99, 0.98, 0.98]}
    text = calibrate.summary("c.json", mass, [0], 0.1).splitlines()
    assert text[0] == (
        "ParisKV (calibrated) attention-mass recall at a 10% budget: mean 0.860 over 4 "
        "layers (exact top-k 0.868); weakest layer 0 0.500, layer 2 0.970, layer 3 0.980"
    )
    assert text[1].startswith("dense layers recommended: 0 (mean mass with them dense 0.985;")
    assert (
        text[-1]
        == "serve with: --enable-pariskv --pariskv-calibration c.json --pariskv-dense-layers auto"
    )
    none = calibrate.summary("c.json", mass, [], 0.1).splitlines()
    assert (
        len(none) == 2 and none[-1] == "serve with: --enable-pariskv --pariskv-calibration c.json"
    )
