"""Prefill staging alone (``offload.prefill_staging``): each layer read holds the host rows
of the planned slots, in FlashInfer's order, whatever was copied ahead of it, by the UVA
gather or run by run; the oracle is the host pool indexed by the slots. No SGLang: the
gpu tests run on a host with torch, Triton and nvcc only."""

import pytest
import torch

from sglang_pariskv.offload.host_pool import HostKVPool
from sglang_pariskv.offload.prefill_staging import MIN_MEAN_RUN, PrefillStaging, slot_runs

HKV, D = 2, 16


def _check_staged_rows(device: str, pin: bool, use_kernel: bool | None) -> PrefillStaging:
    gen = torch.Generator().manual_seed(0)
    host = HostKVPool(300, 3, HKV, D, dtype=torch.bfloat16, pin=pin, check_memory=False)
    host.data.copy_(torch.randn(host.data.shape, generator=gen))
    st = PrefillStaging(host, rows=64, device=device)
    slots = torch.randperm(300, generator=gen)[:40].to(torch.int32)
    rows = st.plan(slots.to(device))
    assert rows.tolist() == list(range(40)) and st.active
    for layer in (2, 0):
        k, v = st.layer_kv(layer, use_kernel=use_kernel)
        for got, part in ((k, 0), (v, 1)):
            want = host.data[layer, part][slots.long()]
            torch.testing.assert_close(got[:40].cpu(), want, rtol=0, atol=0)
    return st


INTERPRETED_KERNEL = pytest.param(
    True,
    marks=pytest.mark.skipif(
        torch.cuda.is_available(),
        reason="the kernel over CPU tensors runs in Triton's interpreter: needs a GPU-less "
        "host (the gpu test below runs it from pinned host memory)",
    ),
)


@pytest.mark.parametrize("use_kernel", [False, INTERPRETED_KERNEL])
def test_staged_rows_are_the_host_rows_of_the_planned_slots(use_kernel):
    """Torch's copy, and the UVA gather kernel (Triton's interpreter on the CPU)."""
    st = _check_staged_rows("cpu", pin=False, use_kernel=use_kernel)
    assert st.counters == {"prefill_staged_extends": 1, "prefill_staged_rows": 40,
                           "prefill_direct_extends": 0}  # fmt: skip


@pytest.mark.gpu
def test_the_gpu_gathers_staged_rows_from_pinned_host_memory():
    _check_staged_rows("cuda", pin=True, use_kernel=None)


