"""Encode-at-write kernel against codec.encode_keys.

On a machine without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET=1,
set by tests/conftest.py before the kernels are imported), at small sizes.
"""

import pytest
import torch

from sglang_pariskv.codec import encode_keys
from sglang_pariskv.kernels import encode_to_pool
from tests.kernel_cases import empty_pool

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def mismatch_rates(pool, slots, ref):
    """Fractions of sign ids / magnitude bytes that differ, and the max relative weight error
    over blocks whose codes agree (fp16 weights: one rounding step is the floor)."""
    sign_ok = pool.signs[slots] == ref.signs
    mag_ok = pool.mags[slots] == ref.mags
    signs = 1 - sign_ok.float().mean().item()
    mags = 1 - mag_ok.float().mean().item()
    same = sign_ok & mag_ok.reshape(*mag_ok.shape[:-1], -1, 3).all(-1)
    got, want = pool.weights[slots].float(), ref.weights.float()
    rel = ((got - want).abs() / want.abs().clamp_min(1e-3))[same].max().item()
    return signs, mags, rel


@pytest.mark.parametrize(
    "d, h, dtype",
    [
        (64, 3, torch.float16),
        (128, 2, torch.bfloat16),
        (128, 1, torch.float32),
        (32, 2, torch.bfloat16),
    ],
)
def test_encode_matches_codec(d, h, dtype):
    gen = torch.Generator().manual_seed(d + h)
    t, slots_n = 150, 400
    keys = (torch.randn(t, h, d, generator=gen) * 3).to(dtype)
    keys[3, 0] = 0  # a zero key: weights 0, every sign bit set
    slots = (torch.randperm(slots_n, generator=gen)[:t] + 1).to(DEV)
    pool = empty_pool(slots_n + 1, h, d, DEV)
    encode_to_pool(keys.to(DEV), slots, pool)
    ref = encode_keys(keys.to(DEV))
    s, m, w = mismatch_rates(pool, slots, ref)
    # Only values within float rounding of a threshold may differ. bf16 keys cancel exactly
    # more often (few mantissa bits): a rotated coordinate that is 0 up to rounding may flip
    # its sign bit, at most one sign byte of the 4800 at (128, 2).
    assert s <= (3e-4 if dtype == torch.bfloat16 else 0.0) and m <= 2e-3
    assert w <= 2e-3  # at most about one fp16 rounding step
    assert torch.equal(pool.signs[0], torch.zeros_like(pool.signs[0]))  # slot 0 untouched


@pytest.mark.parametrize("d", [96, 24])
def test_encode_refuses_a_head_dim_that_is_not_a_power_of_two(d):
    """The rotation is one Hadamard block only for a power-of-two head_dim."""
    pool = empty_pool(4, 1, d, DEV)
    keys = torch.randn(2, 1, d, device=DEV)
    with pytest.raises(ValueError, match=f"head_dim {d}: .* power of two"):
        encode_to_pool(keys, torch.tensor([1, 2], device=DEV), pool)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_encode_mismatch_rate_at_scale(cuda_device, d, dtype):
    """Real sizes: mismatches only within rounding of a threshold, so rare and bounded."""
    t, h = 65536, 8
    keys = (torch.randn(t, h, d, device=cuda_device) * 2).to(dtype)
    slots = torch.randperm(2 * t, device=cuda_device)[:t] + 1
    pool = empty_pool(2 * t + 1, h, d, cuda_device)
    encode_to_pool(keys, slots, pool)
    ref = encode_keys(keys)
    s, m, w = mismatch_rates(pool, slots, ref)
    print(f"D={d} {dtype}: sign mismatch {s:.2e}, magnitude-byte mismatch {m:.2e}, w rel {w:.2e}")
    # bf16 keys cancel exactly more often (few mantissa bits): a rotated coordinate that is
    # 0 up to rounding flips its sign bit, hence the looser sign bound.
    assert s <= 5e-5 and m <= 1e-4 and w <= 2e-3


