"""jax_side's NF4/FP4/FP8 dequantization against bitsandbytes (bytes made by bitsandbytes on the CPU,
moved with numpy: jax_side itself never sees torch) and against torch_side."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import (
    DTYPES,
    assert_same_bits,
    bnb_pieces,
    bnb_quantize,
    bnb_reference,
    cuda_code,
    fp8_reference_loops,
    jnp_dtype,
    random_fp8,
    random_scales,
    to_numpy,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_side
import torch_side
from jax_side import _cpu_kernel
from jax_side._codes import dynamic_code

pytest.importorskip("bitsandbytes")


@pytest.fixture(params=["kernel", "xla"], autouse=True)
def decode_path(request, monkeypatch):
    """Every test here runs on both CPU decodes: qbridge's C kernel through XLA's FFI, and XLA's operations
    (what other platforms run, and the CPU before the kernel is built)."""
    if request.param == "kernel":
        assert jax_side.wait_for_kernels(), "the CPU kernel could not be built here"
    else:
        monkeypatch.setattr(_cpu_kernel, "_READY", False)
        monkeypatch.setattr(_cpu_kernel, "_UNAVAILABLE", True)
    return request.param


SHAPES = [(128, 96), (7, 48), (5, 7), (100,), (1, 1), (33, 65), (2, 3, 40), (576, 7168)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
def test_nf4_matches_bitsandbytes(shape, quant_type, nested):
    for i, dtype in enumerate(DTYPES):
        _, packed, qs = bnb_quantize(shape, quant_type=quant_type, nested=nested, dtype=dtype, seed=i)
        p, a, kw = bnb_pieces(packed, qs)
        got = jax_side.dequantize_nf4(p, a, **kw)
        assert isinstance(got, jax.Array)
        assert_same_bits(got, to_numpy(bnb_reference(packed, qs)))
        if len(shape) == 2:
            assert_same_bits(
                jax_side.dequantize_nf4(p, a, **kw, transpose=True), to_numpy(bnb_reference(packed, qs)).T
            )


@settings(max_examples=40, deadline=None)
@given(
    shape=st.one_of(st.tuples(st.integers(1, 300)), st.tuples(st.integers(1, 60), st.integers(1, 300))),
    blocksize=st.sampled_from([32, 64, 128, 256, 1024]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    nested=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_nf4_random_shapes_match_torch_side(shape, blocksize, quant_type, nested, dtype, seed):
    _, packed, qs = bnb_quantize(
        shape, blocksize=blocksize, quant_type=quant_type, nested=nested, dtype=dtype, seed=seed
    )
    p, a, kw = bnb_pieces(packed, qs)
    want = torch_side.dequantize_nf4(packed, qs.absmax, **{**kw, "dtype": dtype, "nested_absmax": qs.state2.absmax if nested else None,
                                                           "nested_code": qs.state2.code if nested else None})  # fmt: skip
    assert_same_bits(jax_side.dequantize_nf4(p, a, **kw), to_numpy(want))


def test_quant_storage_bytes():
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(64, 96, dtype=torch.bfloat16)
    packed, qs = F.quantize_4bit(w, quant_type="nf4", quant_storage=torch.bfloat16, compress_statistics=False)
    p, a, kw = bnb_pieces(packed, qs)
    assert p.dtype.itemsize == 2
    assert_same_bits(jax_side.dequantize_nf4(p, a, **kw), to_numpy(bnb_reference(packed, qs)))


def test_custom_code_table():
    _, packed, qs = bnb_quantize((16, 64), nested=False)
    code = np.linspace(-1, 1, 16, dtype=np.float32)
    got = jax_side.dequantize_nf4(
        to_numpy(packed), to_numpy(qs.absmax), shape=(16, 64), code=code, dtype=jnp.float32
    )
    want = torch_side.dequantize_nf4(
        packed, qs.absmax, shape=(16, 64), code=torch.from_numpy(code), dtype=torch.float32
    )
    assert_same_bits(got, to_numpy(want))


def test_standard_tables_are_bitsandbytes_tables():
    F = pytest.importorskip("bitsandbytes.functional")
    for quant_type in ("nf4", "fp4"):
        bnb_table = F.get_4bit_type(quant_type, device="cpu").numpy()
        np.testing.assert_array_equal(jax_side.standard_code(quant_type), bnb_table)  # as numbers
        cuda_table = to_numpy(cuda_code(quant_type))  # as bits: FP4's zero with the sign bit is -0.0
        assert_same_bits(jax_side.standard_code(quant_type), cuda_table)
        assert_same_bits(torch_side.standard_code(quant_type).numpy(), cuda_table)
    # the nested absmax's table: bitsandbytes' signed dynamic map, which its 4-bit quantization writes
    assert_same_bits(dynamic_code(), F.create_dynamic_map(signed=True).numpy())
    _, _, qs = bnb_quantize((16, 1024), nested=True)
    assert_same_bits(dynamic_code(), to_numpy(qs.state2.code))


def test_denormal_products_flush_to_zero():
    for nested in (False, True):
        _, packed, qs = bnb_quantize((64, 256), nested=nested, dtype=torch.float32, scale=1e-38)
        p, a, kw = bnb_pieces(packed, qs)
        assert_same_bits(jax_side.dequantize_nf4(p, a, **kw), to_numpy(bnb_reference(packed, qs)))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(nested_code=lambda c: c[:10]), ValueError, "nested_code must have 256 entries, got 10"),
        (dict(nested_code=lambda c: c[:0]), ValueError, "nested_code must have 256 entries, got 0"),
        (
            dict(nested_absmax=lambda m: m[:0]),
            ValueError,
            "nested_absmax has 0 entries; 300 absmax blocks in nested blocks of 256 need 2",
        ),
        (dict(nested_absmax=lambda m: np.concatenate([m, m])), ValueError, "nested_absmax has 4 entries"),
        (
            dict(nested_blocksize=lambda b: 16),
            ValueError,
            "nested_absmax has 2 entries; 300 absmax blocks in nested blocks of 16 need 19",
        ),
        (
            dict(absmax=lambda a: a.astype(np.int32) * 100),
            TypeError,
            r"a nested \(double-quant\) absmax is uint8, got int32",
        ),
        (
            dict(absmax=lambda a: a.astype(np.float32)),
            TypeError,
            r"a nested \(double-quant\) absmax is uint8, got float32",
        ),
        (
            dict(nested_absmax=lambda m: m.astype(np.float16)),
            TypeError,
            "nested_absmax and nested_code must be float32, got float16",
        ),
        (dict(offset=lambda o: np.ones(3, np.float32)), ValueError, "offset must be one number"),
        (dict(offset=lambda o: "0.5"), TypeError, "offset must be a real number"),
    ],
)
def test_a_nested_decode_refuses_pieces_that_do_not_fit(change, error, message):
    gen = np.random.default_rng(6)
    args = dict(
        absmax=gen.integers(0, 256, 300, dtype=np.uint8),
        nested_absmax=gen.random(2, dtype=np.float32),
        nested_code=np.sort(gen.standard_normal(256).astype(np.float32)),
        nested_blocksize=256,
        offset=np.float32(0.01),
    )
    jax_side.decode_nested_absmax(**args)  # as given: decoded
    for name, make in change.items():
        args[name] = make(args[name])
    with pytest.raises(error, match=f"decode_nested_absmax: {message}"):
        jax_side.decode_nested_absmax(**args)


def test_nested_decode_is_exact_eagerly():
    gen = np.random.default_rng(5)
    a = gen.integers(0, 256, 65536, dtype=np.uint8)
    absmax2 = (gen.random(256, dtype=np.float32) * 3).astype(np.float32)
    code2 = np.sort(gen.standard_normal(256).astype(np.float32))
    offset = np.float32(0.0123456)
    got = np.asarray(jax_side.decode_nested_absmax(a, absmax2, code2, 256, offset))
    want = (code2[a] * np.repeat(absmax2, 256)).astype(np.float32) + offset  # numpy: two roundings
    assert_same_bits(got, want.astype(np.float32))
    with pytest.raises(ValueError, match="needs offset="):
        jax_side.decode_nested_absmax(a, absmax2, code2, 256)
    with pytest.raises(ValueError, match="nested_blocksize must be a positive int"):
        jax_side.decode_nested_absmax(a, absmax2, code2, 0, offset)
    with pytest.raises(ValueError, match="nested_blocksize must be a positive int, got 0"):
        jax_side.dequantize_nf4(np.zeros(32, np.uint8), np.zeros(1, np.uint8), shape=(64,), nested_absmax=np.ones(1, np.float32),
                                nested_code=np.ones(256, np.float32), nested_blocksize=0, offset=0.0)  # fmt: skip


def test_jit_compatible_and_the_documented_fma_difference(decode_path):
    """Inside a caller's jit XLA's operations may fuse the nested decode into a multiply-add; measure it,
    keep it bounded. The CPU kernel decodes the nested absmax itself: exact under jit too."""
    _, packed, qs = bnb_quantize((512, 1024), nested=True, dtype=torch.float32, seed=9)
    p, a, kw = bnb_pieces(packed, qs)
    want = to_numpy(bnb_reference(packed, qs))
    static = {k: v for k, v in kw.items() if k not in ("nested_absmax", "nested_code")}
    jitted = jax.jit(
        lambda p, a, na, nc: jax_side.dequantize_nf4(p, a, nested_absmax=na, nested_code=nc, **static)
    )
    got = np.asarray(jitted(p, a, kw["nested_absmax"], kw["nested_code"]))
    if decode_path == "kernel":
        assert_same_bits(got, want)
    ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32).astype(np.int64))
    assert ulps.max() <= 2, "more than the one rounding a fused multiply-add can change"
    assert (ulps != 0).mean() < 0.35
    # without nesting there is nothing to fuse: exact under jit too
    _, packed, qs = bnb_quantize((512, 1024), nested=False, dtype=torch.float32, seed=9)
    p, a, kw = bnb_pieces(packed, qs)
    assert_same_bits(
        jax.jit(lambda p, a: jax_side.dequantize_nf4(p, a, **kw))(p, a), to_numpy(bnb_reference(packed, qs))
    )


@pytest.mark.parametrize(
    "shape, scale_shape", [((576, 7168), (5, 56)), ((130, 129), (2, 2)), ((7, 300), (7, 1)), ((5, 9), ())]
)
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_matches_the_float32_reference(shape, scale_shape, fp8):
    w, s = random_fp8(shape, dtype=fp8), random_scales(scale_shape)
    for dtype in DTYPES:
        got = jax_side.dequantize_fp8(to_numpy(w), to_numpy(s), dtype=jnp_dtype(dtype))
        want = torch_side.dequantize_fp8(w, s, dtype)
        assert_same_bits(got, to_numpy(want))
        if scale_shape == (5, 56):
            assert_same_bits(got, to_numpy(fp8_reference_loops(w, s, (128, 128), dtype)))
    if len(shape) == 2:
        got_t = jax_side.dequantize_fp8(to_numpy(w), to_numpy(s), transpose=True)
        assert_same_bits(got_t, to_numpy(torch_side.dequantize_fp8(w, s)).T)


@pytest.mark.parametrize("experts", [1, 3])
@pytest.mark.parametrize("scale_shape", [(), (1,), (1, 1, 1)])
def test_a_stacked_fp8_weight_with_one_scale_is_transposed_per_expert(experts, scale_shape):
    """One scale for a stacked [experts, out, in] weight (one expert's [1] too, which was read as a per-tensor
    scale of a 3-D weight and refused with transpose=True): each expert's [in, out], the same bits on both
    sides as the untransposed decode's."""
    w, s = random_fp8((experts, 130, 72)), random_scales(scale_shape)
    want = to_numpy(torch_side.dequantize_fp8(w, s)).transpose(0, 2, 1)
    assert_same_bits(to_numpy(torch_side.dequantize_fp8(w, s, transpose=True)), want)
    assert_same_bits(jax_side.dequantize_fp8(to_numpy(w), to_numpy(s), transpose=True), want)


