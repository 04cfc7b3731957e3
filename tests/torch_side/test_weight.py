"""dequantize_weight and is_quant_tensor_subclass on weights made by torchao and bitsandbytes themselves."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bitwise_equal, bnb_quantize, bnb_reference, random_fp8, random_scales

import torch_side


def _torchao_linear(config, shape=(48, 96), dtype=torch.bfloat16, device="cpu", seed=0):
    ao = pytest.importorskip("torchao.quantization")
    torch.manual_seed(seed)
    lin = torch.nn.Linear(shape[1], shape[0], bias=False).to(dtype).to(device)
    dense = lin.weight.detach().clone()
    ao.quantize_(lin, config)
    return lin.weight, dense


def _configs():
    ao = pytest.importorskip("torchao.quantization")
    return {
        "int8": ao.Int8WeightOnlyConfig(),
        "float8": ao.Float8WeightOnlyConfig(),
        "intx": ao.IntxWeightOnlyConfig(),
    }


@pytest.mark.parametrize("kind", ["int8", "float8", "intx"])
def test_torchao_subclasses_match_their_own_dequantize(device, kind):
    w, dense = _torchao_linear(_configs()[kind], shape=(40, 136), device=device)
    assert torch_side.is_quant_tensor_subclass(w)
    assert isinstance(w, torch.nn.Parameter)  # the reason `type(W) is not torch.Tensor` is not enough
    got = torch_side.dequantize_weight(w)
    assert type(got) is torch.Tensor and got.device.type == device
    assert_bitwise_equal(got, w.dequantize())
    assert got.dtype == dense.dtype and got.shape == dense.shape
    # an independent reconstruction from the stored pieces, and closeness to the float weight
    q, s = w.qdata.to(torch.float32), w.scale.to(torch.float32)
    zp = getattr(w, "zero_point", None)
    if zp is not None:
        q = q - zp.to(torch.float32)
    assert_bitwise_equal(got, (q * s).to(dense.dtype))
    assert (got.float() - dense.float()).abs().max() <= dense.float().abs().max() * 0.07


def test_torchao_nf4_uses_get_original_weight(device):
    ao = pytest.importorskip("torchao.quantization")
    torch.manual_seed(1)
    dense = torch.randn(128, 256, dtype=torch.bfloat16, device=device)  # torchao needs n % (64 * 256) == 0
    nf4 = ao.NF4Tensor.from_tensor(dense, 64, 256)
    assert torch_side.is_quant_tensor_subclass(nf4)
    got = torch_side.dequantize_weight(nf4)
    assert type(got) is torch.Tensor
    assert_bitwise_equal(got, nf4.get_original_weight())
    # NF4Tensor.dequantize is a static helper with another meaning; calling it would fail
    with pytest.raises(TypeError):
        nf4.dequantize()
    rel = (got.float() - dense.float()).norm() / dense.float().norm()
    assert rel < 0.12


def test_torchao_nf4_parameter(device):
    ao = pytest.importorskip("torchao.quantization")
    nf4 = ao.NF4Tensor.from_tensor(torch.randn(256, 64, dtype=torch.bfloat16, device=device), 64, 256)
    p = torch.nn.Parameter(nf4, requires_grad=False)
    assert torch_side.is_quant_tensor_subclass(p)
    assert_bitwise_equal(torch_side.dequantize_weight(p), nf4.get_original_weight())


def test_transpose_flag():
    w, _ = _torchao_linear(_configs()["int8"], shape=(40, 136))
    got = torch_side.dequantize_weight(w, transpose=True)
    assert got.shape == (136, 40)
    assert_bitwise_equal(got, w.dequantize().t())
    with pytest.raises(ValueError, match="2-D"):
        torch_side.dequantize_weight(torch.randn(2, 3, 4), transpose=True)


def test_plain_tensors_and_parameters_pass_through():
    t = torch.randn(4, 6)
    p = torch.nn.Parameter(torch.randn(4, 6))
    assert not torch_side.is_quant_tensor_subclass(t)
    assert not torch_side.is_quant_tensor_subclass(p)
    assert not torch_side.is_quant_tensor_subclass([1.0])
    assert torch_side.dequantize_weight(t) is t
    assert torch_side.dequantize_weight(p) is p
    tt = torch_side.dequantize_weight(t, transpose=True)
    assert tt.shape == (6, 4) and tt.data_ptr() == t.data_ptr()  # a view: aliases the input
    f8 = random_fp8((4, 4))
    assert torch_side.dequantize_weight(f8) is f8  # float8 without a scale is a plain tensor


def test_params4bit(device):
    bnb = pytest.importorskip("bitsandbytes")
    for quant_type, nested in (("nf4", True), ("fp4", False)):
        lin = bnb.nn.Linear4bit(72, 40, bias=False, quant_type=quant_type, compress_statistics=nested)
        lin = lin.to(device)
        w = lin.weight
        assert torch_side.is_quant_tensor_subclass(w)
        got = torch_side.dequantize_weight(w)
        assert got.shape == (40, 72)
        assert_bitwise_equal(got, bnb_reference(w.data, w.quant_state))
        assert_bitwise_equal(
            torch_side.dequantize_weight(w, transpose=True), bnb_reference(w.data, w.quant_state).t()
        )


def test_params4bit_not_yet_quantized_is_dense():
    bnb = pytest.importorskip("bitsandbytes")
    dense = torch.randn(8, 64)
    p = bnb.nn.Params4bit(dense.clone(), requires_grad=False, quant_type="nf4")
    assert not p.bnb_quantized
    assert torch.equal(torch_side.dequantize_weight(p), dense)


def test_int8params():
    bnb = pytest.importorskip("bitsandbytes")
    lin = bnb.nn.Linear8bitLt(64, 24, bias=False, has_fp16_weights=False)
    dense = lin.weight.data.clone()
    lin = lin.to("cpu")
    w = lin.weight
    got = torch_side.dequantize_weight(w)
    assert got.dtype == torch.float32 and got.shape == (24, 64)
    want = bnb.functional.int8_vectorwise_dequant(w.data, w.SCB)  # bitsandbytes' own decode, bit for bit
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert (got - dense.float()).abs().max() <= dense.abs().max() / 127


def test_four_bit_state_and_fp8_scale_as_quant_state(device):
    _, packed, qs = bnb_quantize((24, 80), device=device)
    assert_bitwise_equal(torch_side.dequantize_weight(packed, qs), bnb_reference(packed, qs))
    w, s = random_fp8((256, 130)).to(device), random_scales((2, 2)).to(device)
    assert_bitwise_equal(torch_side.dequantize_weight(w, s), torch_side.dequantize_fp8(w, s))
    with pytest.raises(TypeError, match=r"FP8 scale, but W is torch.uint8"):
        torch_side.dequantize_weight(packed, s)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_torch_quantized_tensor():
    q = torch.quantize_per_tensor(torch.randn(6, 8), 0.05, 3, torch.qint8)
    assert torch.equal(torch_side.dequantize_weight(q), q.dequantize())


class _Opaque(torch.Tensor):
    """A subclass that knows no way back to dense values."""


class _Broken(torch.Tensor):
    def dequantize(self):
        raise RuntimeError("kernel package missing")


def test_subclass_that_cannot_dequantize():
    t = torch.randn(3, 3).as_subclass(_Opaque)
    assert torch_side.is_quant_tensor_subclass(t)
    with pytest.raises(
        NotImplementedError,
        match=r"_Opaque: it is no quantized tensor qbridge knows \(it has no dequantize\(\) method of its own\): "
        r"if its memory holds its values, hand over W\.as_subclass\(torch\.Tensor\)$",
    ):
        torch_side.dequantize_weight(t)
    b = torch.randn(3, 3).as_subclass(_Broken)
    with pytest.raises(NotImplementedError, match=r"_Broken: RuntimeError: kernel package missing"):
        torch_side.dequantize_weight(b)


def test_an_int8params_whose_row_scales_moved_to_its_module_is_refused():
    """After a forward pass bitsandbytes moves an Int8Params' SCB into its module's state and sets W.SCB to
    None; the int8 codes came back as the weight (dequantize_weight, and through it to_jax). They are refused,
    saying where the scales are; decoded with them, the weight is bitsandbytes'."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    lin = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
    lin.weight = bnb.nn.Int8Params(torch.randn(32, 64).half(), requires_grad=False, has_fp16_weights=False)
    lin = lin.to("cpu")
    lin(torch.randn(2, 64).half())
    assert lin.weight.SCB is None and lin.weight.dtype == torch.int8 and lin.state.SCB is not None
    with pytest.raises(TypeError, match=r"int8 codes without its row scales .*module\.state\.SCB"):
        torch_side.dequantize_weight(lin.weight)
    with pytest.raises(TypeError, match=r"W is a quantized bitsandbytes\.nn\.modules\.Int8Params"):
        torch_side.dequantize(lin.weight)
    want = bnb.functional.int8_vectorwise_dequant(lin.weight.data, lin.state.SCB)
    assert torch.equal(torch_side.dequantize_int8(lin.weight.data, lin.state.SCB), want)


def test_requires_grad_weight_dequantizes_without_graph():
    ao = pytest.importorskip("torchao.quantization")
    nf4 = ao.NF4Tensor.from_tensor(torch.randn(128, 128, dtype=torch.bfloat16), 64, 256)
    p = torch.nn.Parameter(nf4, requires_grad=True)
    got = torch_side.dequantize_weight(p)
    assert not got.requires_grad
