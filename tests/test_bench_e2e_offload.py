"""``bench_e2e.py offload``'s bookkeeping, without engines: which variants run, how the
answers of a run are compared with the GPU pool's, and that ``--sequential`` really sends
one request at a time."""

import json
import queue
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_e2e  # noqa: E402
import offload_equivalence  # noqa: E402
import passkey_runs  # noqa: E402


def _first_diff(a, b):
    """The reference: a plain scan, the prefix case spelled out."""
    n = min(len(a), len(b))
    for j in range(n):
        if a[j] != b[j]:
            return j
    if len(a) != len(b):
        return n
    return None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([1, 2, 3], [1, 2, 3]),
        ([1, 2, 3], [1, 9, 3]),
        ([5, 2, 3], [1, 2, 3]),
        ([1, 2, 3], [1, 2, 4]),
        ([1, 2], [1, 2, 7]),
        ([1, 2, 7], [1, 2]),
        ([], [4]),
        ([], []),
    ],
)
def test_first_difference_matches_a_plain_scan(a, b):
    assert offload_equivalence.first_difference(a, b) == _first_diff(a, b)


def _result(texts, ids, top):
    return {"texts": texts, "ids": ids, "top_logprobs": top}


def test_answer_differences_report_first_token_and_baseline_margin():
    # Three prompts, three answer tokens each; prompt 1 flips a near-tie at token 2 (the run
    # takes the baseline's second choice), prompt 2 diverges at token 0 with a wide margin.
    base_ids = [[10, 11, 12], [20, 21, 22], [30, 31, 32]]
    run_ids = [[10, 11, 12], [20, 21, 99], [77, 31, 32]]
    base_top = [
        [[[-0.1, 10], [-3.0, 1]], [[-0.2, 11], [-2.5, 2]], [[-0.3, 12], [-4.0, 3]]],
        [[[-0.1, 20], [-3.0, 1]], [[-0.2, 21], [-2.5, 2]], [[-0.70, 22], [-0.75, 99]]],
        [[[-0.05, 30], [-6.0, 5]], [[-0.2, 31], [-2.5, 2]], [[-0.3, 32], [-4.0, 3]]],
    ]
    run_top = [
        base_top[0],
        [[[-0.1, 20], [-3.0, 1]], [[-0.2, 21], [-2.5, 2]], [[-0.72, 99], [-0.73, 22]]],
        [[[-1.0, 77], [-1.5, 30]], [[-0.2, 31], [-2.5, 2]], [[-0.3, 32], [-4.0, 3]]],
    ]
    base = _result(["a", "b", "c"], base_ids, base_top)
    run = _result(["a", "b'", "c'"], run_ids, run_top)
    diffs = offload_equivalence.answer_differences(base, run, [4096, 4096, 8000])

    expected = []
    for i in range(3):
        j = _first_diff(base_ids[i], run_ids[i])
        if j is None:
            continue
        expected.append(
            {
                "prompt": i,
                "context": [4096, 4096, 8000][i],
                "first_diff_token": j,
                "baseline_margin_at_diff": base_top[i][j][0][0] - base_top[i][j][1][0],
                "this_margin_at_diff": run_top[i][j][0][0] - run_top[i][j][1][0],
                "this_is_baseline_top2": run_ids[i][j] == base_top[i][j][1][1],
            }
        )
    assert [d["prompt"] for d in diffs] == [e["prompt"] for e in expected] == [1, 2]
    for d, e in zip(diffs, expected):
        for k, v in e.items():
            assert d[k] == pytest.approx(v), k
        assert d["gpu_pool_ids"] == base_ids[e["prompt"]]
        assert d["this_ids"] == run_ids[e["prompt"]]
    assert diffs[0]["baseline_margin_at_diff"] == pytest.approx(0.05)
    assert diffs[0]["this_is_baseline_top2"] is True
    assert diffs[1]["this_is_baseline_top2"] is False
    json.dumps(diffs)  # goes into results/e2e.json as is


def test_answer_differences_without_logprobs_or_past_the_baseline_end():
    # The baseline stopped after 2 tokens, the run went on: the difference is at index 2,
    # where the baseline has no logprobs; a run without logprobs has no margins at all.
    base = _result(["ab"], [[1, 2]], [[[[-0.1, 1], [-2.0, 3]], [[-0.1, 2], [-2.0, 3]]]])
    longer = _result(["abc"], [[1, 2, 3]], None)
    (d,) = offload_equivalence.answer_differences(base, longer, [4096])
    assert d["first_diff_token"] == 2
    assert d["baseline_margin_at_diff"] is None
    assert d["this_margin_at_diff"] is None
    assert d["this_is_baseline_top2"] is None
    assert offload_equivalence.answer_differences(base, base, [4096]) == []


