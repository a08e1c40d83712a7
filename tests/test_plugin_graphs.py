"""Dense-step CUDA graphs: each decode batch size is captured with and without the
retrieval path, and a replay takes the graph its own plan needs.

The hooks wrap SGLang's decode graph runner; here they run around a stand-in capture
and resolve (a real capture needs a GPU) against the host-side backend of
test_backend_planning, whose ``_plan_decode`` is the real one."""

import dataclasses
import inspect
import logging
import pkgutil
import random
import types

import pytest
import torch
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sglang_pariskv import plugin
from sglang_pariskv.attention.step_graphs import StepGraphs
from tests.test_backend_planning import backend, batch  # noqa: F401  (fixture)

CAPTURE_SIZES = (8, 4, 2, 1)  # SGLang captures the largest first


@pytest.fixture
def hooks_on(monkeypatch):
    monkeypatch.setattr(plugin, "_graph_hooks_applied", True)


@pytest.fixture
def graph_backend(backend, monkeypatch):  # noqa: F811
    """The host-side backend with SGLang's FlashInfer graph metadata faked as it behaves:
    every capture makes new decode wrappers and keeps only the last per batch size in
    ``decode_cuda_graph_metadata``; a replay plans ``decode_cuda_graph_metadata[bs]``."""

    def flashinfer_out_graph(self, fb, in_capture=False):
        bs = fb.batch_size
        if in_capture:
            self.decode_cuda_graph_metadata[bs] = self.forward_metadata = object()
        else:
            self.planned.append(self.decode_cuda_graph_metadata[bs])

    monkeypatch.setattr(
        FlashInferAttnBackend, "init_forward_metadata_out_graph", flashinfer_out_graph
    )
    stand_in = types.SimpleNamespace(plan=lambda *a, **k: None)
    backend.__dict__.update(
        decode_cuda_graph_metadata={}, planned=[], graphs=StepGraphs(),
        graph_sparse=dict.fromkeys(CAPTURE_SIZES, stand_in),
        token_to_kv_pool=types.SimpleNamespace(),
    )  # fmt: skip
    return backend


def fake_runner(b):
    return types.SimpleNamespace(attn_backend=b)


def decode_batch(lens):
    fb = batch(lens)
    fb.forward_mode = ForwardMode.DECODE
    return fb


def capture_all(b, runner, base_label=None):
    """What DecodeCudaGraphRunner.capture does per size, with a stand-in capture that
    runs the backend's capture-time init on the capture batch (every row seq_len 1) and
    records, per graph key, whether the graph holds the retrieval path and the FlashInfer
    wrappers its kernels were recorded with."""
    graphs, wrappers = {}, {}

    def capture_one_shape(runner_, size, forward, stream_idx=None, variant_label=None):
        assert runner_ is runner and stream_idx is None
        b.init_forward_metadata_out_graph(decode_batch([1] * size), in_capture=True)
        graphs[(size, variant_label)] = b._sparse is not None
        wrappers[(size, variant_label)] = b.forward_metadata

    for size in CAPTURE_SIZES:
        plugin._around_capture_one_shape(capture_one_shape, runner, size, None, None, base_label)
    return graphs, wrappers


def replay(b, runner, lens, base_label=None, host_lengths=True):
    """SGLang's replay: pad to the next captured size with seq_len-1 rows, init the
    metadata on the padded view, then resolve the graph's label from the real batch.
    Returns the graph key, whether the plan ran retrieval, and the wrappers planned.
    ``host_lengths`` False: batches built without ``seq_lens_cpu`` (device lengths only)."""
    size = min(s for s in CAPTURE_SIZES if s >= len(lens))
    padded, real = decode_batch(lens + [1] * (size - len(lens))), batch(lens)
    if not host_lengths:
        padded.seq_lens_cpu = real.seq_lens_cpu = None
    b.init_forward_metadata_out_graph(padded, in_capture=False)
    label = plugin._around_graph_variant(lambda r, fb: base_label, runner, real)
    return (size, label), b._sparse is not None, b.planned[-1]


