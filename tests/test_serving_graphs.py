"""Dense-step CUDA graphs and ``min_sparse_tokens`` through real SGLang engines (GPU).

A small Llama-shaped model with SGLang's seeded dummy weights serves the same prompts
with and without ParisKV. Where ParisKV must compute exactly SGLang's logits, greedy
outputs must match token for token:

* short requests (every step at or below the dense threshold) replay the dense-step
  graph, which is SGLang's own decode: same tokens as plain SGLang, and no step runs the
  retrieval kernels;
* requests that cross the threshold while decoding: same tokens up to the crossing;
* ``min_sparse_tokens`` above any step's tokens: every step is SGLang's dense decode.
"""

import pytest

from tests.tiny_engine import serve, write_tiny_llama

pytestmark = pytest.mark.gpu

CFG = {"topk": 64, "sink": 8, "local": 32, "dense_threshold": 256, "min_sparse_tokens": 0}


def _prompts() -> dict[str, tuple[list[list[int]], int]]:
    """(prompts, new tokens) per group: dense throughout, crossing the threshold while
    decoding, sparse throughout, and a mixed batch."""
    import random

    rng = random.Random(0)

    def p(n):
        return [rng.randrange(3, 2048) for _ in range(n)]

    return {
        "short": ([p(100) for _ in range(4)], 64),
        "crossing": ([p(220) for _ in range(2)], 80),
        "long": ([p(900) for _ in range(2)], 32),
        "mixed": ([p(100), p(900), p(120)], 48),
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _serve(model_dir, pariskv, groups=("short", "crossing", "long", "mixed")):
    return serve(model_dir, pariskv, {g: _prompts()[g] for g in groups})


@pytest.fixture(scope="module")
def plain(model_dir):
    return _serve(model_dir, None)


def test_short_requests_decode_as_sglang_without_retrieval_kernels(model_dir, plain):
    short = _serve(model_dir, CFG, groups=["short"])
    assert short["outs"]["short"] == plain["outs"]["short"]
    st = short["stats"]
    # (how many steps a batch takes depends on scheduling: assert no retrieval, not counts)
    assert st["decode_steps"] > 0 and st["dense_request_steps"] > 0
    assert st["sparse_steps"] == 0 and st["sparse_request_steps"] == 0, st


def test_requests_crossing_the_threshold_match_sglang_until_they_cross(model_dir, plain):
    got = _serve(model_dir, CFG)
    assert got["stats"]["sparse_request_steps"] > 0  # long rows retrieved
    _assert_dense_tokens_are_sglangs(got, plain)


def _assert_dense_tokens_are_sglangs(got, plain):
    """The short requests' outputs, and the crossing ones' up to the threshold, are plain
    SGLang's."""
    dense_tokens = CFG["dense_threshold"] - 220  # prompt 220: dense while seq <= threshold
    for a, b in zip(got["outs"]["crossing"], plain["outs"]["crossing"]):
        assert a[:dense_tokens] == b[:dense_tokens]
    assert got["outs"]["short"] == plain["outs"]["short"]


def test_min_sparse_tokens_above_every_step_is_sglangs_dense_decode(model_dir, plain):
    dense_steps = _serve(model_dir, {**CFG, "min_sparse_tokens": 10**9})
    assert dense_steps["outs"] == plain["outs"]
    st = dense_steps["stats"]
    assert st["sparse_steps"] == 0 and st["sparse_request_steps"] == 0
    assert st["dense_request_steps"] > 0 and not plain["stats"]


def test_the_rerank_by_keys_serves_through_the_captured_graphs(model_dir, plain):
    """--pariskv-rerank keys: the sparse steps run (the rerank reads the K buffers from
    inside the captured graphs), and every token decoded densely is SGLang's own."""
    got = _serve(model_dir, {**CFG, "rerank": "keys"})
    assert got["stats"]["sparse_request_steps"] > 0
    _assert_dense_tokens_are_sglangs(got, plain)
