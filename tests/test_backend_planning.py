"""Host-side decode planning of the ParisKV backend, without a GPU.

The dense FlashInfer planner must see the sparse rows of a mixed batch as 1-token rows
(their dense output is discarded), the sparse planner the true lengths, and the counters
must not count CUDA-graph padding rows (seq_len 1)."""

import dataclasses
import types

import pytest
import torch
from prometheus_client import CollectorRegistry

from sglang_pariskv.attention.backend import ParisKVAttnBackend
from sglang_pariskv.attention.deferred_codes import DeferredCodes
from sglang_pariskv.attention.observability import DecodeObserver
from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.metrics import ParisKVMetrics
from tests.test_plugin_pool import make_pool

LABELS = {"model_name": "m", "tp_rank": "0"}


@pytest.fixture
def backend():
    b = object.__new__(ParisKVAttnBackend)  # host-side state only; no FlashInfer, no GPU
    b.config = ParisKVConfig(topk=100, sink=8, local=32, dense_threshold=1000, min_sparse_tokens=0)
    b.registry = CollectorRegistry()
    metrics = ParisKVMetrics(LABELS, registry=b.registry)
    b.observer = DecodeObserver(num_layers=2, tp_rank=0, metrics=metrics)
    b._dense_dev = torch.zeros(8, dtype=torch.bool)
    b.scale = (0.125, 0.0)
    b.d = 64
    b.deferred = DeferredCodes(make_pool(16), b.config, offloaded=False)
    return b


def batch(lens):
    seq = torch.tensor(lens)
    return types.SimpleNamespace(
        batch_size=len(lens),
        seq_lens=seq.clone(),
        seq_lens_cpu=seq.clone(),
        seq_lens_sum=int(seq.sum()),
    )


def run_plan(b, fb, graph=None, in_capture=False):
    seen = {}

    def plan_dense():
        seen["dense_lens"] = fb.seq_lens_cpu.tolist()
        seen["dense_dev_lens"] = fb.seq_lens.tolist()
        seen["dense_sum"] = fb.seq_lens_sum

    def plan_sparse(seq, sm_scale, logits_soft_cap):
        seen["sparse_lens"] = seq.tolist()
        seen["scale"] = sm_scale

    sparse = types.SimpleNamespace(plan=plan_sparse)
    b._plan_decode(fb, plan_dense, sparse, graph=graph, in_capture=in_capture)
    return seen, sparse


def val(b, name):
    return b.registry.get_sample_value(f"sglang:pariskv_{name}", LABELS) or 0


def test_mixed_batch_plans_sparse_rows_as_one_token_for_the_dense_call(backend):
    fb = batch([5000, 300, 9000])
    seen, sparse = run_plan(backend, fb)
    assert seen["dense_lens"] == [1, 300, 1] == seen["dense_dev_lens"]
    assert seen["dense_sum"] == 302
    assert seen["sparse_lens"] == [5000, 300, 9000] and seen["scale"] == 0.125
    assert fb.seq_lens_cpu.tolist() == [5000, 300, 9000]  # restored after planning
    assert backend._dense_dev[:3].tolist() == [False, True, False]
    assert backend._sparse is sparse
    assert val(backend, "sparse_request_steps_total") == 2
    assert val(backend, "dense_request_steps_total") == 1
    assert val(backend, "attended_tokens_total") == 2 * backend.config.budget
    assert val(backend, "context_tokens_total") == 14000
    assert val(backend, "tokens_encoded_total") == 3


def test_all_dense_batch_takes_the_plain_dense_path(backend):
    fb = batch([400, 1000])
    seen, _ = run_plan(backend, fb)
    assert seen["dense_lens"] == [400, 1000] and "sparse_lens" not in seen
    assert backend._sparse is None
    assert val(backend, "dense_request_steps_total") == 2


def test_graph_padding_rows_are_not_counted(backend):
    fb = batch([5000, 1, 1, 1])  # a captured bs-4 graph replayed for one real request
    seen, _ = run_plan(backend, fb, graph="sparse")
    assert seen["sparse_lens"] == [5000, 1, 1, 1]
    assert val(backend, "tokens_encoded_total") == 1
    assert val(backend, "dense_request_steps_total") == 0
    assert val(backend, "sparse_request_steps_total") == 1


def test_extend_counts_new_and_reused_prefix_tokens(backend):
    fb = types.SimpleNamespace(extend_seq_lens_cpu=[100, 7], extend_prefix_lens_cpu=[0, 4000])
    backend.observer.extend(fb)
    assert val(backend, "tokens_encoded_total") == 107
    assert val(backend, "prefix_tokens_reused_total") == 4000
    assert backend.observer.stats.totals.prefix_tokens_reused == 4000


def test_retrieval_time_is_read_back_at_the_next_sparse_step_and_exported(backend):
    from sglang_pariskv.attention.retrieval_timer import RetrievalTimer
    from tests.test_retrieval_timer import Clock, FakeEvent

    clock = Clock()
    backend.observer.timer = RetrievalTimer(2, make_event=lambda: FakeEvent(clock))
    run_plan(backend, batch([5000]))  # sparse step: armed
    for layer in range(2):  # what forward_decode does around each layer's retrieval
        backend.observer.timer.start(layer)
        clock.now += 1.5
        backend.observer.timer.stop(layer)
    run_plan(backend, batch([300]))  # dense step: reads the last step back, then disarms
    assert backend.observer.stats.retrieval_steps_timed == 1
    assert backend.observer.stats.retrieval_seconds == pytest.approx(0.003)
    backend.observer.timer.start(0)  # a dense step's layers record nothing
    assert backend.observer.timer._events["eager"][0][0].t == 0.0
    count = backend.registry.get_sample_value("sglang:pariskv_retrieval_seconds_count", LABELS)
    total = backend.registry.get_sample_value("sglang:pariskv_retrieval_seconds_sum", LABELS)
    assert count == 1 and total == pytest.approx(0.003)
    assert backend.snapshot()["retrieval_seconds"] == pytest.approx(0.003)