def test_graph_targets_are_sglang_decode_runner_methods_with_the_hooked_signatures():
    capture = pkgutil.resolve_name(plugin._GRAPH_TARGETS["capture_one_shape"])
    resolve = pkgutil.resolve_name(plugin._GRAPH_TARGETS["graph_variant"])
    params = list(inspect.signature(capture).parameters.values())
    names = [p.name for p in params]
    assert names[:5] == ["self", "size", "forward", "stream_idx", "variant_label"]
    # later releases append parameters (attention_variant); the hook passes them through
    assert all(p.default is None for p in params[3:]), names
    assert list(inspect.signature(resolve).parameters) == ["self", "forward_batch"]


def test_parameters_sglang_appends_to_a_capture_reach_it_unchanged(graph_backend, hooks_on):
    b, seen = graph_backend, []

    def capture_one_shape(runner_, size, forward, stream_idx, variant_label, extra):
        seen.append((variant_label, extra))

    plugin._around_capture_one_shape(capture_one_shape, fake_runner(b), 4, None, None, None, "dsa")
    assert seen == [("pariskv_sparse", "dsa"), ("pariskv_dense", "dsa")]


def test_each_size_is_captured_with_and_without_retrieval(graph_backend, hooks_on):
    b = graph_backend
    graphs, wrappers = capture_all(b, fake_runner(b))
    want = {}
    for size in CAPTURE_SIZES:
        want[(size, "pariskv_sparse")] = True  # holds retrieval though every row is short
        want[(size, "pariskv_dense")] = False
    assert graphs == want
    assert b.graphs.captured and b.graphs.capture_step is None
    assert len({id(w) for w in wrappers.values()}) == len(wrappers)  # one set per graph


@pytest.mark.parametrize("min_sparse_tokens", [0, 2500])
def test_a_replay_takes_a_captured_graph_that_matches_its_plan(
    graph_backend, hooks_on, min_sparse_tokens
):
    """The key exists, the graph holds retrieval iff the plan ran it iff the step needs
    it, and SGLang's replay-time FlashInfer plan goes to the wrappers that graph's
    kernels were recorded with (each wrapper owns the int workspace its plan fills)."""
    b = graph_backend
    b.config = dataclasses.replace(b.config, min_sparse_tokens=min_sparse_tokens)
    runner = fake_runner(b)
    graphs, wrappers = capture_all(b, runner)
    limit = max(b.config.dense_threshold, b.config.budget)
    rng = random.Random(0)
    seen = set()
    for i in range(300):
        n = rng.randint(1, max(CAPTURE_SIZES))
        lens = [rng.choice([2, limit, limit + 1, rng.randint(2, 3 * limit)]) for _ in range(n)]
        key, planned_sparse, planned_wrappers = replay(b, runner, lens, host_lengths=i % 3 > 0)
        assert key in graphs, key
        long_tokens = sum(x for x in lens if x > limit)
        needs = long_tokens > 0 and long_tokens >= min_sparse_tokens
        assert graphs[key] == planned_sparse == needs, (lens, key)
        assert planned_wrappers is wrappers[key], (lens, key)
        if needs:
            assert b._dense_dev[: len(lens)].tolist() == [x <= limit for x in lens]
        seen.add(key[1])
    assert seen == {"pariskv_sparse", "pariskv_dense"}