def _layer_reads(device: str, pin: bool, order: list[int], replan_after: int | None, runs: bool):
    """Read ``order``'s layers from a staging of 4 layers; every read must hold that
    layer's host rows of the planned slots, whatever was copied ahead before it. ``runs``:
    the slots lie in long runs of consecutive slots (copied run by run), else scattered
    (gathered row by row)."""
    gen = torch.Generator().manual_seed(1)
    host = HostKVPool(1200, 4, HKV, D, dtype=torch.bfloat16, pin=pin, check_memory=False)
    host.data.copy_(torch.randn(host.data.shape, generator=gen))
    st = PrefillStaging(host, rows=600, device=device)

    def some_slots(n: int) -> torch.Tensor:
        if runs:  # two runs at a random place
            a, b = (int(x) for x in torch.randint(0, 1200 - n, (2,), generator=gen))
            s = torch.cat([torch.arange(a, a + n // 2), torch.arange(b, b + n - n // 2)])
        else:
            s = torch.randperm(1200, generator=gen)[:n]
        return s.to(torch.int32)

    slots = some_slots(600)
    st.plan(slots.to(device))
    assert (st.runs is not None) == runs
    gathered, copy = [], st.copy_layer
    st.copy_layer = lambda layer, *a: (gathered.append(layer), copy(layer, *a))
    held = []
    for i, layer in enumerate(order):
        if i == replan_after:  # the next chunk: other slots, same layers
            slots = some_slots(520)
            st.plan(slots.to(device))
        k, v = st.layer_kv(layer)
        n = slots.numel()
        for got, part in ((k, 0), (v, 1)):
            want = host.data[layer, part][slots.long()]
            torch.testing.assert_close(got[:n].cpu(), want, rtol=0, atol=0)
        held.append(k.data_ptr())
    return st, held, gathered


def _gathered_when_read(order: list[int], replan_after: int | None) -> list[int]:
    """Without copies ahead: each read copies its layer, unless it read the same layer of
    the same plan just before."""
    out = []
    for i, layer in enumerate(order):
        if i == 0 or i == replan_after or order[i - 1] != layer:
            out.append(layer)
    return out


ORDERS = [  # (layers read, a new plan before read i, every layer copied in turn, in runs)
    ([0, 1, 2, 3], None, [0, 1, 2, 3]),  # a forward pass: each layer copied once, ahead
    ([0, 0, 1, 1, 2], None, [0, 1, 2, 3]),  # a layer read twice is not copied again
    ([2, 0, 3, 1], None, [2, 3, 0, 1, 3, 1, 2]),  # out of order: copied when read
    ([0, 1, 2, 3, 0, 1, 2, 3], 4, [0, 1, 2, 3] * 2),  # the next chunk's plan
    ([0, 1, 0, 1], 2, [0, 1, 2, 0, 1, 2]),  # re-planned after a copy ahead nobody read
]


@pytest.mark.parametrize("runs", [True, False], ids=["runs", "scattered"])
@pytest.mark.parametrize("order,replan_after,copies", ORDERS)
def test_each_layer_read_holds_its_rows(order, replan_after, copies, runs):
    """In runs the next layer is copied ahead; scattered rows are gathered when read."""
    st, held, gathered = _layer_reads("cpu", False, order, replan_after, runs)
    assert gathered == (copies if runs else _gathered_when_read(order, replan_after))
    # layers alternate between the two pairs, so a copy ahead never overwrites the pair
    # the current layer's attention reads
    assert held == [st.kv[layer % 2][0].data_ptr() for layer in order]


@pytest.mark.gpu
@pytest.mark.parametrize("runs", [True, False], ids=["runs", "scattered"])
@pytest.mark.parametrize("order,replan_after,copies", ORDERS)
def test_the_gpu_copies_the_next_layer_on_a_side_stream(order, replan_after, copies, runs):
    gathered = _layer_reads("cuda", True, order, replan_after, runs)[2]
    assert gathered == (copies if runs else _gathered_when_read(order, replan_after))


@pytest.mark.parametrize("n", [0, 1, 7, 300])
def test_slot_runs_are_the_maximal_runs_of_consecutive_slots(n):
    gen = torch.Generator().manual_seed(n)
    # runs of random lengths at random places, some adjacent to each other
    slots = []
    while len(slots) < n:
        start = int(torch.randint(0, 10_000, (1,), generator=gen))
        slots += range(start, start + int(torch.randint(1, 40, (1,), generator=gen)))
    slots = torch.tensor(slots[:n], dtype=torch.int32)
    runs = slot_runs(slots)
    # brute force: rebuild the slots from the runs, and no run continues into the next
    rebuilt = [s + i for s, _, length in runs for i in range(length)]
    assert rebuilt == slots.tolist()
    assert [row for _, row, _ in runs] == [sum(r[2] for r in runs[:i]) for i in range(len(runs))]
    assert all(a[0] + a[2] != b[0] for a, b in zip(runs, runs[1:]))
    if runs:
        assert slot_runs(slots, max_runs=len(runs)) == runs
        assert slot_runs(slots, max_runs=len(runs) - 1) is None


def _plan_with_runs(device: str, pin: bool):
    """A prefix of two long runs (one request on an unfragmented pool): copied run by
    run, and each layer read holds its rows, with the next copied ahead."""
    gen = torch.Generator().manual_seed(2)
    host = HostKVPool(1200, 3, HKV, D, dtype=torch.bfloat16, pin=pin, check_memory=False)
    host.data.copy_(torch.randn(host.data.shape, generator=gen))
    st = PrefillStaging(host, rows=1024, device=device)
    slots = torch.cat([torch.arange(600, 1000), torch.arange(17, 317)]).to(torch.int32)
    st.plan(slots.to(device))
    assert st.runs == [(600, 0, 400), (17, 400, 300)]
    for layer in (0, 1, 2, 0):
        k, v = st.layer_kv(layer, use_kernel=True)  # runs take precedence over the kernel
        for got, part in ((k, 0), (v, 1)):
            want = host.data[layer, part][slots.long()]
            torch.testing.assert_close(got[:700].cpu(), want, rtol=0, atol=0)
    # fragmented slots (500 runs of one slot: a mean run under MIN_MEAN_RUN) are gathered
    assert MIN_MEAN_RUN > 1
    st.plan(torch.arange(0, 1000, 2, dtype=torch.int32).to(device))
    assert st.runs is None


def test_a_prefix_in_long_runs_is_copied_run_by_run():
    _plan_with_runs("cpu", pin=False)


@pytest.mark.gpu
def test_the_gpu_copies_runs_from_pinned_host_memory():
    _plan_with_runs("cuda", pin=True)


def test_a_batch_the_buffer_cannot_hold_or_must_not_stage_reads_host_memory():
    host = HostKVPool(300, 1, HKV, D, dtype=torch.float32, pin=False, check_memory=False)
    st = PrefillStaging(host, rows=64, device="cpu")
    assert st.plan(torch.arange(65, dtype=torch.int32)) is None and not st.active
    assert st.plan(None) is None and not st.active
    assert st.counters["prefill_direct_extends"] == 2
    assert st.counters["prefill_staged_extends"] == 0
    st.plan(torch.arange(3, dtype=torch.int32))
    st.clear()
    assert not st.active