@pytest.mark.parametrize("block_size", [2**31, (2**31, 128), (128, 2**40), (7, 2**31)])
@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_blocks_past_the_matrix_cover_it_whole(block_size, fmt):
    """A block size beyond a matrix's side (one block along it) is read as that side, on both sides: the
    layout says so, and every decode (torch's C kernel and plain torch path, jax eagerly and under jit,
    stacked experts) gives the bits of the smallest block that covers the side. (jax_side overflowed JAX's
    int32 repeat counts; torch's plain path asked for tens of GB.)"""
    w = random_fp8((130, 300), dtype=fmt)
    bo, bi = (block_size, block_size) if isinstance(block_size, int) else block_size
    grid = (-(-130 // bo), -(-300 // bi))
    s = random_scales(grid)
    covering = (min(bo, 130), min(bi, 300))
    for layout in (jax_side.fp8_scale_layout, torch_side.fp8_scale_layout):
        kind = "tensor" if grid == (1, 1) else "block"  # one scale: per tensor, whatever the block
        assert tuple(layout((130, 300), grid, block_size)) == (kind, covering, grid, ())
    want = to_numpy(torch_side.dequantize_fp8(w, s, block_size=covering))
    for backend in ("auto", "torch"):
        got = torch_side.dequantize_fp8(w, s, block_size=block_size, backend=backend)
        assert_same_bits(to_numpy(got), want)
    assert_same_bits(jax_side.dequantize_fp8(to_numpy(w), to_numpy(s), block_size=block_size), want)
    decode = jax.jit(lambda w, s: jax_side.dequantize_fp8(w, s, block_size=block_size, transpose=True))
    assert_same_bits(decode(to_numpy(w), to_numpy(s)), want.T)
    stacked_w, stacked_s = torch.stack([w, w.flip(0)]), torch.stack([s, s * 2])
    stacked = torch_side.dequantize_fp8(stacked_w, stacked_s, block_size=block_size, backend="torch")
    assert_same_bits(to_numpy(stacked[0]), want)
    assert_same_bits(
        jax_side.dequantize_fp8(to_numpy(stacked_w), to_numpy(stacked_s), block_size=block_size),
        to_numpy(stacked),
    )


def test_fp8_under_jit_is_exact():
    w, s = random_fp8((576, 7168)), random_scales((5, 56))
    got = jax.jit(lambda w, s: jax_side.dequantize_fp8(w, s))(to_numpy(w), to_numpy(s))
    assert_same_bits(got, to_numpy(torch_side.dequantize_fp8(w, s)))


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 3000),
    cols=st.integers(1, 3000),
    srows=st.integers(1, 40),
    scols=st.integers(1, 40),
    block=st.one_of(st.none(), st.integers(1, 400)),
)
def test_fp8_scale_layout_rules_agree_across_sides(rows, cols, srows, scols, block):
    def decide(fn):
        try:
            return tuple(fn((rows, cols), (srows, scols), block))
        except ValueError as e:
            return ("error", str(e))

    assert decide(jax_side.fp8_scale_layout) == decide(torch_side.fp8_scale_layout)


