"""torch_side.dequantize_fp8 against a tile-by-tile float32 reference and torchao's own float8 decode."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_bitwise_equal, fp8_reference_loops, random_fp8, random_scales
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_side

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@pytest.mark.parametrize(
    "shape, scale_shape, block",
    [
        ((576, 7168), (5, 56), (128, 128)),  # DeepSeek-V3 kv_a_proj_with_mqa: partial last block row
        ((256, 384), (2, 3), (128, 128)),
        ((130, 129), (2, 2), (128, 128)),
        ((7, 300), (1, 3), (128, 128)),
        ((1, 1), (1, 1), (1, 1)),
    ],
)
def test_block_scales(device, shape, scale_shape, block):
    for i, dtype in enumerate(OUT_DTYPES):
        for fp8 in FP8:
            w = random_fp8(shape, seed=i, dtype=fp8).to(device)
            s = random_scales(scale_shape, seed=i + 10).to(device)
            got = torch_side.dequantize_fp8(w, s, dtype)
            assert got.device.type == device and got.dtype == dtype
            assert_bitwise_equal(got, fp8_reference_loops(w, s, block, dtype))


def test_default_dtype_is_bfloat16():
    w, s = random_fp8((128, 128)), random_scales((1, 1))
    assert torch_side.dequantize_fp8(w, s).dtype == torch.bfloat16


def test_row_and_tensor_scales(device):
    w = random_fp8((37, 301)).to(device)
    row = random_scales((37, 1)).to(device)
    assert_bitwise_equal(
        torch_side.dequantize_fp8(w, row), fp8_reference_loops(w, row, (1, 301), torch.bfloat16)
    )
    assert_bitwise_equal(
        torch_side.dequantize_fp8(w, row.reshape(37)), fp8_reference_loops(w, row, (1, 301), torch.bfloat16)
    )
    one = random_scales(()).to(device)
    want = (w.float() * one.float()).to(torch.float16)
    assert_bitwise_equal(torch_side.dequantize_fp8(w, one, torch.float16), want)
    assert_bitwise_equal(torch_side.dequantize_fp8(w, one.reshape(1, 1), torch.float16), want)
    assert_bitwise_equal(torch_side.dequantize_fp8(w, float(one), torch.float16), want)
    w3 = random_fp8((2, 3, 5)).to(device)  # per-tensor scales fit any rank
    assert_bitwise_equal(torch_side.dequantize_fp8(w3, one), (w3.float() * one).to(torch.bfloat16))


def test_non_square_blocks():
    w, s = random_fp8((300, 200)), random_scales((3, 4))
    got = torch_side.dequantize_fp8(w, s, torch.float32, block_size=(100, 64))
    assert_bitwise_equal(got, fp8_reference_loops(w, s, (100, 64), torch.float32))


def test_block_inference():
    assert torch_side.fp8_scale_layout((200, 300), (2, 3)).block == (128, 128)  # 128 whenever it fits
    assert torch_side.fp8_scale_layout((222, 1000), (2, 10)).block == (
        111,
        111,
    )  # the one square block that fits
    with pytest.raises(ValueError, match="from 110 to 111"):
        torch_side.fp8_scale_layout((220, 1000), (2, 10))
    w, s = random_fp8((222, 1000)), random_scales((2, 10))
    assert_bitwise_equal(
        torch_side.dequantize_fp8(w, s), fp8_reference_loops(w, s, (111, 111), torch.bfloat16)
    )


def test_transpose(device):
    w, s = random_fp8((576, 7168)).to(device), random_scales((5, 56)).to(device)
    got = torch_side.dequantize_fp8(w, s, transpose=True)
    assert got.shape == (7168, 576)
    assert_bitwise_equal(got, fp8_reference_loops(w, s, (128, 128), torch.bfloat16).t())


def test_bf16_and_fp16_scales_widen_exactly():
    w = random_fp8((256, 256))
    s = random_scales((2, 2)).to(torch.bfloat16)
    assert_bitwise_equal(
        torch_side.dequantize_fp8(w, s), fp8_reference_loops(w, s.float(), (128, 128), torch.bfloat16)
    )


def test_nan_fp8_values_propagate():
    w = random_fp8((128, 128))
    w.view(torch.uint8)[3, 5] = 0x7F  # e4m3fn NaN
    got = torch_side.dequantize_fp8(w, random_scales((1, 1)), torch.float32)
    assert torch.isnan(got[3, 5]) and torch.isnan(got).sum() == 1


def test_empty_weight():
    got = torch_side.dequantize_fp8(torch.empty(0, 256, dtype=torch.float8_e4m3fn), torch.empty(0, 2))
    assert got.shape == (0, 256) and got.dtype == torch.bfloat16


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(1, 400),
    cols=st.integers(1, 400),
    block=st.one_of(st.sampled_from([128]), st.integers(1, 300)),
    dtype=st.sampled_from(OUT_DTYPES),
    fp8=st.sampled_from(FP8),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_with_explicit_block(rows, cols, block, dtype, fp8, seed):
    w = random_fp8((rows, cols), seed=seed, dtype=fp8)
    grid = (math.ceil(rows / block), math.ceil(cols / block))
    s = random_scales(grid, seed=seed + 1)
    got = torch_side.dequantize_fp8(w, s, dtype, block_size=block)
    assert_bitwise_equal(got, fp8_reference_loops(w, s, (block, block), dtype))


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 2000), cols=st.integers(1, 2000), block=st.integers(1, 600))
def test_inferred_block_is_right_or_refused(rows, cols, block):
    """Inference follows its documented order: 128 when 128 fits, else exact, else it asks for block_size."""
    grid = (math.ceil(rows / block), math.ceil(cols / block))
    if grid == (math.ceil(rows / 128), math.ceil(cols / 128)) and grid != (1, 1):
        assert torch_side.fp8_scale_layout((rows, cols), grid).block == (128, 128)
        return
    try:
        layout = torch_side.fp8_scale_layout((rows, cols), grid)
    except ValueError as e:
        assert "block_size" in str(e)
        return
    if layout.kind == "tensor":
        assert grid == (1, 1)
        return
    bo, bi = layout.block
    # the chosen block must cut the weight exactly like the true one
    for n, b_true, b_got in ((rows, block, bo), (cols, block, bi)):
        assert [min(i * b_true, n) for i in range(math.ceil(n / b_true) + 1)] == [
            min(i * b_got, n) for i in range(math.ceil(n / b_got) + 1)
        ]


def test_matches_torchao_float8_rowwise():
    """torchao's Float8Tensor stores per-row scales; its own decode and ours are the same arithmetic."""
    pytest.importorskip("torchao")
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    lin = torch.nn.Linear(96, 40, bias=False).to(torch.bfloat16)
    quantize_(lin, Float8WeightOnlyConfig())
    w = lin.weight
    assert_bitwise_equal(torch_side.dequantize_fp8(w.qdata, w.scale, torch.bfloat16), w.dequantize())