def test_a_patched_sglang_captures_and_replays_the_variants_the_backend_declares(
    graph_backend, monkeypatch
):
    """An SGLang built with patches/ (no runner hooks): its decode graph runner asks the
    backend for its graph variants, captures each label per size with the label set as
    its capture-time attention variant, and replays the one ``select`` names. Each graph
    holds retrieval iff it is the sparse one, and a replay plans the wrappers of the graph
    it replays, whose retrieval matches the step's need."""
    from sglang_pariskv import sglang_compat

    b = graph_backend
    current = {"label": None}
    monkeypatch.setattr(sglang_compat, "capture_attention_variant", lambda: current["label"])
    variants = b.decode_graph_variants()
    assert variants.capture_labels == ("sparse", "dense")
    graphs, wrappers = {}, {}
    for size in CAPTURE_SIZES:
        for label in variants.capture_labels:
            current["label"] = label
            b.init_forward_metadata_out_graph(decode_batch([1] * size), in_capture=True)
            graphs[(size, label)] = b._sparse is not None
            wrappers[(size, label)] = b.forward_metadata
    current["label"] = None
    assert graphs == {(s, g): g == "sparse" for s in CAPTURE_SIZES for g in ("sparse", "dense")}
    limit = max(b.config.dense_threshold, b.config.budget)
    rng = random.Random(1)
    for _ in range(100):
        n = rng.randint(1, max(CAPTURE_SIZES))
        lens = [rng.choice([2, limit, limit + 1, 3 * limit]) for _ in range(n)]
        size = min(s for s in CAPTURE_SIZES if s >= n)
        b.init_forward_metadata_out_graph(decode_batch(lens + [1] * (size - n)), in_capture=False)
        key = (size, variants.select(batch(lens)))
        needs = any(x > limit for x in lens)
        assert graphs[key] == (b._sparse is not None) == needs, lens
        assert b.planned[-1] is wrappers[key]


def test_without_the_runner_hooks_every_graph_holds_retrieval(graph_backend, monkeypatch):
    """Hooks that did not take (another SGLang runner): one graph per size, which holds
    retrieval, and dense rows of a replay are selected out."""
    b = graph_backend
    monkeypatch.setattr(plugin, "_graph_hooks_applied", False)
    runner = fake_runner(b)
    graphs, wrappers = capture_all(b, runner)
    assert graphs == {(s, None): True for s in CAPTURE_SIZES}
    assert not b.graphs.captured
    key, planned_sparse, planned_wrappers = replay(b, runner, [300, 400])
    assert key == (2, None) and planned_sparse
    assert planned_wrappers is wrappers[key]
    assert b._dense_dev[:2].tolist() == [True, True]


def test_a_missing_graph_hook_is_logged_and_turns_dense_graphs_off(monkeypatch, caplog):
    monkeypatch.setattr(plugin, "_graph_hooks_applied", True)
    with caplog.at_level(logging.WARNING, logger="sglang_pariskv"):
        assert not plugin._check_graph_hooks({plugin._GRAPH_TARGETS["capture_one_shape"]})
    assert "could not hook" in caplog.text and not plugin._graph_hooks_applied
    assert plugin._check_graph_hooks(set(plugin._GRAPH_TARGETS.values()))


def test_an_unknown_graph_name_is_refused(backend):  # noqa: F811
    backend.graphs = StepGraphs()
    with pytest.raises(ValueError, match="unknown decode graph"):
        with backend.capturing("sparse-ish"):
            pass
    with pytest.raises(ValueError, match="unknown decode graph"):
        backend._plan_decode(batch([5]), lambda: None, None, graph="both")
    assert torch.is_tensor(backend._dense_dev)


INSTALL_SCRIPT = """
import types
import torch
import tests.conftest  # the sgl_kernel stand-in on a machine without a GPU
from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner
from sglang_pariskv import plugin
from sglang_pariskv.attention.backend import ParisKVAttnBackend
from sglang_pariskv.attention.step_graphs import StepGraphs
from sglang_pariskv.config import ParisKVConfig

plugin.enable(ParisKVConfig())
assert plugin._graph_hooks_applied
b = object.__new__(ParisKVAttnBackend)
b.graphs, b.config = StepGraphs(), ParisKVConfig()
b.graphs.captured = True
runner = object.__new__(DecodeCudaGraphRunner)
runner.attn_backend = b
runner.record_nolora_graph = False  # no LoRA: SGLang's own label is None
fb = types.SimpleNamespace(lora_ids=None, batch_size=1, seq_lens_cpu=torch.tensor([100000]))
print(DecodeCudaGraphRunner._resolve_lora_variant(runner, fb))
"""


def test_enabling_hooks_sglangs_real_decode_graph_runner():
    """plugin.enable applies both hooks to SGLang's class (in a child process: hooks are
    process-wide), and the wrapped method labels a long request's step as sparse."""
    from tests.child_python import run_script

    assert run_script(INSTALL_SCRIPT)[-1] == "pariskv_sparse"
