"""Host offload through real SGLang engines (GPU): the same tokens as plain SGLang.

A small Llama-shaped model with SGLang's seeded dummy weights serves the same prompts
with and without ``--pariskv-offload host``, in chunks of 256 tokens so that every
chunk after the first attends over a prefix (staged from host memory,
``offload.prefill_staging``). With the dense threshold above every request, ParisKV's
decode is SGLang's dense decode over the host pool's CUDA views and its prefill is
FlashInfer's over the staged copy of the same rows: the greedy outputs must match token
for token; with retrieving decode, offload gives the GPU pool's tokens. A prompt of a few
tokens is served too.
"""

import pytest

from tests.tiny_engine import serve, write_tiny_llama

pytestmark = pytest.mark.gpu

# every request (at most 1,300 + 24 tokens) is at or below the dense threshold
OFFLOAD = {
    "topk": 64, "sink": 8, "local": 32, "dense_threshold": 2048, "offload": "host",
    "host_pool_gb": 1.0,
}  # fmt: skip


def _prompts() -> dict[str, tuple[list[list[int]], int]]:
    import random

    rng = random.Random(0)

    def p(n):
        return [rng.randrange(3, 2048) for _ in range(n)]

    return {"long": ([p(900), p(1300), p(700)], 24), "tiny": ([p(6)], 8)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _serve(model_dir, pariskv, groups=("long", "tiny")):
    # chunks of 256 tokens: every chunk after a request's first attends over a prefix
    prompts = _prompts()
    return serve(model_dir, pariskv, {g: prompts[g] for g in groups}, chunked_prefill_size=256)


@pytest.fixture(scope="module")
def plain(model_dir):
    return _serve(model_dir, None)


@pytest.fixture(scope="module")
def offloaded(model_dir):
    return _serve(model_dir, OFFLOAD)


def test_offloaded_prefill_and_decode_give_sglangs_tokens(plain, offloaded):
    assert offloaded["outs"]["long"] == plain["outs"]["long"]
    st = offloaded["stats"]
    # 900 + 1300 + 700 tokens in chunks of 256: every chunk after a request's first is staged
    assert st["prefill_staged_extends"] > 0 and st["prefill_staged_rows"] > 0, st
    assert st["sparse_request_steps"] == 0 and st["dense_request_steps"] > 0, st


def test_offloaded_sparse_decode_gives_the_gpu_pools_tokens(model_dir):
    """Retrieving decode over the hot cache reads the same rows as over the GPU pool, and
    the codes are the same, so ParisKV gives the same tokens with and without offload."""
    sparse = {**OFFLOAD, "dense_threshold": 256, "min_sparse_tokens": 0}
    on_gpu = {k: v for k, v in sparse.items() if k not in ("offload", "host_pool_gb")}
    want = _serve(model_dir, on_gpu, ["long"])
    got = _serve(model_dir, sparse, ["long"])
    st = got["stats"]
    assert st["sparse_request_steps"] > 0 and st["hot_cache_hits"] > 0, st
    assert st["prefill_staged_extends"] > 0, st
    assert got["outs"] == want["outs"]


def test_a_prompt_of_a_few_tokens_is_served_over_offload(plain, offloaded):
    assert offloaded["outs"]["tiny"] == plain["outs"]["tiny"]
