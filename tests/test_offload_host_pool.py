"""HostKVPool layout, writes, reads, and the host-memory startup check."""

import pytest
import torch

from sglang_pariskv.offload.host_pool import (
    HostKVPool,
    bytes_per_slot,
    check_host_memory,
    host_pool_slots,
)
from sglang_pariskv.server_flags import ParisKVConfigError

GIB = 2**30


def meminfo(tmp_path, available_kb: int | None, name="meminfo"):
    lines = ["MemTotal:       131072000 kB", "MemFree:          1000000 kB"]
    if available_kb is not None:
        lines.append(f"MemAvailable:   {available_kb} kB")
    p = tmp_path / name
    p.write_text("\n".join(lines + ["Buffers:          100 kB", ""]))
    return p


def read(pool, layer, slots):
    """(k, v) ``[T, Hkv, D]`` CPU copies of ``slots`` of ``layer`` of a HostKVPool."""
    idx = slots.to("cpu", torch.int64)
    return pool.data[layer, 0, idx].clone(), pool.data[layer, 1, idx].clone()


def kv(t, h, d, seed, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(t, h, d, generator=gen).to(dtype) for _ in range(2))


def small_pool(**kw):
    args = dict(num_slots=40, num_layers=3, num_kv_heads=2, head_dim=16)
    args.update(kw)
    return HostKVPool(**args, check_memory=False)


