"""The plan fence: a batch's FlashInfer plans start only once the previous batch's plan
copies have run (``attention.plan_fence``).

On the GPU the test reproduces the hazard with a real FlashInfer wrapper: a plan whose
copy is queued behind a long kernel has its page-locked schedule rewritten by the next
plan, unless the fence is used."""

import contextlib
import types

import pytest
import torch
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sglang_pariskv.attention.plan_fence import PlanFence
from tests.test_backend_planning import backend  # noqa: F401 - fixture


class PendingEvent:
    """A recorded event the GPU has (``done``) or has not reached yet."""

    def __init__(self, done: bool):
        self.done, self.synchronized, self.recorded, self.queried = done, 0, 0, 0

    def query(self) -> bool:
        self.queried += 1
        return self.done

    def synchronize(self) -> None:
        self.synchronized += 1
        self.done = True

    def record(self) -> None:
        self.recorded += 1
        self.done = False


def _gpu_fence(monkeypatch, done: bool, capturing: bool = False) -> PlanFence:
    """A fence as on a GPU, whose last batch's event is ``done`` or still queued."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    fence = PlanFence("cpu")
    fence.on_cuda = True
    fence._event = PendingEvent(done)
    return fence


@pytest.mark.parametrize("done", [True, False])
def test_planning_waits_only_while_the_last_batchs_copies_are_queued(monkeypatch, done):
    fence = _gpu_fence(monkeypatch, done)
    with fence.planning():
        assert fence._event.done  # the plan runs after the previous copies
    assert fence.waits == (0 if done else 1)
    assert fence._event.synchronized == (0 if done else 1)
    assert fence._event.recorded == 1  # behind this batch's plans, for the next batch


def test_a_plan_inside_a_graph_capture_neither_waits_nor_records(monkeypatch):
    fence = _gpu_fence(monkeypatch, done=False, capturing=True)
    with fence.planning():
        pass
    event = fence._event
    assert (event.queried, event.synchronized, event.recorded, fence.waits) == (0, 0, 0, 0)


def test_a_cpu_fence_records_nothing():
    fence = PlanFence("cpu")
    with fence.planning():
        pass
    assert fence._event is None and fence.waits == 0


class RecordingFence(PlanFence):
    def __init__(self, log: list):
        super().__init__("cpu")
        self.log = log

    @contextlib.contextmanager
    def planning(self):
        self.log.append("fence: wait")
        yield
        self.log.append("fence: record")


def _sglang_planner(log):
    def init_forward_metadata_out_graph(self, forward_batch, in_capture=False):
        log.append("sglang plan")

    def init_forward_metadata(self, forward_batch):
        log.append("sglang plan")

    return init_forward_metadata_out_graph, init_forward_metadata


def test_every_planning_entry_point_plans_inside_the_fence(backend, monkeypatch):  # noqa: F811
    log: list[str] = []
    out_graph, eager = _sglang_planner(log)
    monkeypatch.setattr(FlashInferAttnBackend, "init_forward_metadata_out_graph", out_graph)
    monkeypatch.setattr(FlashInferAttnBackend, "init_forward_metadata", eager)
    backend.plan_fence = RecordingFence(log)
    backend.eager_sparse = types.SimpleNamespace(
        plan=lambda seq, sm_scale, logits_soft_cap: log.append("sparse plan")
    )
    extend = types.SimpleNamespace(
        forward_mode=ForwardMode.EXTEND,
        batch_size=1,
        extend_seq_lens_cpu=[10],
        extend_prefix_lens_cpu=[0],
    )
    backend.init_forward_metadata(extend)
    backend.init_forward_metadata_out_graph(extend)
    seq = torch.tensor([5000, 300])
    decode = types.SimpleNamespace(
        forward_mode=ForwardMode.DECODE,
        batch_size=2,
        seq_lens=seq.clone(),
        seq_lens_cpu=seq.clone(),
        seq_lens_sum=int(seq.sum()),
        req_pool_indices=torch.tensor([3, 4]),
    )
    backend.init_forward_metadata(decode)
    batch = ["fence: wait", "sglang plan", "fence: record"]
    assert log == batch + batch + ["fence: wait", "sglang plan", "sparse plan", "fence: record"]


def _decode_wrapper(device):
    from flashinfer import BatchDecodeWithPagedKVCacheWrapper

    ws = torch.empty(128 * 2**20, dtype=torch.uint8, device=device)
    return BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)


def _plan(wrapper, lens: list[int]):
    """Plan one head-as-batch call (8 query heads per KV head, head_dim 128, page size 1),
    as the sparse decode call does."""
    n = torch.tensor(lens, dtype=torch.int32)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int32), n.cumsum(0).to(torch.int32)])
    indices = torch.arange(int(n.sum()), dtype=torch.int32, device="cuda")
    wrapper.plan(
        indptr,
        indices,
        torch.ones(len(lens), dtype=torch.int32),
        num_qo_heads=8,
        num_kv_heads=1,
        head_dim=128,
        page_size=1,
        q_data_type=torch.bfloat16,
        kv_data_type=torch.bfloat16,
    )


def _schedule_after(wrapper, fence: PlanFence, first: list[int], second: list[int]):
    """The device schedule batch ``first`` would run with when its plan copy is queued
    behind a long kernel and ``second`` is planned right after it on the host."""
    schedule = wrapper._int_workspace_buffer
    schedule.zero_()
    torch.cuda._sleep(500_000_000)  # ~0.3 s of GPU time ahead of the copy
    with fence.planning():
        _plan(wrapper, first)
    seen = schedule.clone()  # stream-ordered: what batch `first`'s kernels would read
    with fence.planning():
        _plan(wrapper, second)
    torch.cuda.synchronize()
    return seen


@pytest.mark.gpu
def test_the_fence_keeps_a_queued_plan_copy_from_taking_the_next_batchs_schedule(cuda_device):
    wrapper = _decode_wrapper(cuda_device)
    first, second = [700, 90, 4000], [6000] * 11

    def idle_schedule(lens):
        wrapper._int_workspace_buffer.zero_()
        _plan(wrapper, lens)
        torch.cuda.synchronize()
        return wrapper._int_workspace_buffer.clone()

    # `second` first: a plan writes only its own fields of the host buffer, so the bytes
    # between them are whatever the plans before left there (here, `second`'s), in every
    # scenario below alike.
    other = idle_schedule(second)
    expected = idle_schedule(first)
    assert not torch.equal(expected, other)  # the two schedules differ
    unfenced = _schedule_after(wrapper, PlanFence("cpu"), first, second)
    if torch.equal(unfenced, expected):
        pytest.skip("this FlashInfer's plan copy no longer reads a rewritten host buffer")
    fence = PlanFence(cuda_device)
    with fence.planning():  # an earlier batch's plan, so the fence holds an event
        pass
    torch.cuda.synchronize()
    assert torch.equal(_schedule_after(wrapper, fence, first, second), expected)
    assert fence.waits == 1  # the second plan waited for the first one's copy
