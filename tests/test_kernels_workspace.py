"""The whole decode-step pipeline (DecodeWorkspace) against codec.pipeline.retrieve,
CUDA-graph replay, and the FlashInfer "head as batch" decode it feeds."""

import dataclasses

import pytest
import torch

from sglang_pariskv.codec import retrieve, sparse_attention
from sglang_pariskv.config import ParisKVConfig
from sglang_pariskv.kernels import DecodeWorkspace, max_candidates
from tests.kernel_cases import (
    make_scenario,
    padded_codes,
    padded_keys,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"

SMALL = dict(chunk=64, scan_block=16, scan_tiles=4)


def rows_of(out, h):
    """{(r, h): list of slots} from the head-as-batch output."""
    ip, idx = out.kv_indptr.cpu(), out.kv_indices.cpu()
    rows = {}
    for row in range(ip.numel() - 1):
        got = idx[ip[row] : ip[row + 1]]
        assert (got % h == row % h).all()  # index = slot * Hkv + head
        rows[row // h, row % h] = (got // h).tolist()
    return rows


def check_against_codec(sc, q, cfg, out, max_diff=0, scale=None):
    """The codec's dense decisions, candidate counts and attended sets; a dense request's
    rows hold its first token only (the backend attends it with its own dense call).
    With ``cfg.rerank == "keys"`` the codec ranks by the keys in float64."""
    h = sc.pool.signs.shape[1]
    keys = padded_keys(sc) if cfg.rerank == "keys" else None
    if keys is not None:
        q = q.double()
    ref = retrieve(q, padded_codes(sc), sc.seq_lens.long(), cfg, scale=scale, keys=keys)
    assert torch.equal(out.dense.cpu().bool(), ref.dense.cpu())
    assert torch.equal(out.num_candidates.cpu(), ref.num_candidates.cpu())
    rtt = sc.req_to_token[sc.req_pool_indices.long()]
    for (r, hh), slots in rows_of(out, h).items():
        if ref.dense[r]:
            assert slots == [int(rtt[r, 0])], (r, hh)
            continue
        pos = ref.positions[r, hh][ref.valid[r, hh]]
        want = set(rtt[r][pos].tolist())
        assert len(slots) == len(set(slots)) == len(want)
        assert len(set(slots) ^ want) <= 2 * max_diff, (r, hh)


@pytest.mark.parametrize(
    "d, h, group, dtype, scaled, rerank",
    [
        (64, 2, 2, torch.float16, False, "code"),
        (128, 1, 8, torch.bfloat16, False, "code"),
        (64, 3, 1, torch.float16, False, "code"),
        (64, 2, 3, torch.bfloat16, True, "code"),  # calibration channel scales, query side
        (64, 2, 2, torch.float16, False, "keys"),
        (128, 2, 4, torch.bfloat16, True, "keys"),  # scales reach the collision stage only
    ],
)
def test_workspace_matches_codec_retrieve(d, h, group, dtype, scaled, rerank):
    lens = [700, 90, 555]
    cfg = ParisKVConfig(topk=24, sink=4, local=8, dense_threshold=100, rerank=rerank)
    sc = make_scenario(lens, h, d, 720, DEV, dtype=dtype, seed=d + group)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, h * group, d, generator=gen).to(DEV)
    scale = (torch.rand(h, d, generator=gen) * 4 + 0.1).to(DEV) if scaled else None
    ws = DecodeWorkspace(cfg, h * group, h, d, max_batch=4, max_context=720, device=DEV, **SMALL)
    indptr_host = ws.plan(sc.seq_lens.cpu())
    keys = sc.key_pool if rerank == "keys" else None
    out = ws.run(q, sc.pool, sc.req_to_token, sc.req_pool_indices, scale=scale, keys=keys)
    assert torch.equal(indptr_host, out.kv_indptr.cpu())
    assert int(indptr_host[-1]) == h * (2 * cfg.budget + 1)  # the 90-token request: 1 per row
    check_against_codec(sc, q.float(), cfg, out, scale=scale)
    got, rtt = rows_of(out, h), sc.req_to_token[sc.req_pool_indices.long()]

    def differs_from(other: ParisKVConfig, other_scale) -> bool:
        keys = padded_keys(sc) if other.rerank == "keys" else None
        ref = retrieve(q.double(), padded_codes(sc), sc.seq_lens.long(), other, other_scale, keys)
        return any(
            set(got[r, hh]) != set(rtt[r][ref.positions[r, hh][ref.valid[r, hh]]].tolist())
            for r in range(3)
            for hh in range(h)
        )

    # What each option changes is seen (else the test could not see it ignored): the
    # scales what is retrieved, the keys how the candidates rank.
    if scaled:
        assert differs_from(cfg, None)
    if rerank == "keys":
        assert differs_from(dataclasses.replace(cfg, rerank="code"), scale)
    # The query copy comes only from the CUDA query kernel; without it callers use q.
    assert (ws.contiguous_query(q) is None) == (not ws.use_cuda)


def test_select_chunk_is_the_triton_tile_or_the_cuda_kernels_own(monkeypatch):
    """The count pass shares csrc/select_rerank.cu's chunk when the CUDA kernels run, so a
    Triton tile size cannot reach it."""
    from sglang_pariskv.kernels import workspace as wsm
    from sglang_pariskv.kernels.launch_geometry import SELECT_RERANK_CHUNK

    cfg = ParisKVConfig(topk=64, sink=8, local=16, dense_threshold=256)
    ws = DecodeWorkspace(cfg, 4, 2, 64, 2, 1024, "cpu", chunk=64)
    assert not ws.use_cuda and ws.sel.chunk == 64  # no CUDA device: the Triton kernels
    monkeypatch.setattr(wsm, "cuda_kernels_usable", lambda *a: True)
    ws = DecodeWorkspace(cfg, 4, 2, 64, 2, 1024, "cpu", chunk=64)
    assert ws.use_cuda and ws.sel.chunk == SELECT_RERANK_CHUNK


def test_max_candidates_covers_the_adaptive_dip():
    cfg = ParisKVConfig(topk=100, sink=0, local=0)
    # zone 29999 keeps 0.2 * 29999 = 6000 candidates, zone 30000..59999 fewer.
    assert max_candidates(cfg, 40000) == 6000
    assert max_candidates(cfg, 50) == 50


@pytest.mark.gpu
@pytest.mark.parametrize(
    "d, group, rerank",
    [(d, g, "code") for d in (64, 128) for g in (1, 4, 7, 8)] + [(64, 7, "keys"), (128, 4, "keys")],
)
def test_workspace_at_scale_and_cuda_graph_replay(cuda_device, d, group, rerank):
    """Every shape the startup check accepts (support.SERVING_HEAD_DIMS, any GQA group)
    retrieves what the codec does (with calibration channel scales on the query side),
    eagerly and replayed in a CUDA graph; by the codes and by the stored keys."""
    h, nmax = 8, 65536
    cfg = ParisKVConfig(topk=2048, sink=64, local=256, dense_threshold=8192, rerank=rerank)
    lens = [65536, 40000, 5000, 31000]
    sc = make_scenario(lens, h, d, nmax, cuda_device, dtype=torch.bfloat16, seed=d + group)
    q = torch.randn(4, h * group, d, device=cuda_device, dtype=torch.bfloat16)
    scale = torch.rand(h, d, device=cuda_device) * 4 + 0.1
    ws = DecodeWorkspace(cfg, h * group, h, d, max_batch=4, max_context=nmax, device=cuda_device)
    assert ws.use_cuda  # nvcc is on the device image: the CUDA kernels are used
    ws.plan(sc.seq_lens.cpu())
    keys = sc.key_pool if rerank == "keys" else None
    out = ws.run(q, sc.pool, sc.req_to_token, sc.req_pool_indices, scale=scale, keys=keys)
    # The CUDA rerank sums a candidate's blocks in another order than the codec: estimates
    # equal to rounding can swap at the top-k boundary (up to 11 of a 2368-token budget
    # were seen, at head_dim 64 with one query head per KV head).
    check_against_codec(sc, q.float(), cfg, out, max_diff=12, scale=scale)
    eager = (out.kv_indptr.clone(), out.kv_indices.clone())

    # Capture after planning other lengths, replay after planning the real ones.
    rpi_buf = sc.req_pool_indices.flip(0).contiguous()
    args = (sc.pool, sc.req_to_token)
    ws.plan(torch.tensor([9000, 8000, 65536, 12000]))
    # warm up (Triton compiles outside the capture)
    ws.run(q, *args, rpi_buf, scale=scale, keys=keys)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out = ws.run(q, *args, rpi_buf, scale=scale, keys=keys)
    ws.plan(sc.seq_lens.cpu())
    rpi_buf.copy_(sc.req_pool_indices)
    ws.kv_indices.fill_(-1)
    graph.replay()
    assert torch.equal(g_out.kv_indptr, eager[0])
    # Same attended set per row (the CUDA top-k compacts with atomics: order within a row's
    # top-k segment is unspecified).
    ip = eager[0].tolist()
    for row in range(len(ip) - 1):
        got = g_out.kv_indices[ip[row] : ip[row + 1]].sort().values
        assert torch.equal(got, eager[1][ip[row] : ip[row + 1]].sort().values)


@pytest.mark.gpu
def test_flashinfer_head_as_batch_decode_matches_codec_attention(cuda_device):
    pytest.importorskip("flashinfer")
    from sglang_pariskv.attention.sparse_decode import HeadAsBatchDecode

    h, group, d, nmax = 8, 4, 128, 32768
    cfg = ParisKVConfig(topk=512, sink=16, local=64, dense_threshold=4096)
    lens = [32768, 3000, 20000]
    sc = make_scenario(lens, h, d, nmax, cuda_device, dtype=torch.bfloat16, seed=4)
    slots = sc.pool.signs.shape[0]
    k_pool = torch.randn(slots, h, d, device=cuda_device, dtype=torch.bfloat16)
    v_pool = torch.randn(slots, h, d, device=cuda_device, dtype=torch.bfloat16)
    # The query as SGLang passes it: a strided view of the QKV projection's output.
    qkv = torch.randn(3, (h * group + 2 * h) * d, device=cuda_device, dtype=torch.bfloat16)
    q = qkv[:, : h * group * d].view(3, h * group, d)
    ws = DecodeWorkspace(cfg, h * group, h, d, max_batch=3, max_context=nmax, device=cuda_device)
    dec = HeadAsBatchDecode(ws, torch.bfloat16)
    dec.plan(sc.seq_lens.cpu())
    out = ws.run(q, sc.pool, sc.req_to_token, sc.req_pool_indices)
    # The CUDA query kernel copied this query (the sparse call reads the copy); another
    # tensor, even of equal values, gets no copy.
    qc = ws.contiguous_query(q)
    assert qc is not None and qc.is_contiguous() and torch.equal(qc, q)
    assert ws.contiguous_query(q.clone()) is None
    o = dec.run(q, k_pool, v_pool)  # [R, Hq, D]
    # Reference: codec attention over the same index sets.
    rows = rows_of(out, h)
    m = max(len(v) for v in rows.values())
    positions = torch.full((3, h, m), -1, dtype=torch.long)
    rtt = sc.req_to_token[sc.req_pool_indices.long()].cpu()
    for (r, hh), sl in rows.items():
        inv = {int(s): p for p, s in enumerate(rtt[r].tolist()) if p < lens[r]}
        positions[r, hh, : len(sl)] = torch.tensor([inv[s] for s in sl])
    kk = k_pool[sc.req_to_token[sc.req_pool_indices.long()].long()]  # [R, N, H, D]
    vv = v_pool[sc.req_to_token[sc.req_pool_indices.long()].long()]
    pos = positions.to(cuda_device)
    ref = sparse_attention(q, kk, vv, pos, pos >= 0)
    err = (o.float() - ref).norm() / ref.norm()
    assert err < 2e-2


def test_scan_run_length_fills_the_gpu_at_small_batches():
    from sglang_pariskv.kernels.launch_geometry import (
        SCAN_TOKENS_PER_BLOCK,
        scan_tokens_per_block,
    )

    for ctx in (8192, 32768, 131072, 1 << 20):
        for batch in (1, 2, 8, 64):
            tpb = scan_tokens_per_block(ctx, batch, 132)
            assert tpb in SCAN_TOKENS_PER_BLOCK
            blocks = -(-ctx // tpb) * batch
            # Either a block for every other SM, or the smallest run is already in use ...
            assert 2 * blocks >= 132 or tpb == SCAN_TOKENS_PER_BLOCK[-1]
            # ... and never a shorter run than needed (a longer one would still do).
            longer = [t for t in SCAN_TOKENS_PER_BLOCK if t > tpb]
            assert all(2 * -(-ctx // t) * batch < 132 for t in longer)
    assert scan_tokens_per_block(131072, 1, 132) == 1024  # the measured best
    assert scan_tokens_per_block(32768, 1, 132) == 256


def test_topk_cluster_only_for_rows_longer_than_one_block(monkeypatch):
    """One block per top-k row up to the keys its registers hold, 8-block clusters beyond
    (thread-block clusters need compute capability 9.0); never on the CPU."""
    from sglang_pariskv.kernels import launch_geometry as lg

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert lg.topk_cluster_for(13076, cuda) == 1  # 128K tokens
    assert lg.topk_cluster_for(lg.TOPK_ONE_BLOCK_KEYS, cuda) == 1
    assert lg.topk_cluster_for(lg.TOPK_ONE_BLOCK_KEYS + 1, cuda) == lg.CUDA_TOPK_CLUSTER
    assert lg.topk_cluster_for(104826, torch.device("cpu")) == 1
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert lg.topk_cluster_for(104826, cuda) == 1


def test_scan_run_length_rule_reaches_the_cuda_kernel(monkeypatch):
    """The scan's run length comes from scan_tokens_per_block for the planned batch and is
    what the CUDA scan is launched with."""
    from types import SimpleNamespace

    from sglang_pariskv.kernels import workspace as wsm

    seen, asked = {}, []

    def record(*args, **kwargs):
        seen["args"] = args

    def rule(max_context, batch, num_sms):
        asked.append((max_context, batch, num_sms))
        return 512

    monkeypatch.setattr(wsm, "cuda_kernels_usable", lambda *a: True)
    monkeypatch.setattr(wsm, "collision_scan_cuda", record)
    monkeypatch.setattr(wsm, "scan_tokens_per_block", rule)
    cfg = ParisKVConfig(topk=64, sink=8, local=16, dense_threshold=256)
    ws = DecodeWorkspace(cfg, 4, 2, 64, 2, 1024, "cpu")
    ws.plan(torch.tensor([1000, 700]))
    codes = SimpleNamespace(signs=torch.zeros(4096, 2, 8, dtype=torch.uint8))
    rtt = torch.zeros(2, 1024, dtype=torch.int32)
    ws.bind(torch.zeros(2, 4, 64), codes, rtt, torch.tensor([0, 1], dtype=torch.int32))
    ws._st.table = ws.table[:2]
    ws._st.score_hist = ws.score_hist[:2]
    ws._stage_scan()
    assert asked == [(1024, 2, ws.num_sms)]
    assert seen["args"][-1] == 512  # the run length


def test_cuda_scan_shared_memory_matches_the_kernels_layout():
    """The startup check's byte count is the kernel's (csrc/collision_scan.cu): table,
    histogram, slots, two chunks of staged rows with the odd-multiple stride."""
    from sglang_pariskv.kernels import launch_geometry as lg

    # 8 KV heads x 128: 32 KiB table, 8 KiB histogram (256 bins), 4 KiB slots, 2 x 128 x 144
    assert lg.cuda_scan_shared_bytes(8, 16, 256, 1024, 128) == 32768 + 8192 + 4096 + 36864
    # 3 KV heads x 64 (odd: no padding): 2 x 32 x 24 staged bytes
    assert lg.cuda_scan_shared_bytes(3, 8, 256, 1023, 32) == 6144 + 3072 + 4096 + 1536


def test_cuda_kernels_that_cannot_run_the_shape_fall_back_to_triton(monkeypatch, caplog):
    """Very many KV heads per rank (the scan's shared memory) or a head_dim the CUDA
    kernels are not built for: the workspace runs the Triton kernels, with a warning."""
    from types import SimpleNamespace

    from sglang_pariskv.kernels import launch_geometry as lg
    from sglang_pariskv.kernels import workspace as wsm

    props = SimpleNamespace(
        shared_memory_per_block_optin=227 * 1024, multi_processor_count=132, major=9, minor=0
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: props)
    monkeypatch.setattr(wsm, "cuda_available", lambda: True)
    fake_cuda = torch.device("cuda")
    with pytest.raises(ValueError, match="shared memory"):
        lg.check_cuda_kernels_fit(64, 16, 256, fake_cuda)  # 256 KiB of centroid table alone
    with pytest.raises(ValueError, match="head_dim"):
        lg.check_cuda_kernels_fit(8, 32, 256, fake_cuda)  # head_dim 256
    lg.check_cuda_kernels_fit(8, 16, 256, fake_cuda)  # Llama-3.1-8B: fits
    assert wsm.cuda_kernels_usable(fake_cuda, 8, 16, 256)
    with caplog.at_level("WARNING", logger="sglang_pariskv"):
        assert not wsm.cuda_kernels_usable(fake_cuda, 64, 16, 256)
    assert "falling back to the Triton kernels" in caplog.text
    assert not wsm.cuda_kernels_usable(torch.device("cpu"), 8, 16, 256)