def test_layer_k_and_v_are_sglang_shaped_and_rows_are_slot_head():
    pool = small_pool()
    slots = torch.tensor([5, 17, 39])
    k, v = kv(3, 2, 16, seed=0)
    pool.write(1, slots, k, v)
    # data[l, 0] / data[l, 1]: contiguous [slots, Hkv, D], SGLang's k_buffer / v_buffer
    for part, x in ((0, k), (1, v)):
        buf = pool.data[1, part]
        assert buf.shape == (40, 2, 16) and buf.is_contiguous()
        assert torch.equal(buf[slots], x)
        rows = pool.layer_rows(1, part)
        assert rows.data_ptr() == buf.data_ptr() and rows.shape == (80, 16)
        for i, s in enumerate(slots.tolist()):
            for h in range(2):
                assert torch.equal(rows[s * 2 + h], x[i, h])  # head-as-batch row slot*Hkv+h
            assert torch.equal(pool.slot_rows(1, part)[s].view(2, 16), x[i])
    # other layers untouched by a write to layer 1 (storage is uninitialised, maybe NaN
    # bits: compare the bits before/after a second write)
    before = pool.data[0].view(torch.int16).clone()
    pool.write(1, slots, v, k)
    assert torch.equal(pool.data[0].view(torch.int16), before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_views_need_a_pinned_pool():
    with pytest.raises(ValueError, match="pinned pool"):
        small_pool().cuda_views("cuda")


def test_write_read_roundtrip_scattered_slots_and_flat_heads():
    pool = small_pool(dtype=torch.float16)
    gen = torch.Generator().manual_seed(1)
    slots = torch.randperm(40, generator=gen)[:25]
    k, v = kv(25, 2, 16, seed=2, dtype=torch.float32)
    pool.write(2, slots, k.reshape(25, 32), v.reshape(25, 32))  # [T, Hkv*D] and a cast
    rk, rv = read(pool, 2, slots)
    assert torch.equal(rk, k.half()) and torch.equal(rv, v.half())
    # overwrite a subset (slot reuse): the new KV wins, the rest stays
    k2, v2 = kv(5, 2, 16, seed=3, dtype=torch.float16)
    pool.write(2, slots[:5], k2, v2)
    rk, rv = read(pool, 2, slots)
    assert torch.equal(rk[:5], k2) and torch.equal(rk[5:], k[5:].half())
    assert torch.equal(rv[:5], v2)


def test_nbytes_and_sizing():
    pool = small_pool()
    assert pool.nbytes() == 40 * bytes_per_slot(3, 2, 16, torch.bfloat16) == 40 * 3 * 2 * 2 * 16 * 2
    # Qwen2.5-7B-1M shape: 28 layers x 4 KV heads x D 128, bf16 = 56 KiB per token.
    assert bytes_per_slot(28, 4, 128, torch.bfloat16) == 57344
    assert host_pool_slots(56, 28, 4, 128, torch.bfloat16) == 56 * GIB // 57344
    assert pool.pinned == torch.cuda.is_available()  # pinned exactly when a GPU will read it


def test_check_host_memory_passes_and_refuses_with_the_flag_and_fix(tmp_path):
    path = meminfo(tmp_path, available_kb=64 * 1024 * 1024)  # 64 GiB
    check_host_memory(50 * GIB, path)
    check_host_memory(60 * GIB, path)  # exactly 64 - 4 reserved
    with pytest.raises(ParisKVConfigError) as e:
        check_host_memory(61 * GIB, path)
    msg = str(e.value)
    assert "--pariskv-host-pool-gb" in msg and "61.0 GiB" in msg and "64.0 GiB available" in msg
    assert "--pariskv-host-pool-gb 60 or less" in msg
    assert isinstance(e.value, ValueError)


def test_check_host_memory_suggests_a_size_per_tp_rank(tmp_path):
    path = meminfo(tmp_path, available_kb=64 * 1024 * 1024)  # 60 GiB usable
    check_host_memory(2 * 30 * GIB, path, ranks=2)
    with pytest.raises(ParisKVConfigError) as e:
        check_host_memory(2 * 40 * GIB, path, ranks=2)
    assert "--pariskv-host-pool-gb 30 or less (each of the 2 ranks" in str(e.value)


def test_check_host_memory_without_room_or_without_meminfo(tmp_path):
    with pytest.raises(ParisKVConfigError, match="serve without --pariskv-offload host"):
        check_host_memory(GIB, meminfo(tmp_path, available_kb=3 * 1024 * 1024))
    with pytest.raises(ParisKVConfigError, match="cannot read MemAvailable"):
        check_host_memory(GIB, meminfo(tmp_path, available_kb=None, name="old"))


def test_pool_checks_memory_before_allocating(tmp_path):
    path = meminfo(tmp_path, available_kb=5 * 1024 * 1024)  # 1 GiB usable
    # 2 GiB pool: refused before torch.empty would be called
    slots = host_pool_slots(2, 28, 4, 128, torch.bfloat16)
    with pytest.raises(ParisKVConfigError, match="--pariskv-host-pool-gb 1 or less"):
        HostKVPool(slots, 28, 4, 128, meminfo=path)
    HostKVPool(1000, 28, 4, 128, meminfo=path)  # 56 MB: fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_pinning_needs_cuda():
    with pytest.raises(ValueError, match="needs CUDA"):
        small_pool(pin=True)


@pytest.mark.gpu
def test_pool_is_pinned_on_cuda_and_gpu_writes_land_in_host_memory():
    from sglang_pariskv.kernels.uva_gather import host_accessible

    pool = HostKVPool(4096, 2, 4, 128)
    assert pool.pinned and host_accessible(pool.data)
    slots = torch.randperm(4096)[:300].cuda()
    k, v = (x.cuda() for x in kv(300, 4, 128, seed=5))
    pool.write(1, slots, k, v)  # UVA scatter kernel
    torch.cuda.synchronize()
    rk, rv = read(pool, 1, slots)
    assert torch.equal(rk, k.cpu()) and torch.equal(rv, v.cpu())
    k2, v2 = (x.cuda() for x in kv(300, 4, 128, seed=6))
    pool.write(0, slots, k2, v2)
    torch.cuda.synchronize()
    assert torch.equal(read(pool, 0, slots)[1], v2.cpu())
    # SGLang's view: CUDA tensors over the same host memory, read and written by kernels
    kb, vb = pool.cuda_views("cuda")
    assert kb[1].is_cuda and kb[1].data_ptr() == pool.data[1, 0].data_ptr()
    assert torch.equal(kb[1][slots], k) and torch.equal(vb[0][slots], v2)
    k3 = torch.randn(300, 4, 128, device="cuda").bfloat16()
    vb[1][slots] = k3  # an index_put kernel writing host memory over UVA
    torch.cuda.synchronize()
    assert torch.equal(read(pool, 1, slots)[1], k3.cpu())
    pool.close()
    assert not host_accessible(pool.data)