def test_top_logprobs_from_sglang_meta_info():
    # SGLang's shape: per output token a list of (logprob, token_id, text) tuples, or None.
    meta = {"output_top_logprobs": [[(-2.0, 7, None), (-0.5, 3, None)], None, [(-0.1, 4, "x")]]}
    assert passkey_runs._top_logprobs(meta) == [[[-0.5, 3], [-2.0, 7]], [], [[-0.1, 4]]]
    assert passkey_runs._top_logprobs({}) == []


def test_default_variants_unchanged_and_repeat_opt_in():
    cfg = dict(passkey_runs.PASSKEY_CFG)
    default = offload_equivalence.offload_run_configs(cfg)
    assert list(default) == [
        "gpu_pool",
        "offload_hot_cache",
        "offload_direct",
    ]
    picked = offload_equivalence.offload_run_configs(
        cfg, ["gpu_pool_repeat", "offload_hot_cache", "offload_direct"]
    )
    assert list(picked) == ["gpu_pool", "gpu_pool_repeat", "offload_hot_cache", "offload_direct"]
    assert picked["gpu_pool_repeat"] == picked["gpu_pool"] == cfg
    assert picked["offload_direct"]["offload"] == "host"


def test_parser_accepts_sequential_and_repeat():
    args = bench_e2e.build_parser().parse_args(
        ["offload", "--sequential", "--disable-radix-cache", "--runs", "gpu_pool_repeat"]
    )
    assert args.cmd == "offload" and args.sequential and args.disable_radix_cache
    assert args.runs == ["gpu_pool_repeat"]
    assert not bench_e2e.build_parser().parse_args(["offload"]).sequential
    with pytest.raises(SystemExit):  # a misspelt variant must not silently run nothing
        bench_e2e.build_parser().parse_args(["offload", "--runs", "gpu_pool_repat"])


class _FakeEngine:
    """Records each ``generate`` call; answers like SGLang (a dict per request, a list for
    a batch) with one answer token, the prompt's first id, and its top-2 logprobs."""

    def __init__(self):
        self.calls = []

    def generate(self, input_ids, sampling_params, return_logprob=False, top_logprobs_num=None):
        self.calls.append((input_ids, return_logprob))

        def answer(p):
            meta = {}
            if return_logprob:
                meta["output_top_logprobs"] = [[(-0.25, p[0], None), (-1.0, p[0] + 1, None)]]
            return {"text": str(p[0]), "output_ids": [p[0]], "meta_info": meta}

        if input_ids and isinstance(input_ids[0], int):
            return answer(input_ids)
        return [answer(p) for p in input_ids]

    def shutdown(self):
        pass


@pytest.mark.parametrize("sequential", [False, True])
def test_worker_sequential_sends_one_request_at_a_time(monkeypatch, sequential):
    eng, engine_kwargs = _FakeEngine(), []
    monkeypatch.setattr(passkey_runs, "_engine", lambda *a, **k: engine_kwargs.append(k) or eng)
    monkeypatch.setattr(passkey_runs, "_read_stats", lambda d: {})
    prompts, short = [[1, 9], [2, 9], [3, 9]], [[5, 9], [6, 9]]
    q = queue.Queue()
    extra = {"disable_radix_cache": True}
    passkey_runs._passkey_worker("model", None, prompts, short, sequential, True, extra, q)
    res = q.get_nowait()
    assert "error" not in res, res.get("error")
    assert engine_kwargs[0]["disable_radix_cache"] is True  # the CLI's flag reaches the engine
    if sequential:
        assert [c[0] for c in eng.calls] == prompts + short
        # logprobs for the passkey answers only, not for the greedy-equality prompts
        assert [c[1] for c in eng.calls] == [True] * len(prompts) + [False] * len(short)
    else:
        assert eng.calls == [(prompts, True), (short, False)]
    assert res["ids"] == [[1], [2], [3]]
    assert res["greedy_ids"] == [[5], [6]]
    assert res["top_logprobs"] == [[[[-0.25, p[0]], [-1.0, p[0] + 1]]] for p in prompts]
