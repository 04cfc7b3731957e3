"""Malformed input gets a clear error naming what arrived and what was expected: never a crash, never a
silently wrong value."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import bnb_quantize, legacy_list, random_fp8, random_scales
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import torch_side

pytest.importorskip("bitsandbytes")
ERRORS = (TypeError, ValueError, AssertionError)


def _state(nested=True):
    _, packed, qs = bnb_quantize((40, 96), nested=nested, seed=7)
    return packed, qs


def test_packed_dtype_fp8_bytes():
    packed, qs = _state()
    fp8 = torch.zeros(packed.numel(), dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"float8_e4m3fn.*FP8 data: use dequantize_fp8"):
        torch_side.dequantize(fp8, qs)


def test_fp8_weight_viewed_as_uint8_with_a_4bit_state():
    _, qs = _state()
    w = random_fp8((40, 96)).view(torch.uint8)  # one byte per element: twice what 4-bit needs
    with pytest.raises(ValueError, match=r"holds 3840 bytes.*needs 1920 bytes"):
        torch_side.dequantize(w, qs)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.float64])
def test_int_and_other_weights(dtype):
    packed, qs = _state()
    with pytest.raises(TypeError, match=str(dtype)):
        torch_side.dequantize(torch.zeros(packed.numel(), dtype=dtype), qs)


def test_absmax_length():
    packed, qs = _state(nested=False)
    qs.absmax = qs.absmax[:-1]
    with pytest.raises(ValueError, match=r"absmax has 59 entries.*need 60"):
        torch_side.dequantize(packed, qs)


def test_nested_absmax_length():
    packed, qs = _state()
    qs.state2.absmax = torch.cat([qs.state2.absmax, qs.state2.absmax])
    with pytest.raises(ValueError, match=r"nested_absmax has 2 entries.*need 1"):
        torch_side.dequantize(packed, qs)


def test_float_absmax_with_nested_pieces():
    packed, qs = _state()
    with pytest.raises(TypeError, match=r"nested .*absmax is uint8, got torch.float32"):
        torch_side.dequantize_nf4(
            packed,
            qs.absmax.float(),
            shape=(40, 96),
            nested_absmax=qs.state2.absmax,
            nested_code=qs.state2.code,
        )


def test_uint8_absmax_without_nested_pieces():
    packed, qs = _state()
    with pytest.raises(TypeError, match="pass nested_absmax, nested_code and offset"):
        torch_side.dequantize_nf4(packed, qs.absmax, shape=(40, 96))


def test_unknown_quant_type_and_blocksize():
    packed, qs = _state()
    q = copy.copy(qs)
    q.quant_type = "int4"
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4', got 'int4'"):
        torch_side.dequantize(packed, q)
    q = copy.copy(qs)
    q.blocksize = 48
    with pytest.raises(ValueError, match=r"blocksize must be one of .* got 48"):
        torch_side.dequantize(packed, q)
    pieces = dict(
        shape=tuple(qs.shape), nested_absmax=qs.state2.absmax, nested_code=qs.state2.code, offset=qs.offset
    )
    without = {k: v for k, v in pieces.items() if k != "offset"}
    with pytest.raises(ValueError, match=r"a nested absmax needs its offset: pass offset="):
        torch_side.dequantize_nf4(packed, qs.absmax, **without)  # would shift every scale silently
    with pytest.raises(ValueError, match=r"blocksize must be one of the ints .* got 64.0"):
        torch_side.dequantize_nf4(packed, qs.absmax, blocksize=64.0, **pieces)  # equal to 64, still refused
    want = torch_side.dequantize_nf4(packed, qs.absmax, blocksize=64, **pieces)
    got = torch_side.dequantize_nf4(packed, qs.absmax, blocksize=np.int64(64), **pieces)  # numpy ints do
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_output_dtype():
    packed, qs = _state()
    q = copy.copy(qs)
    q.dtype = torch.float64
    with pytest.raises(
        ValueError, match=r"float16, bfloat16 or float32 \(a torch.dtype or its name\), got torch.float64"
    ):
        torch_side.dequantize(packed, q)


def test_incomplete_quant_state():
    packed, qs = _state()
    q = copy.copy(qs)
    q.shape = None
    with pytest.raises(ValueError, match="incomplete QuantState: shape missing"):
        torch_side.dequantize(packed, q)
    q = copy.copy(qs)
    q.offset = None
    with pytest.raises(ValueError, match=r"nested .* without offset"):
        torch_side.dequantize(packed, q)


def test_legacy_list_layouts():
    packed, qs = _state()
    lst = legacy_list(qs)
    with pytest.raises(ValueError, match="has 5 entries"):
        torch_side.dequantize(packed, lst[:5])
    bad = list(lst)
    bad[4] = [qs.offset]
    with pytest.raises(ValueError, match=r"entry 4 must be \[offset, state2\]"):
        torch_side.dequantize(packed, bad)
    bad = list(lst)
    bad[2] = "bfloat16"
    with pytest.raises(ValueError, match=r"entry 2 .* must be a torch.dtype"):
        torch_side.dequantize(packed, bad)


def test_not_a_quant_state():
    packed, _ = _state()
    with pytest.raises(TypeError, match="must be a bitsandbytes QuantState or the legacy list"):
        torch_side.dequantize(packed, {"absmax": 1})


def test_w_not_a_tensor():
    _, qs = _state()
    with pytest.raises(TypeError, match=r"W must be a torch.Tensor, got list"):
        torch_side.dequantize([1, 2, 3], qs)


def test_unknown_backend():
    packed, qs = _state()
    with pytest.raises(ValueError, match="backend must be one of"):
        torch_side.dequantize(packed, qs, backend="cuda")


@pytest.mark.gpu
def test_pieces_on_different_devices():
    packed, qs = _state()
    # cuda:N: on a machine with several GPUs, JAX starting its GPU backend may leave another device current
    with pytest.raises(ValueError, match=r"weight's device cuda:\d; got absmax on cpu"):
        torch_side.dequantize_nf4(
            packed.cuda(), qs.absmax, shape=(40, 96), nested_absmax=qs.state2.absmax.cuda(),
            nested_code=qs.state2.code.cuda(), offset=qs.offset,
        )  # fmt: skip
    w = random_fp8((256, 256)).cuda()
    with pytest.raises(ValueError, match="got scale_inv on cpu"):
        torch_side.dequantize_fp8(w, random_scales((2, 2)))


CORRUPTIONS = {
    "truncate absmax": lambda qs: setattr(qs, "absmax", qs.absmax[: max(0, qs.absmax.numel() - 1)]),
    "extend absmax": lambda qs: setattr(qs, "absmax", torch.cat([qs.absmax, qs.absmax[:1]])),
    "absmax as float64": lambda qs: setattr(qs, "absmax", qs.absmax.double()),
    "shape grows": lambda qs: setattr(qs, "shape", torch.Size([qs.shape[0] + 2, qs.shape[1]])),
    "shape shrinks": lambda qs: setattr(qs, "shape", torch.Size([qs.shape[0], max(0, qs.shape[1] - 2)])),
    "blocksize doubles": lambda qs: setattr(qs, "blocksize", qs.blocksize * 2),
    "blocksize odd": lambda qs: setattr(qs, "blocksize", qs.blocksize + 1),
    "quant type": lambda qs: setattr(qs, "quant_type", "nf8"),
    "dtype int": lambda qs: setattr(qs, "dtype", torch.int8),
}


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 30),
    cols=st.integers(3, 200),
    nested=st.booleans(),
    corruption=st.sampled_from(sorted(CORRUPTIONS)),
    seed=st.integers(0, 1000),
)
def test_corrupted_states_raise(rows, cols, nested, corruption, seed):
    # one block either way: doubling the blocksize changes nothing observable
    assume(not (corruption == "blocksize doubles" and rows * cols <= 64))
    _, packed, qs = bnb_quantize((rows, cols), nested=nested, seed=seed)
    q = copy.deepcopy(qs)
    CORRUPTIONS[corruption](q)
    with pytest.raises(ERRORS):
        torch_side.dequantize(packed, q)


# --- FP8 -------------------------------------------------------------------------------------------


def test_fp8_uint8_weight_names_the_fix():
    w = random_fp8((256, 256)).view(torch.uint8)
    with pytest.raises(TypeError, match=r"W.view\(torch.float8_e4m3fn\)"):
        torch_side.dequantize_fp8(w, random_scales((2, 2)))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bfloat16, torch.float32])
def test_fp8_non_float8_weight(dtype):
    with pytest.raises(TypeError, match="takes a float8 weight"):
        torch_side.dequantize_fp8(torch.zeros(4, 4, dtype=dtype), torch.ones(1))


def test_fp8_scale_shape_wrong():
    w = random_fp8((576, 7168))
    with pytest.raises(ValueError, match=r"scale_inv has shape \(4, 56\).*block 128 needs \(5, 56\)"):
        torch_side.dequantize_fp8(w, random_scales((4, 56)))
    with pytest.raises(
        ValueError,
        match=r"\(5, 57\); a \[576, 7168\] weight takes .*block scales \(5, 56\) \(block_size \(128, 128\)\)",
    ):
        torch_side.dequantize_fp8(w, random_scales((5, 57)), block_size=128)
    with pytest.raises(ValueError, match=r"\(1, 1, 2\) does not fit a weight of shape \(4, 8, 8\)"):
        torch_side.dequantize_fp8(random_fp8((4, 8, 8)), random_scales((1, 1, 2)))


def test_fp8_ambiguous_block_asks_for_block_size():
    w = random_fp8((250, 250))  # 3x3 scales: any block from 84 to 124 fits, and each cuts differently
    with pytest.raises(ValueError, match=r"square blocks from 84 to 124 .*pass block_size="):
        torch_side.dequantize_fp8(w, random_scales((3, 3)))
    assert torch_side.fp8_scale_layout((250, 250), (3, 3), block_size=100).block == (100, 100)


def test_fp8_scale_dtype_and_output_dtype():
    w = random_fp8((128, 128))
    with pytest.raises(
        TypeError, match=r"scale_inv must be float32, bfloat16, float16 or float8_e8m0fnu, got torch.int32"
    ):
        torch_side.dequantize_fp8(w, torch.ones(1, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="output dtype must be"):
        torch_side.dequantize_fp8(w, torch.ones(1, 1), torch.int8)


def test_output_dtypes_given_by_name():
    """The output dtype may be named as a quant-state JSON or jax_side names it ("bfloat16"); the same bits as
    the torch dtype. Other names are refused saying what is taken (the message read "must be float16,
    bfloat16 or float32, got bfloat16" for the name)."""
    _, packed, qs = bnb_quantize((45, 70), nested=True, seed=3)
    pieces = dict(
        shape=(45, 70), nested_absmax=qs.state2.absmax, nested_code=qs.state2.code, offset=qs.offset
    )
    w, scale = random_fp8((200, 130)), random_scales((2, 2))
    cb, scb = torch.randint(-127, 128, (5, 7), dtype=torch.int8), torch.rand(5) + 0.5
    for name, dtype in [
        ("bfloat16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("float32", torch.float32),
    ]:
        want = torch_side.dequantize_nf4(packed, qs.absmax, **pieces, dtype=dtype)
        got = torch_side.dequantize_nf4(packed, qs.absmax, **pieces, dtype=name)
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        want = torch_side.dequantize_fp8(w, scale, dtype)
        for got in (
            torch_side.dequantize_fp8(w, scale, name),
            torch_side.dequantize_fp8_many([w], [scale], name)[0],
        ):
            assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        got = torch_side.dequantize_int8(cb, scb, dtype=name)
        assert torch.equal(got, torch_side.dequantize_int8(cb, scb, dtype=dtype))
    taken = r"output dtype must be float16, bfloat16 or float32 \(a torch\.dtype or its name\), got 'bf16'"
    with pytest.raises(ValueError, match=taken):
        torch_side.dequantize_nf4(packed, qs.absmax, **pieces, dtype="bf16")
    for call in (
        lambda: torch_side.dequantize_fp8(w, scale, "bf16"),
        lambda: torch_side.dequantize_int8(cb, scb, dtype="bf16"),
    ):
        with pytest.raises(TypeError, match=taken):
            call()
    with pytest.raises(ValueError, match=r"\(a torch\.dtype or its name\), got torch\.float64"):
        torch_side.dequantize_nf4(packed, qs.absmax, **pieces, dtype=torch.float64)


def test_fp8_non_finite_scales():
    w = random_fp8((256, 256))
    s = random_scales((2, 2))
    s[1, 0] = float("inf")
    got = torch_side.dequantize_fp8(w, s, torch.float32)
    assert torch.isinf(got[128:, :128]).any() and torch.isfinite(got[:128]).all()  # propagates by default
    with pytest.raises(ValueError, match=r"scale_inv holds 1 non-finite value.*index \(1, 0\)"):
        torch_side.dequantize_fp8(w, s, check_finite=True)


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="this torch has no float8_e8m0fnu")
def test_fp8_nan_e8m0_scales_are_caught_by_check_finite():
    """torch.isfinite calls e8m0's NaN byte (0xFF) finite: the check widens float8 scales first."""
    w = random_fp8((256, 128))
    s = torch.full((2, 1), 127, dtype=torch.uint8)  # 2**0
    s[1, 0] = 255  # NaN
    s = s.view(torch.float8_e8m0fnu)
    with pytest.raises(ValueError, match=r"scale_inv holds 1 non-finite value.*index \(1, 0\): nan"):
        torch_side.dequantize_fp8(w, s, check_finite=True)
    with pytest.raises(ValueError, match=r"non-finite"):
        torch_side.dequantize_fp8_many([w], [s], check_finite=True)


def test_fp8_backend_bnb_refused():
    with pytest.raises(ValueError, match="no FP8"):
        torch_side.dequantize_fp8(random_fp8((8, 8)), torch.ones(1), backend="bnb")


def test_fp8_scale_as_a_number():
    w = random_fp8((4, 8), seed=1)
    want = torch_side.dequantize_fp8(w, torch.tensor(2.0))
    import ml_dtypes

    bf16 = np.array(2.0, ml_dtypes.bfloat16)  # 0-d bfloat16 (numpy's kind "V")
    for number in (
        2.0,
        2,
        np.float32(2.0),
        np.int64(2),
        np.array(2.0, np.float32),
        bf16,
    ):  # one per-tensor scale
        assert torch.equal(torch_side.dequantize_fp8(w, number), want)
        assert torch.equal(torch_side.dequantize_weight(w, number), want)
    for wrong in (True, np.bool_(True), "2", None, np.array([2.0]), np.array(True), np.array("2.0")):
        with pytest.raises(TypeError, match="scale_inv must be a tensor or a real number, got"):
            torch_side.dequantize_fp8(w, wrong)


def test_non_integer_shapes_and_block_sizes_are_refused_not_truncated():
    """64.5 rows were read as 64, a QuantState's blocksize 64.9 as 64 (and "64" as 64): refused by name."""
    packed, qs = _state()
    with pytest.raises(ValueError, match=r"shape must be a sequence of ints, got \(64.5, 128\)"):
        torch_side.dequantize_nf4(packed, qs.absmax, shape=(64.5, 128), blocksize=64)
    torch_side.dequantize_nf4(packed, qs.absmax, shape=tuple(qs.shape), blocksize=64, nested_absmax=qs.state2.absmax,
                              nested_code=qs.state2.code, offset=qs.offset)  # fmt: skip
    with pytest.raises(ValueError, match=r"shape must be a sequence of ints, got \(\d+\.0, \d+\)"):  # planned
        torch_side.dequantize_nf4(
            packed, qs.absmax, shape=(float(qs.shape[0]), qs.shape[1]), nested_absmax=qs.state2.absmax,
            nested_code=qs.state2.code, offset=qs.offset,
        )  # fmt: skip
    with pytest.raises(ValueError, match="shape must be a sequence of ints, got 8192"):
        torch_side.dequantize_nf4(packed, qs.absmax, shape=8192)
    for bad in (64.9, "64", None):
        q = copy.copy(qs)
        q.blocksize = bad
        with pytest.raises((TypeError, ValueError), match=r"blocksize"):
            torch_side.dequantize(packed, q)
    q = copy.copy(qs)
    q.state2 = copy.copy(qs.state2)
    q.state2.blocksize = 256.0
    with pytest.raises(TypeError, match=r"state2.blocksize must be an int, got 256.0"):
        torch_side.dequantize(packed, q)
    legacy = [
        qs.absmax,
        qs.shape,
        qs.dtype,
        64.7,
        [qs.offset, [qs.state2.absmax, qs.state2.code, 256]],
        "nf4",
    ]
    with pytest.raises(TypeError, match=r"entry 3 \(blocksize\) must be an int, got 64.7"):
        torch_side.dequantize(packed, legacy)
    legacy[3] = np.int64(64)  # numpy ints are ints
    want = torch_side.dequantize(packed, qs)
    assert torch.equal(torch_side.dequantize(packed, legacy).view(torch.int16), want.view(torch.int16))


def test_dequantize_refuses_weights_quantized_in_other_formats_instead_of_returning_their_memory():
    """Without a quant state, dequantize and dequantize_many handed a bitsandbytes 8-bit weight back as its
    int8 codes and a torchao weight or a torch-quantized tensor back unchanged, as if they were the dense
    weight; they raise and point to dequantize_weight, which decodes each of them. Weights not quantized yet
    still come back as they are."""
    bnb = pytest.importorskip("bitsandbytes")
    ao = pytest.importorskip("torchao.quantization")
    int8 = bnb.nn.Linear8bitLt(96, 64, has_fp16_weights=False).to("cpu").weight
    assert int8.SCB is not None and int8.dtype == torch.int8
    linear = torch.nn.Linear(96, 64)
    ao.quantize_(linear, ao.Int8WeightOnlyConfig())
    nf4 = ao.NF4Tensor.from_tensor(torch.randn(128, 256, dtype=torch.bfloat16), 64, 256)
    quantized = torch.quantize_per_tensor(torch.randn(3, 4), 0.1, 0, torch.qint8)
    for w, what in [
        (int8, r"a quantized bitsandbytes\.nn\.modules\.Int8Params \(8-bit\)"),
        (linear.weight, r"a torchao\..*Int8Tensor"),
        (nf4, r"a torchao\..*NF4Tensor"),
        (quantized, r"a torch-quantized tensor \(torch\.qint8\)"),
    ]:
        with pytest.raises(TypeError, match=rf"^W is {what}, not a bitsandbytes 4-bit weight: "
                           r"torch_side\.dequantize_weight\(W\) decodes it"):  # fmt: skip
            torch_side.dequantize(w)
        with pytest.raises(TypeError, match=rf"^weights\[1\]: W is {what}"):
            torch_side.dequantize_many([torch.zeros(2), w])
        assert not torch_side.is_quant_tensor_subclass(dense := torch_side.dequantize_weight(w))
        assert dense.is_floating_point()
    fresh = bnb.nn.Linear8bitLt(96, 64, has_fp16_weights=False).weight  # not quantized until moved
    assert fresh.SCB is None and torch_side.dequantize(fresh) is fresh


def test_dequantize_refuses_what_is_not_a_tensor():
    """With no quant state, a weight comes back as it is: only a tensor, not a numpy array or None; a dict of
    weights is not taken for the list of its keys."""
    with pytest.raises(TypeError, match=r"W must be a torch\.Tensor, got ndarray"):
        torch_side.dequantize(np.zeros((4, 1), np.uint8))
    with pytest.raises(TypeError, match=r"W must be a torch\.Tensor, got NoneType"):
        torch_side.dequantize(None)
    t = torch.zeros(4, 1, dtype=torch.uint8)
    assert torch_side.dequantize(t) is t
    with pytest.raises(TypeError, match=r"weights\[0\].*must be a torch.Tensor, got str"):
        torch_side.dequantize_many(["not a tensor"])
    with pytest.raises(
        TypeError, match=r"weights must be a list .* got a dict: pass its list\(....values\(\)\)"
    ):
        torch_side.dequantize_many({"layer.weight": t})
