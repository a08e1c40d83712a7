"""Retrieval reuse in the decode workspace (kernels/reuse.py, the reuse stage and the
assembly's kept buffer) against the codec's rule (codec/reuse.py), step after step."""

import dataclasses

import pytest
import torch

from sglang_pariskv.codec.reuse import KeptSelection, retrieve_with_reuse
from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.kernels import DecodeWorkspace
from sglang_pariskv.kernels.reuse import ReuseState
from tests.kernel_cases import make_scenario, padded_codes
from tests.test_kernels_workspace import SMALL, rows_of

DEV = "cuda" if torch.cuda.is_available() else "cpu"
H, G, D = 2, 2, 64
CFG = ParisKVConfig(
    topk=24, sink=4, local=8, dense_threshold=100, reuse_threshold=0.9, reuse_max_age=3
)


def workspace(cfg=CFG):
    return DecodeWorkspace(cfg, H * G, H, D, max_batch=4, max_context=720, device=DEV, **SMALL)


def slot_sets(sc, ref, r, heads=H):
    """{head: set of slots} of request r from the codec's positions."""
    rtt = sc.req_to_token[sc.req_pool_indices.long()]
    pos = ref.positions.to(rtt.device)
    return {h: set(rtt[r][pos[r, h][ref.valid[r, h]]].tolist()) for h in range(heads)}


def moved(q, r, h, gen, heads=H, group=G):
    """q with (request r, KV head h)'s group pointing somewhere new."""
    d = q.shape[-1]
    q = q.clone().view(q.shape[0], heads, group, d)
    q[r, h] = torch.randn(group, d, generator=gen).to(q)
    return q.view(q.shape[0], heads * group, d)


def run_steps(sc, full, queries, cfg, ws, heads, dev, replay=None, max_diff=0):
    """Decode ``queries`` one step (one token) at a time through ``ws`` with reuse and the
    codec's rule side by side; every row's attended slots must be the codec's. ``replay``:
    a function (ws, args) -> callable that runs the step (a CUDA graph replay), else eager.
    ``max_diff``: slots a row may differ by (rounding at the top-k boundary).
    Returns the per-step retrieved flags."""
    state = ReuseState(sc.req_to_token.shape[0], 1, heads, ws.d, ws.kept_width, dev)
    kept = KeptSelection.empty(len(full), heads, ws.d, cfg.reuse_kept, device=dev)
    fresh_log, run = [], None
    for step, q in enumerate(queries):
        seq = torch.tensor([n - len(queries) + step for n in full], dtype=torch.int32)
        sc.seq_lens = seq.to(dev)
        ws.plan(seq)
        q_in = queries[0] if replay is not None else q
        if replay is not None:
            q_in.copy_(q)
        args = (q_in, sc.pool, sc.req_to_token, sc.req_pool_indices)
        if replay is None:
            out = ws.run(*args, reuse=state.layer(0))
        else:
            run = run or replay(ws, args, state.layer(0))
            out = run()
        ref, kept, retrieved = retrieve_with_reuse(
            q.double(), padded_codes(sc), seq.long().to(dev), cfg, kept
        )
        fresh = ws.reuse_fresh[: len(full)].cpu().bool()
        assert torch.equal(fresh, retrieved.any(-1).cpu()), step
        fresh_log.append(fresh.tolist())
        got = rows_of(out, heads)
        for r, n in enumerate(seq.tolist()):
            if n <= cfg.dense_threshold:
                continue
            want = slot_sets(sc, ref, r, heads)
            for h in range(heads):
                assert len(got[r, h]) == len(set(got[r, h])) == cfg.budget, (step, r, h)
                assert len(set(got[r, h]) ^ want[h]) <= 2 * max_diff, (step, r, h)
        counts = out.num_candidates.cpu()
        assert (counts[~fresh] == 0).all() and (counts[fresh & (seq > 100)] > 0).all()
    return fresh_log, state


def test_reuse_follows_the_codec_step_by_step():
    full = [710, 95, 560]  # request 1 stays dense (<= 100 tokens)
    sc = make_scenario(full, H, D, 720, DEV, dtype=torch.float16, seed=3)
    gen = torch.Generator().manual_seed(4)
    q0 = torch.randn(3, H * G, D, generator=gen).to(DEV)
    q_move_2 = moved(q0, 2, 1, gen)
    queries = [q0, q0, q_move_2, q_move_2, q_move_2, moved(q0, 0, 0, gen)]
    fresh_log, state = run_steps(sc, full, queries, CFG, workspace(), H, DEV)
    assert fresh_log == [
        [True, False, True],  # nothing kept yet (request 1 is dense throughout)
        [False, False, False],  # same queries: both reuse
        [False, False, True],  # request 2's head 1 moved: its whole layer retrieves
        [True, False, False],  # request 0 is 3 tokens past its retrieval (max age)
        [False, False, False],
        [True, False, True],  # request 0 moved; request 2 reached its max age
    ]
    counters = state.counters.cpu().tolist()
    assert counters == [6, 6]  # sparse (request, layer) pairs retrieved / reused


