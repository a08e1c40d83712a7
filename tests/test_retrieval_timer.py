"""RetrievalTimer's host logic with stand-in events (the CUDA events need a GPU)."""

import pytest

from sglang_pariskv.attention.retrieval_timer import RetrievalTimer


class Clock:
    """A fake device clock: events read its time when recorded, and complete only once
    the test says the device has caught up."""

    def __init__(self):
        self.now, self.done_until = 0.0, float("inf")


class FakeEvent:
    def __init__(self, clock):
        self.clock, self.t = clock, None

    def record(self):
        self.t = self.clock.now

    def query(self):
        return self.t is not None and self.t <= self.clock.done_until

    def elapsed_time(self, other):  # ms, like torch.cuda.Event
        return other.t - self.t


def make(layers=3):
    clock = Clock()
    return clock, RetrievalTimer(layers, make_event=lambda: FakeEvent(clock))


def run_layers(clock, timer, durations, skip=()):
    for layer, ms in enumerate(durations):
        if layer in skip:
            continue
        timer.start(layer)
        clock.now += ms
        timer.stop(layer)
        clock.now += 100.0  # the rest of the layer is not retrieval


def test_sums_retrieval_over_layers_and_reports_at_the_next_step():
    clock, timer = make()
    assert timer.begin_step("eager") is None
    run_layers(clock, timer, [1.0, 2.0, 3.0])
    assert timer.begin_step("eager") == 0.006


def test_a_step_still_running_is_skipped_not_waited_for():
    clock, timer = make()
    timer.begin_step(4)
    run_layers(clock, timer, [1.0, 1.0, 1.0])
    clock.done_until = 50.0  # the device has not reached the last layer's stop event
    assert timer.begin_step(4) is None


def test_graph_replays_reuse_the_events_recorded_at_capture():
    """At replay no Python runs: the graph re-records the captured events itself."""
    clock, timer = make(2)
    timer.begin_step(8)  # capture
    run_layers(clock, timer, [1.0, 1.0])
    timer.begin_step(8)  # a replay: the graph records the same events
    ev = timer._events[8]
    for start, stop in ev:
        start.t, stop.t = clock.now, clock.now + 4.0
    assert timer.begin_step(8) == 0.008


def test_unrecorded_layers_and_dense_steps_are_left_out():
    clock, timer = make(3)
    timer.begin_step("eager")
    run_layers(clock, timer, [1.0, 5.0, 2.0], skip={1})  # layer 1: cross-attention
    assert timer.disarm() == 0.003  # next step is all dense: read back, nothing armed
    run_layers(clock, timer, [9.0, 9.0, 9.0])
    assert timer.poll() is None


@pytest.mark.parametrize(
    "metrics, stats_dir, on_cuda, timed",
    [
        (True, None, True, True),
        (False, "d", True, True),
        (False, None, True, False),
        (True, "d", False, False),  # timing events need CUDA
    ],
)
def test_timing_is_on_when_something_reads_it(tmp_path, metrics, stats_dir, on_cuda, timed):
    from types import SimpleNamespace

    from sglang_pariskv.attention.observability import DecodeObserver
    from sglang_pariskv.config import ParisKVConfig

    cfg = ParisKVConfig(stats_dir=str(tmp_path / stats_dir) if stats_dir else None)
    args = SimpleNamespace(enable_metrics=metrics, served_model_name="m", model_path="m")
    obs = DecodeObserver.for_server(
        num_layers=2, tp_rank=1, server_args=args, config=cfg, on_cuda=on_cuda
    )
    assert (obs.timer is not None) is timed
    assert obs.metrics is None  # rank 1 never exports: rank 0 counts every request
    assert (obs.path is not None) is (stats_dir is not None)