def test_fp8_bad_inputs():
    with pytest.raises(TypeError, match="bitcast_convert_type"):
        jax_side.dequantize_fp8(np.zeros((4, 4), np.uint8), np.ones(1, np.float32))
    with pytest.raises(ValueError, match=r"block 128 needs \(5, 56\)"):
        jax_side.dequantize_fp8(to_numpy(random_fp8((576, 7168))), np.ones((4, 56), np.float32))


def test_nf4_bad_inputs():
    _, packed, qs = bnb_quantize((40, 96), nested=True)
    p, a, kw = bnb_pieces(packed, qs)
    with pytest.raises(ValueError, match=r"holds 1919 bytes.*needs 1920"):
        jax_side.dequantize_nf4(p[:-1], a, **kw)
    with pytest.raises(TypeError, match=r"nested .*absmax is uint8, got float32"):
        jax_side.dequantize_nf4(p, a.astype(np.float32), **kw)
    with pytest.raises(TypeError, match="pass nested_absmax"):
        jax_side.dequantize_nf4(p, a, shape=(40, 96))
    with pytest.raises(ValueError, match=r"absmax has 59 entries.*need 60"):
        jax_side.dequantize_nf4(p, a[:-1], **kw)
    with pytest.raises(TypeError, match="FP8 data"):
        jax_side.dequantize_nf4(to_numpy(random_fp8((1920,))), a, **kw)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        jax_side.dequantize_nf4(p, a, **{**kw, "blocksize": 48})
    with pytest.raises(ValueError, match=r"a nested absmax needs its offset: pass offset="):
        jax_side.dequantize_nf4(p, a, **{k: v for k, v in kw.items() if k != "offset"})
    with pytest.raises(ValueError, match=r"blocksize must be one of the ints .* got 64.0"):
        jax_side.dequantize_nf4(p, a, **{**kw, "blocksize": 64.0})
    with pytest.raises(ValueError, match=r"offset must be one number .* got shape \(2,\)"):
        jax_side.dequantize_nf4(p, a, **{**kw, "offset": np.array([0.1, 0.2], np.float32)})
    with pytest.raises(TypeError, match="offset must be a real number"):
        jax_side.dequantize_nf4(p, a, **{**kw, "offset": 1j})
    with pytest.raises(TypeError, match=r"shape must hold ints, got \(40.5, 96\)"):
        jax_side.dequantize_nf4(p, a, **{**kw, "shape": (40.5, 96)})
    with pytest.raises(ValueError, match="shape must not have negative sizes"):
        jax_side.dequantize_nf4(p, a, **{**kw, "shape": (-40, -96)})
    with pytest.raises(ValueError, match=r"absmax has 60 entries; 3840 elements in blocks of 128 need 30"):
        jax_side.dequantize_nf4(p, a, **{**kw, "blocksize": 128})  # the absmax, not the nested one, named
    torch_offset = torch.tensor(kw["offset"])  # a QuantState's offset, as bitsandbytes holds it
    assert_same_bits(
        jax_side.dequantize_nf4(p, a, **{**kw, "offset": torch_offset}), jax_side.dequantize_nf4(p, a, **kw)
    )
    with pytest.raises(TypeError, match="offset must be a real number, got object"):
        jax_side.dequantize_nf4(p, a, **{**kw, "offset": object()})