def test_reusing_rows_attend_the_best_of_their_kept_set_for_the_new_query():
    """Queries that move a little (cosine above the threshold): rows reuse, and each
    attends the top-k of its kept set for its own query, as the codec does."""
    full = [700, 650]
    sc = make_scenario(full, H, D, 720, DEV, dtype=torch.float16, seed=11)
    gen = torch.Generator().manual_seed(12)
    q0 = torch.randn(2, H * G, D, generator=gen).to(DEV)
    queries = [q0] + [q0 + 0.3 * torch.randn(q0.shape, generator=gen).to(DEV) for _ in range(3)]
    cfg = dataclasses.replace(CFG, reuse_threshold=0.5, reuse_max_age=100)
    ws = workspace(cfg)
    fresh_log, _ = run_steps(sc, full, queries, cfg, ws, H, DEV)
    assert fresh_log == [[True, True], [False, False], [False, False], [False, False]]


@pytest.mark.gpu
def test_cuda_kernels_under_graph_replay_follow_the_codec(cuda_device):
    """The csrc/ kernels (scan, candidate write + rerank, top-k) on reusing rows, whose
    plan fields the reuse stage zeroes, at a served shape (head_dim 128, 8 KV heads, GQA 4,
    40K tokens: the top-k's cluster path), replayed from one CUDA graph while the
    decisions change from step to step."""
    h, g, d = 8, 4, 128
    cfg = ParisKVConfig(topk=2048, reuse_threshold=0.9, reuse_max_age=3)
    full = [40000, 5000, 20000]  # request 1 dense
    sc = make_scenario(full, h, d, 40960, cuda_device, dtype=torch.bfloat16, seed=8)
    ws = DecodeWorkspace(cfg, h * g, h, d, max_batch=4, max_context=40960, device=cuda_device)
    assert ws.use_cuda
    gen = torch.Generator().manual_seed(9)
    q0 = torch.randn(3, h * g, d, generator=gen).to(cuda_device, torch.bfloat16)
    q_move = moved(q0, 2, 5, gen, heads=h, group=g)
    queries = [q0.clone(), q0, q_move, q_move, q_move, moved(q0, 0, 0, gen, heads=h, group=g)]

    def replay(ws, args, layer):
        ws.run(*args, reuse=layer)  # warm-up (compiles, builds the CUDA kernels)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ws.run(*args, reuse=layer)
        # The warm-up kept a selection for every row: forget it, as serving's extend does
        # for a new request, so the first replay retrieves as the codec's first step does.
        layer.seq.fill_(-1)
        layer.counters.zero_()
        return lambda: (graph.replay(), torch.cuda.synchronize(), out)[2]

    # max_diff: the CUDA rerank sums blocks in another order than the codec (see
    # test_kernels_workspace's scale test); a kept set carries its few swaps along.
    fresh_log, _ = run_steps(sc, full, queries, cfg, ws, h, cuda_device, replay, max_diff=12)
    assert [row[0] for row in fresh_log] == [True, False, False, True, False, True]
    assert [row[2] for row in fresh_log] == [True, False, True, False, False, True]


def test_a_request_taking_over_a_slot_never_reuses_its_selection():
    full = [600]
    sc = make_scenario(full, H, D, 720, DEV, dtype=torch.float16, seed=5)
    q = torch.randn(1, H * G, D, generator=torch.Generator().manual_seed(6)).to(DEV)
    ws = workspace(dataclasses.replace(CFG, reuse_max_age=100))
    state = ReuseState(sc.req_to_token.shape[0], 1, H, D, ws.kept_width, DEV)

    def step(n):
        ws.plan(torch.tensor([n], dtype=torch.int32))
        ws.run(q, sc.pool, sc.req_to_token, sc.req_pool_indices, reuse=state.layer(0))
        return bool(ws.reuse_fresh[0])

    assert step(590) and not step(591)  # the first request retrieves, then reuses
    # Same slot, same query, one token longer: without a reset the new request would
    # attend the first one's selection...
    assert not step(592)
    # ...so a request starting on the slot resets it, and its first step retrieves.
    state.reset(sc.req_pool_indices)
    assert step(592) and not step(593)
    other = ReuseState(sc.req_to_token.shape[0], 1, H, D, ws.kept_width, DEV)
    assert (other.seq == -1).all()  # a fresh state keeps nothing


def test_threshold_zero_runs_no_reuse_stage_and_state_needs_a_threshold():
    cfg = dataclasses.replace(CFG, reuse_threshold=0.0)
    sc = make_scenario([300], H, D, 720, DEV, dtype=torch.float16, seed=1)
    q = torch.randn(1, H * G, D, generator=torch.Generator().manual_seed(2)).to(DEV)
    ws = workspace(cfg)
    ws.plan(sc.seq_lens.cpu())
    ws.bind(q, sc.pool, sc.req_to_token, sc.req_pool_indices)
    assert [name for name, _ in ws.stages()] == [
        "query_table", "scan", "select", "rerank", "topk", "assemble",
    ]  # fmt: skip
    assert not hasattr(ws, "reuse_eff")
    state = ReuseState(sc.req_to_token.shape[0], 1, H, D, 3 * ws.k, DEV)
    with pytest.raises(ValueError, match="reuse_threshold is 0"):
        ws.run(q, sc.pool, sc.req_to_token, sc.req_pool_indices, reuse=state.layer(0))