def _shared_direction_keys(t: int, h: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Keys with a dominant per-head common direction (what centring is for)."""
    common = torch.randn(h, d, generator=gen) * 4
    return common + torch.randn(t, h, d, generator=gen)


@pytest.mark.parametrize("d, h, dtype", [(64, 3, torch.float16), (128, 2, torch.bfloat16)])
def test_centred_encode_matches_codec(d, h, dtype):
    """With a per-head centre the kernel writes the codec's codes of keys - centre, and
    they differ from the uncentred codes (the centre is really applied, per head)."""
    gen = torch.Generator().manual_seed(7 + d)
    t = 96
    keys = _shared_direction_keys(t, h, d, gen).to(dtype)
    centre = keys.float().mean(0) + torch.randn(h, d, generator=gen) * 0.1
    slots = (torch.randperm(2 * t, generator=gen)[:t] + 1).to(DEV)
    pool = empty_pool(2 * t + 1, h, d, DEV)
    encode_to_pool(keys.to(DEV), slots, pool, centre=centre.to(DEV))
    ref = encode_keys(keys.to(DEV), centre=centre.to(DEV))
    s, m, w = mismatch_rates(pool, slots, ref)
    assert s <= (3e-4 if dtype == torch.bfloat16 else 0.0) and m <= 2e-3 and w <= 2e-3
    plain = encode_keys(keys.to(DEV))
    assert (pool.signs[slots] != plain.signs).float().mean() > 0.2


def test_encode_refuses_a_centre_of_the_wrong_shape():
    pool = empty_pool(4, 2, 64, DEV)
    keys = torch.randn(2, 2, 64, device=DEV)
    with pytest.raises(ValueError, match=r"centre must be a contiguous float32 \[2, 64\]"):
        encode_to_pool(keys, torch.tensor([1, 2], device=DEV), pool, centre=torch.zeros(3, 64))
    with pytest.raises(ValueError, match=r"scale must be a contiguous float32 \[2, 64\]"):
        encode_to_pool(keys, torch.tensor([1, 2], device=DEV), pool, scale=torch.ones(2, 32))


def _outlier_keys(t: int, h: int, d: int, gen: torch.Generator):
    """(keys, scales): keys with a common direction and a few outlier channels per head,
    and channel scales that balance them (what a calibration file holds)."""
    keys = _shared_direction_keys(t, h, d, gen)
    scale = torch.ones(h, d)
    scale[:, torch.randperm(d, generator=gen)[:4]] = 8.0
    return keys * scale, scale + torch.rand(h, d, generator=gen) * 0.1


@pytest.mark.parametrize("d, h, dtype", [(64, 3, torch.float16), (128, 2, torch.bfloat16)])
def test_calibrated_encode_matches_codec(d, h, dtype):
    """With a centre and channel scales per head the kernel writes the codec's codes of
    (keys - centre) / scales, which differ from the centred-only codes."""
    gen = torch.Generator().manual_seed(11 + d)
    t = 96
    keys, scale = _outlier_keys(t, h, d, gen)
    keys = keys.to(dtype)
    centre = keys.float().mean(0)
    slots = (torch.randperm(2 * t, generator=gen)[:t] + 1).to(DEV)
    pool = empty_pool(2 * t + 1, h, d, DEV)
    encode_to_pool(keys.to(DEV), slots, pool, centre=centre.to(DEV), scale=scale.to(DEV))
    ref = encode_keys(keys.to(DEV), centre=centre.to(DEV), scale=scale.to(DEV))
    s, m, w = mismatch_rates(pool, slots, ref)
    assert s <= (3e-4 if dtype == torch.bfloat16 else 0.0) and m <= 2e-3 and w <= 2e-3
    centred = encode_keys(keys.to(DEV), centre=centre.to(DEV))
    assert (pool.signs[slots] != centred.signs).float().mean() > 0.2


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_calibrated_encode_mismatch_rate_at_scale(cuda_device, d):
    """Real sizes on the GPU: the calibrated (centred and scaled) kernel codes equal the
    codec's up to rounding at a threshold."""
    gen = torch.Generator().manual_seed(d)
    t, h = 65536, 8
    keys = _shared_direction_keys(t, h, d, gen).to(torch.bfloat16).to(cuda_device)
    centre = keys.float().mean(0).contiguous()
    slots = torch.randperm(2 * t, device=cuda_device)[:t] + 1
    pool = empty_pool(2 * t + 1, h, d, cuda_device)
    scale = (torch.rand(h, d, generator=gen) * 4 + 0.25).to(cuda_device)
    encode_to_pool(keys, slots, pool, centre=centre, scale=scale)
    s, m, w = mismatch_rates(pool, slots, encode_keys(keys, centre=centre, scale=scale))
    print(
        f"calibrated D={d}: sign mismatch {s:.2e}, magnitude-byte mismatch {m:.2e}, w rel {w:.2e}"
    )
    assert s <= 5e-5 and m <= 1e-4 and w <= 2e-3


@pytest.mark.parametrize("d, h, calibrated", [(64, 3, False), (128, 2, True)])
def test_encode_layers_writes_every_layer_as_the_per_layer_kernel_does(d, h, calibrated):
    """One launch over all layers, reading each key back from its layer's K buffer at the
    slot: the same codes, bit for bit, as encoding each layer's keys on its own, and
    within the per-layer kernel's rounding of the codec; other slots untouched."""
    from sglang_pariskv.kernels.encode import address_table, encode_layers_to_pool

    gen = torch.Generator().manual_seed(d * h)
    layers, slots_n, t = 3, 40, 7
    kbuf = [(torch.randn(slots_n, h, d, generator=gen) * 2).to(torch.bfloat16) for _ in range(3)]
    kbuf = [k.to(DEV) for k in kbuf]
    slots = (torch.randperm(slots_n - 1, generator=gen)[:t] + 1).to(DEV)
    cal = {}
    if calibrated:
        cal = {
            "centres": torch.randn(layers, h, d, generator=gen).to(DEV),
            "scales": (torch.rand(layers, h, d, generator=gen) + 0.5).to(DEV),
        }
    got = [empty_pool(slots_n, h, d, DEV) for _ in range(layers)]
    tables = tuple(
        address_table(ts, DEV) for ts in (kbuf, *([c[i] for c in got] for i in range(3)))
    )
    encode_layers_to_pool(kbuf, slots, got, tables, seed=5, **cal)
    for layer in range(layers):
        want = empty_pool(slots_n, h, d, DEV)
        centre = cal["centres"][layer].contiguous() if cal else None
        scale = cal["scales"][layer].contiguous() if cal else None
        encode_to_pool(kbuf[layer][slots], slots, want, seed=5, centre=centre, scale=scale)
        for a, b in zip(got[layer], want):
            assert torch.equal(a, b)
        ref = encode_keys(kbuf[layer][slots], 5, centre, scale)
        s, m, w = mismatch_rates(got[layer], slots, ref)
        assert s <= 3e-4 and m <= 2e-3 and w <= 2e-3
        untouched = torch.ones(slots_n, dtype=torch.bool, device=DEV)
        untouched[slots] = False
        assert not got[layer].signs[untouched].any() and not got[layer].weights[untouched].any()


@pytest.mark.parametrize("per_layer", [True, False])
def test_a_pool_without_records_gets_the_same_signs_and_nothing_else(per_layer):
    """The rerank by the keys stores the sign ids only (records of width 0): both encode
    kernels write exactly the signs a full pool gets, and refuse half a record."""
    from sglang_pariskv.codec.encode import KeyCodes
    from sglang_pariskv.kernels.encode import address_table, encode_layers_to_pool

    gen = torch.Generator().manual_seed(3)
    h, d, slots_n = 2, 64, 30
    kbuf = (torch.randn(slots_n, h, d, generator=gen) * 2).to(torch.bfloat16).to(DEV)
    slots = (torch.randperm(slots_n - 1, generator=gen)[:9] + 1).to(DEV)
    full = empty_pool(slots_n, h, d, DEV)
    bare = KeyCodes(full.signs.clone(), full.mags[..., :0], full.weights[..., :0])
    encode_to_pool(kbuf[slots], slots, full, seed=2)
    if per_layer:
        encode_to_pool(kbuf[slots], slots, bare, seed=2)
    else:
        tables = tuple(address_table([t], DEV) for t in (kbuf, *bare))
        encode_layers_to_pool([kbuf], slots, [bare], tables, seed=2)
    assert full.signs.any() and torch.equal(bare.signs, full.signs)
    half = KeyCodes(full.signs, full.mags, full.weights[..., :0])
    with pytest.raises(ValueError, match="width 0"):
        encode_to_pool(kbuf[slots], slots, half)


def test_encode_layers_refuses_buffers_of_different_layouts():
    from sglang_pariskv.kernels.encode import address_table, encode_layers_to_pool

    kbuf = [torch.zeros(8, 2, 64, dtype=torch.bfloat16, device=DEV) for _ in range(2)]
    kbuf[1] = torch.zeros(8, 2, 128, dtype=torch.bfloat16, device=DEV)[..., :64]
    pool = [empty_pool(8, 2, 64, DEV) for _ in range(2)]
    tables = tuple(address_table(kbuf, DEV) for _ in range(4))
    with pytest.raises(ValueError, match="one shape and layout"):
        encode_layers_to_pool(kbuf, torch.tensor([1], device=DEV), pool, tables)


COMPILE_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)  # compile for a GPU target instead of interpreting
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sglang_pariskv.kernels import encode as e