def test_nested_blocks_larger_than_the_absmax():
    """A nested block size past the absmax's end decodes as one nested block (it aborted XLA's operations)."""
    _, packed, qs = bnb_quantize((40, 96), nested=True)
    p, a, kw = bnb_pieces(packed, qs)
    want = jax_side.dequantize_nf4(p, a, **kw)
    for nested_blocksize in (2**62, 2**63, 10**30):
        assert_same_bits(jax_side.dequantize_nf4(p, a, **{**kw, "nested_blocksize": nested_blocksize}), want)


def test_empty():
    got = jax_side.dequantize_nf4(np.zeros(0, np.uint8), np.zeros(0, np.float32), shape=(0, 64))
    assert got.shape == (0, 64) and got.dtype == jnp.bfloat16
    assert (
        math.prod(jax_side.dequantize_fp8(np.zeros((0, 8), "float8_e4m3fn"), np.ones(1, np.float32)).shape)
        == 0
    )


def _lowered(fn, *args):
    """The program ``fn`` becomes on the CPU (on a GPU machine too, whose default is the GPU)."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",)).as_text()


def test_the_cpu_decode_is_the_kernel_where_ready(decode_path):
    """A program decoding on the CPU calls the kernel once it is ready, and not before (XLA's operations)."""
    for nested in (True, False):
        _, packed, qs = bnb_quantize((64, 96), nested=nested)
        p, a, kw = bnb_pieces(packed, qs)
        text = _lowered(lambda p, a, kw=kw: jax_side.dequantize_nf4(p, a, **kw), p, a)
        assert (_cpu_kernel.TARGET in text) == (decode_path == "kernel")


def test_both_sides_read_integer_and_number_arguments_alike():
    """numpy ints are ints and bools are not, on both sides; a Python number is an FP8 scale on both (as
    its float32, also under jax_enable_x64); a block size is checked even where one scale ignores it."""
    _, packed, qs = bnb_quantize((64, 128), nested=True)
    t = dict(
        shape=(64, 128), nested_absmax=qs.state2.absmax, nested_code=qs.state2.code, offset=float(qs.offset)
    )
    j = {**t, "nested_absmax": to_numpy(qs.state2.absmax), "nested_code": to_numpy(qs.state2.code)}
    want = torch_side.dequantize_nf4(packed, qs.absmax, **t)
    got = torch_side.dequantize_nf4(packed, qs.absmax, **{**t, "nested_blocksize": np.int64(256)})
    assert_same_bits(to_numpy(got), to_numpy(want))
    assert_same_bits(jax_side.dequantize_nf4(to_numpy(packed), to_numpy(qs.absmax), **j), to_numpy(want))
    for side, p, a, kw in (
        (torch_side, packed, qs.absmax, t),
        (jax_side, to_numpy(packed), to_numpy(qs.absmax), j),
    ):
        with pytest.raises(ValueError, match="nested_blocksize must be a positive int, got True"):
            side.dequantize_nf4(p, a, **{**kw, "nested_blocksize": True})
        with pytest.raises(TypeError, match="offset must be"):
            side.dequantize_nf4(p, a, **{**kw, "offset": True})
    w = random_fp8((64, 64))
    want = to_numpy(torch_side.dequantize_fp8(w, 2))
    assert_same_bits(jax_side.dequantize_fp8(to_numpy(w), 2), want)
    assert_same_bits(jax_side.dequantize_fp8(to_numpy(w), np.float64(2.0)), want)
    jax.config.update("jax_enable_x64", True)
    try:
        assert_same_bits(jax_side.dequantize_fp8(to_numpy(w), 2.0), want)
    finally:
        jax.config.update("jax_enable_x64", False)
    for side in (torch_side, jax_side):
        with pytest.raises(ValueError, match="block_size must be a positive int"):
            side.fp8_scale_layout((4, 4), (1, 1), -1)


def test_a_kept_weight_with_a_torch_piece_or_a_number_offset():
    """quantized_matmul named no torch piece ("Cannot interpret 'torch.uint8' as a data type"), and nbytes
    failed on an offset given as a Python float, which dequantize() takes."""
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, 32 * 64 // 2, dtype=np.uint8)
    w = jax_side.NF4Weight(packed=torch.from_numpy(packed), absmax=jnp.ones(32, jnp.float32), shape=(32, 64))
    with pytest.raises(TypeError, match=r"a piece of the NF4Weight is a torch tensor.*qbridge\.to_jax"):
        jax_side.quantized_matmul(jnp.ones((2, 64)), w)
    codes = jnp.asarray(rng.integers(0, 256, 32, dtype=np.uint8))
    nested = jax_side.NF4Weight(packed=jnp.asarray(packed), absmax=codes, nested_absmax=jnp.ones(1, jnp.float32),
                                offset=0.5, shape=(32, 64))  # fmt: skip
    assert nested.nbytes == packed.nbytes + 32 + 4 + 4  # the offset as the float32 array it becomes
    assert jax_side.quantized_nbytes({"w": nested}) == (nested.nbytes, 32 * 64 * 2)


def test_dtypes_and_scales_that_are_not_arrays_are_named():
    """dtype=None read as float64, a torch dtype gave numpy's "Cannot interpret", a scale of None or "2" gave
    JAX's internal errors; dequantize_int8 took dtype="float16" for a device (a name is now its dtype) and returned a 0-d CB as [1]."""
    p, a = np.zeros(32, np.uint8), np.ones(1, np.float32)
    with pytest.raises(ValueError, match="output dtype must be float16, bfloat16 or float32, got None"):
        jax_side.dequantize_nf4(p, a, shape=(64,), dtype=None)
    with pytest.raises(TypeError, match=r"dtype is a torch dtype \(torch.bfloat16\).*jnp.bfloat16"):
        jax_side.dequantize_nf4(p, a, shape=(64,), dtype=torch.bfloat16)
    w8 = jnp.ones((4, 4), jnp.float8_e4m3fn)
    for bad in (None, "2", [2.0]):
        with pytest.raises(TypeError, match="scale_inv must be an array or a real number"):
            jax_side.dequantize_fp8(w8, bad)
    with pytest.raises(TypeError, match="output dtype must be"):
        jax_side.dequantize_fp8(w8, 2.0, dtype=jnp.int8)
    cb = torch.tensor([[5, -3], [127, -127]], dtype=torch.int8)
    # a dtype's name is its dtype (as in torch_side's other decodes), not a device
    assert torch_side.dequantize_int8(cb, torch.ones(2), dtype="float16").dtype == torch.float16
    for bad in ("cuda", torch.int8):
        with pytest.raises(TypeError, match=r"dtype must be .*float16, .*bfloat16 or .*float32"):
            torch_side.dequantize_int8(cb, torch.ones(2), dtype=bad)
    assert torch_side.dequantize_int8(torch.tensor(5, dtype=torch.int8), torch.ones(1)).shape == ()