@pytest.mark.parametrize(
    ("lens", "sparse"),
    [([20000], False), ([20000, 500], False), ([20000, 20000], True), ([40000, 300], True)],
)
def test_a_step_below_min_sparse_tokens_attends_densely(backend, lens, sparse):
    """min_sparse_tokens 30000: the long requests of a step must hold 30000 tokens in all,
    else every request of the step takes SGLang's dense call, and counts as dense."""
    backend.config = dataclasses.replace(backend.config, min_sparse_tokens=30000)
    fb = batch(lens)
    seen, _ = run_plan(backend, fb)
    limit = backend.config.dense_threshold
    assert backend.step_is_sparse(fb.seq_lens_cpu) is sparse
    assert ("sparse_lens" in seen) is sparse and (backend._sparse is not None) is sparse
    long = [x > limit for x in lens]
    if sparse:
        assert seen["dense_lens"] == [1 if lg else x for x, lg in zip(lens, long)]
        assert backend._dense_dev[: len(lens)].tolist() == [not lg for lg in long]
    else:
        assert seen["dense_lens"] == lens
    assert val(backend, "sparse_request_steps_total") == (sum(long) if sparse else 0)
    assert val(backend, "dense_request_steps_total") == len(lens) - (sum(long) if sparse else 0)


def test_padding_rows_do_not_change_a_steps_kind(backend):
    backend.config = dataclasses.replace(backend.config, min_sparse_tokens=30000)
    for lens in ([20000], [20000, 20000], [300], [31000]):
        padded = torch.tensor(lens + [1] * 5)
        assert backend.step_is_sparse(torch.tensor(lens)) == backend.step_is_sparse(padded)


def test_a_capture_is_planned_and_timed_but_not_counted(backend):
    """A CUDA-graph capture serves no request: its plan and armed timer make the graph, but
    operators' counters (steps, sparse steps) stay as they were."""
    from sglang_pariskv.attention.retrieval_timer import RetrievalTimer
    from tests.test_retrieval_timer import Clock, FakeEvent

    backend.observer.timer = RetrievalTimer(2, make_event=lambda: FakeEvent(Clock()))
    seen, sparse = run_plan(backend, batch([1, 1]), graph="sparse", in_capture=True)
    assert backend._sparse is sparse and "sparse_lens" in seen
    assert backend.observer.timer._key == "eager"  # the captured layers record events
    st = backend.observer.stats
    assert st.decode_steps == st.sparse_steps == 0 and st.totals.dense_request_steps == 0
    run_plan(backend, batch([5000]), graph="sparse")
    assert st.decode_steps == st.sparse_steps == 1


@pytest.mark.parametrize("local", [256, 0])
@pytest.mark.parametrize(
    ("lens", "graph", "retrieves"),
    [([400, 1000], None, False), ([5000, 300], None, True), ([400, 1, 1, 1], "dense", False),
     ([400, 1, 1, 1], "sparse", True), ([5000, 1], "sparse", True)],
)  # fmt: skip
def test_a_decode_step_defers_its_code_writes_to_the_last_layer(
    backend, lens, graph, retrieves, local
):
    """Eager or captured: a decode step defers its code writes to its last layer, one that
    retrieves too unless its searched zone can hold the new keys (``local`` 0: then it
    writes per layer); a later extend writes per layer again. Planning a replay leaves
    nothing deferred: the graph holds its writes, no layer runs here."""
    cfg = dataclasses.replace(backend.config, local=local)
    backend.config = cfg
    backend.deferred = DeferredCodes(backend.deferred.pool, cfg, offloaded=False)
    defers = not (retrieves and local == 0)
    if graph is not None:
        run_plan(backend, batch(lens), graph=graph, in_capture=False)
        assert backend.deferred.active is False
    run_plan(backend, batch(lens), graph=graph, in_capture=graph is not None)
    assert (backend._sparse is not None) is retrieves
    assert backend.deferred.active is defers
    assert backend.deferred.pool.defer_codes is defers
    backend.deferred.plan(decode_step=False)  # what init_forward_metadata does on extend
    assert backend.deferred.active is False


def test_offload_and_layers_outside_the_pool_never_defer(backend):
    """Host offload never defers, nor a model whose attention layers are not exactly the
    pool's (the deferred write happens at the pool's last layer, which such a model might
    never run); ``min_sparse_tokens`` does (its long rows are counted after the write)."""
    pool = make_pool(16)  # layers 0 and 1
    cfg = dataclasses.replace(backend.config, min_sparse_tokens=30000)
    assert DeferredCodes(pool, backend.config, False, [1, 0]).allowed
    assert DeferredCodes(pool, cfg, False).allowed
    for deferred in (
        DeferredCodes(pool, backend.config, True),
        DeferredCodes(pool, backend.config, False, [0]),
        DeferredCodes(pool, backend.config, False, [0, 1, 2]),
    ):
        deferred.plan(decode_step=True)
        assert deferred.active is False and pool.defer_codes is False