common = {"stride_kt": "i64", "stride_kh": "i64", "slot_ptr": "*i64", "sgn_ptr": "*fp32",
          "thr_ptr": "*fp32", "lev_ptr": "*fp32", "num_rows": "i32"}
shape = {"H": 8, "D": 128, "B": 16, "BLOCK_M": 16, "LOG2D": 7}
layers = {"key_table": "*i64", "centres_ptr": "*fp32", "scales_ptr": "*fp32",
          "signs_table": "*i64", "mags_table": "*i64", "w_table": "*i64"}
one = {"keys_ptr": "*bf16", "centre_ptr": "*fp32", "scale_ptr": "*fp32", "signs_ptr": "*u8",
       "mags_ptr": "*u8", "w_ptr": "*fp16"}
cases = [
    ("layers", e._encode_layers_kernel, layers,
     {"KEY_DTYPE": tl.bfloat16, "HAS_CENTRE": True, "HAS_SCALE": True}),
    ("one_layer", e._encode_kernel, one,
     {"HAS_CENTRE": True, "HAS_SCALE": False}),
]
for name, fn, ptrs, flags in cases:
    consts = {**shape, **flags}
    sig = {a: (common | ptrs).get(a, "constexpr") for a in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32))
    print(name, len(k.asm["cubin"]) > 0)
"""


def test_the_encode_kernels_compile_for_a_hopper_gpu_without_one():
    """Triton's compiler (with its bundled ptxas) builds both encode kernels for sm_90 on
    a machine without a GPU: what the interpreter runs here also compiles there."""
    from tests.child_python import run_script

    assert run_script(COMPILE_SCRIPT)[-2:] == ["layers True", "one_layer True"]
