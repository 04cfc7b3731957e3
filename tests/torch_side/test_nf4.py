"""torch_side.dequantize / dequantize_nf4 against bitsandbytes itself, on CPU and (gpu marker) CUDA."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from helpers import DTYPES, as_bnb_returns, assert_bitwise_equal, bnb_quantize, bnb_reference, legacy_list
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_side
from torch_side._backend import bnb_cpu_avx512_kernel, bnb_cpu_kernel_restarts_blocks, choose_4bit_backend

F = pytest.importorskip("bitsandbytes.functional")

ODD_SHAPES = [
    (128, 96),
    (7, 48),
    (3, 32),
    (5, 7),
    (1, 1),
    (33, 65),
    (100,),
    (97,),
    (3,),
    (2, 3, 40),
    (576, 7168),
]


def _oracle(packed, qs, device):
    """bitsandbytes' CUDA kernel on a GPU; its pure-torch reference (the same semantics) on the CPU."""
    if device == "cuda":
        return F.dequantize_4bit(packed, qs)
    return bnb_reference(packed, qs)


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
def test_matches_bitsandbytes(device, shape, quant_type, nested):
    for i, dtype in enumerate(DTYPES):
        _, packed, qs = bnb_quantize(
            shape, quant_type=quant_type, nested=nested, dtype=dtype, seed=i, device=device
        )
        got = torch_side.dequantize(packed, qs)
        assert got.device.type == device
        assert_bitwise_equal(
            got,
            as_bnb_returns(_oracle(packed, qs, device), packed)
            if device == "cpu"
            else _oracle(packed, qs, device),
        )
        assert_bitwise_equal(got, as_bnb_returns(bnb_reference(packed, qs), packed))


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_every_blocksize(device, blocksize):
    for nested in (True, False):
        _, packed, qs = bnb_quantize(
            (37, 300), blocksize=blocksize, nested=nested, seed=blocksize, device=device
        )
        assert_bitwise_equal(torch_side.dequantize(packed, qs), _oracle(packed, qs, device))


@pytest.mark.parametrize("backend", ["torch", "bnb"])
def test_forced_backends_agree(device, backend):
    # shapes whose rows are whole blocks, where bitsandbytes' CPU kernel is exact too
    for i, shape in enumerate([(64, 128), (3, 4096), (17, 64)]):
        _, packed, qs = bnb_quantize(shape, nested=bool(i % 2), seed=i, device=device)
        got = torch_side.dequantize(packed, qs, backend=backend)
        if device == "cpu" and backend == "bnb":  # its CPU kernel: the same numbers, bits vary by CPU
            torch.testing.assert_close(got, bnb_reference(packed, qs), rtol=2e-3, atol=0)
        else:
            assert_bitwise_equal(got, bnb_reference(packed, qs))


def test_cpu_routes_around_the_broken_bitsandbytes_kernel():
    # bitsandbytes 0.50's native CPU kernel restarts blocks at every row in its AVX-512 path: wrong for these
    # shapes, and refused; its other path (CPUs without AVX-512) counts blocks right
    for shape in [(128, 96), (7, 48), (3, 32)]:
        _, packed, qs = bnb_quantize(shape, nested=False)
        assert bnb_cpu_kernel_restarts_blocks(shape, qs.blocksize)
        assert_bitwise_equal(torch_side.dequantize(packed, qs), bnb_reference(packed, qs))
        if bnb_cpu_avx512_kernel():
            with pytest.raises(ValueError, match="restarts blocks at every row"):
                torch_side.dequantize(packed, qs, backend="bnb")
        else:
            got = torch_side.dequantize(packed, qs, backend="bnb")
            torch.testing.assert_close(got, bnb_reference(packed, qs), rtol=0, atol=0)


def test_the_row_restarting_kernel_path_is_detected_where_bitsandbytes_takes_it():
    """bitsandbytes 0.50's native CPU kernel restarts blocks at every row only in its AVX-512 path: the
    detection agrees with what its registered op returns on this machine."""
    from importlib.metadata import version

    if version("bitsandbytes").split(".")[:2] != ["0", "50"]:
        pytest.skip("the detection reads bitsandbytes 0.50's rule; other versions are refused conservatively")
    _, packed, qs = bnb_quantize((128, 96), nested=False, seed=3)
    native = torch.ops.bitsandbytes.dequantize_4bit(packed, qs.absmax, 64, "nf4", [128, 96], qs.dtype)
    wrong = not torch.equal(native, bnb_reference(packed, qs))
    assert wrong == bnb_cpu_avx512_kernel()


def test_fp4_negative_zero_follows_the_cuda_kernel():
    """bitsandbytes' CUDA kernel decodes FP4 0b1000 as -0.0; its table (and its CPU kernel on some CPUs) +0.0."""
    _, packed, qs = bnb_quantize((64, 128), quant_type="fp4", nested=False, scale=1e-3)
    got = torch_side.dequantize(packed, qs)
    flat = packed.reshape(-1)
    nibbles = torch.stack((flat >> 4, flat & 15), -1).reshape(-1)
    assert (nibbles == 8).any()
    neg_zero = got.reshape(-1)[nibbles == 8]
    assert torch.all(neg_zero == 0) and torch.all(torch.signbit(neg_zero))
    native = torch.ops.bitsandbytes.dequantize_4bit(
        packed, qs.absmax, qs.blocksize, "fp4", list(qs.shape), qs.dtype
    )
    assert torch.equal(native, got)  # as numbers; the sign of its zero depends on the CPU's code path


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(2, 300).filter(lambda c: c % 2 == 0),
    blocksize=st.sampled_from([32, 64, 128]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_bnb_cpu_kernel_restart_predicate(rows, cols, blocksize, dtype, seed):
    """Where the predicate clears bitsandbytes' CPU kernel, it agrees with the CUDA semantics as numbers
    (its bits may differ by CPU: 'auto' never uses it)."""
    shape = (rows, cols)
    _, packed, qs = bnb_quantize(shape, blocksize=blocksize, nested=False, dtype=dtype, seed=seed)
    native = torch.ops.bitsandbytes.dequantize_4bit(packed, qs.absmax, blocksize, "nf4", list(shape), dtype)
    want = bnb_reference(packed, qs)
    if not bnb_cpu_kernel_restarts_blocks(shape, blocksize):  # (where it may, it is refused: see above)
        torch.testing.assert_close(native, want, rtol=2e-3, atol=0)


def test_auto_never_picks_the_cpu_kernel_of_bitsandbytes():
    cpu = torch.device("cpu")
    for shape in [(64, 128), (128, 96), (100,)]:
        assert (
            choose_4bit_backend(cpu, "auto", shape=shape, blocksize=64, quant_type="nf4", standard_code=True)
            == "torch"
        )


def test_the_cpu_choice_is_logged_as_the_kernel_or_torch_not_the_torch_path_alone(caplog, monkeypatch):
    """The backend "torch" on the CPU names both routes (the C kernel answers once loaded): the debug line
    says so, and says torch's operations alone where QBRIDGE_CPU_KERNEL turns the kernel off."""
    for switch, says in (("on", "backend torch: qbridge's C kernel once it is loaded"),
                         ("off", "backend torch: torch's operations (QBRIDGE_CPU_KERNEL turns")):  # fmt: skip
        monkeypatch.setenv("QBRIDGE_CPU_KERNEL", switch)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="torch_side"):
            choose_4bit_backend(torch.device("cpu"), "auto", shape=(64,), blocksize=64, quant_type="nf4",
                                standard_code=True)  # fmt: skip
        assert says in caplog.text
        assert "exact torch path" not in caplog.text


@settings(max_examples=60, deadline=None)
@given(
    shape=st.one_of(
        st.tuples(st.integers(1, 300)),
        st.tuples(st.integers(1, 70), st.integers(1, 300)),
        st.tuples(st.integers(1, 5), st.integers(1, 9), st.integers(1, 40)),
    ),
    blocksize=st.sampled_from([32, 64, 128, 256, 4096]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    nested=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(shape, blocksize, quant_type, nested, dtype, seed):
    _, packed, qs = bnb_quantize(
        shape, blocksize=blocksize, quant_type=quant_type, nested=nested, dtype=dtype, seed=seed
    )
    assert_bitwise_equal(torch_side.dequantize(packed, qs), as_bnb_returns(bnb_reference(packed, qs), packed))


def test_legacy_list_state(device):
    for nested in (True, False):
        for quant_type in ("nf4", "fp4"):
            _, packed, qs = bnb_quantize((45, 70), nested=nested, quant_type=quant_type, device=device)
            want = _oracle(packed, qs, device)
            assert_bitwise_equal(torch_side.dequantize(packed, legacy_list(qs)), want)
            assert_bitwise_equal(
                torch_side.dequantize(packed, legacy_list(qs)[:6]), want
            )  # 0.39-0.40: no code


def test_none_quant_state_returns_w_itself():
    w = torch.randn(3, 4)
    assert torch_side.dequantize(w) is w
    assert torch_side.dequantize(w, None) is w


def test_a_params4bit_without_a_quant_state_argument_uses_its_own():
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(64, 128).to(torch.bfloat16)
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    p.data, p.quant_state = bnb.functional.quantize_4bit(w, quant_type="nf4")  # quantized, as .cuda() does
    got = torch_side.dequantize(p)
    assert got.shape == (64, 128) and got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), torch_side.dequantize(p.data, p.quant_state).view(torch.int16))


def test_transposed_packed_weight_comes_back_transposed(device):
    _, packed, qs = bnb_quantize((48, 80), device=device)
    got = torch_side.dequantize(packed.t(), qs)
    assert got.shape == (80, 48)
    assert_bitwise_equal(got, bnb_reference(packed, qs).t())
    if device == "cuda":  # bitsandbytes' own convention, on its own kernel
        assert_bitwise_equal(got, F.dequantize_4bit(packed.t(), qs))


def test_out_is_written_and_returned(device):
    _, packed, qs = bnb_quantize((30, 50), device=device)
    out = torch.full(qs.shape, float("nan"), dtype=qs.dtype, device=device)
    got = torch_side.dequantize(packed, qs, out=out)
    assert got is out
    assert_bitwise_equal(out, bnb_reference(packed, qs))
    out2 = torch.full(qs.shape, float("nan"), dtype=qs.dtype, device=device)
    got_t = torch_side.dequantize(packed.t(), qs, out=out2)
    assert got_t.data_ptr() == out2.data_ptr() and got_t.shape == (50, 30)
    assert_bitwise_equal(out2, bnb_reference(packed, qs))


def test_out_non_contiguous_is_written(device):
    _, packed, qs = bnb_quantize((30, 50), device=device)
    big = torch.zeros(30, 100, dtype=qs.dtype, device=device)
    out = big[:, ::2]
    torch_side.dequantize(packed, qs, out=out)
    assert_bitwise_equal(out, bnb_reference(packed, qs))


@pytest.mark.parametrize(
    "make_out, message",
    [
        (
            lambda qs: torch.empty(qs.shape[0], qs.shape[1] + 1, dtype=qs.dtype),
            r"shape \(30, 50\).*got shape \(30, 51\)",
        ),
        (lambda qs: torch.empty(qs.shape, dtype=torch.float16), r"dtype torch.bfloat16.*dtype torch.float16"),
        (lambda qs: torch.empty(qs.shape[1], qs.shape[0], dtype=qs.dtype), r"got shape \(50, 30\)"),
    ],
)
def test_out_mismatch_is_an_assertion_error(make_out, message):
    _, packed, qs = bnb_quantize((30, 50))
    out = make_out(qs)
    before = out.clone()
    with pytest.raises(AssertionError, match=message):
        torch_side.dequantize(packed, qs, out=out)
    assert torch.equal(out.view(torch.uint8), before.view(torch.uint8))  # nothing written


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_a_sparse_out_is_refused_by_name(layout):
    _, packed, qs = bnb_quantize((30, 50))
    dense = torch.zeros(qs.shape, dtype=qs.dtype)
    out = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    for _ in range(2):  # the first call, and one that could find a plan made by a dense out= call
        with pytest.raises(
            TypeError, match=r"out must be a dense \(strided\) tensor, got layout torch.sparse"
        ):
            torch_side.dequantize(packed, qs, out=out)
        torch_side.dequantize(packed, qs, out=dense)
    assert out._nnz() == 0


def test_quant_storage_dtypes():
    for storage in (torch.bfloat16, torch.float16, torch.float32, torch.int8):
        w = torch.randn(64, 96, dtype=torch.bfloat16)
        packed, qs = F.quantize_4bit(w, quant_type="nf4", quant_storage=storage)
        assert packed.dtype == storage
        assert_bitwise_equal(torch_side.dequantize(packed, qs), bnb_reference(packed, qs))


def test_params4bit_as_w(device):
    bnb = pytest.importorskip("bitsandbytes")
    p = bnb.nn.Params4bit(torch.randn(40, 64, dtype=torch.float16), requires_grad=False, quant_type="fp4").to(
        device
    )
    assert p.bnb_quantized
    assert_bitwise_equal(torch_side.dequantize(p, p.quant_state), _oracle(p.data, p.quant_state, device))


def test_empty_weight():
    _, _, qs = bnb_quantize((4, 64))
    got = torch_side.dequantize_nf4(
        torch.empty(0, 1, dtype=torch.uint8), torch.empty(0), shape=(0, 64), dtype=torch.float16
    )
    assert got.shape == (0, 64) and got.dtype == torch.float16
    with pytest.raises(ValueError, match="needs 128 bytes"):
        torch_side.dequantize(torch.empty(0, 1, dtype=torch.uint8), qs)


def test_pieces_api_matches_the_quant_state_api(device):
    _, packed, qs = bnb_quantize((33, 130), nested=True, quant_type="fp4", device=device)
    d = qs.as_dict(packed=False)
    got = torch_side.dequantize_nf4(
        packed, d["absmax"], shape=tuple(qs.shape), blocksize=qs.blocksize, code=d["quant_map"],
        nested_absmax=d["nested_absmax"], nested_code=d["nested_quant_map"], nested_blocksize=d["nested_blocksize"],
        offset=d["nested_offset"], quant_type=qs.quant_type, dtype=qs.dtype,
    )  # fmt: skip
    assert_bitwise_equal(got, torch_side.dequantize(packed, qs))
    got_t = torch_side.dequantize_nf4(
        packed, d["absmax"], shape=tuple(qs.shape), blocksize=qs.blocksize, nested_absmax=d["nested_absmax"],
        nested_code=d["nested_quant_map"], offset=d["nested_offset"], quant_type="fp4", dtype=qs.dtype, transpose=True,
    )  # fmt: skip
    assert_bitwise_equal(got_t, got.t())


def test_custom_code_table_is_used():
    """A non-standard table is honoured (through the torch backend), never silently replaced."""
    _, packed, qs = bnb_quantize((16, 64), nested=False)
    code = torch.linspace(-1, 1, 16)
    got = torch_side.dequantize_nf4(packed, qs.absmax, shape=(16, 64), code=code, dtype=torch.float32)
    flat = packed.reshape(-1)
    q = torch.stack((flat >> 4, flat & 15), -1).reshape(-1).long()
    want = (code[q] * qs.absmax.repeat_interleave(64)).reshape(16, 64)
    assert_bitwise_equal(got, want)
    with pytest.raises(ValueError, match="custom 4-bit code"):
        torch_side.dequantize_nf4(packed, qs.absmax, shape=(16, 64), code=code, backend="bnb")


def test_nested_decode_has_two_roundings():
    """code2[a] * absmax2 rounded to float32, then + offset rounded again: no fused multiply-add."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=gen)
    absmax2 = torch.rand(16, generator=gen) * 3
    code2 = torch.sort(torch.randn(256, generator=gen)).values
    offset = torch.tensor(0.123456789, dtype=torch.float32)
    got = torch_side.decode_nested_absmax_reference(a, absmax2, code2, 256, offset)
    import numpy as np

    prod = code2.numpy()[a.numpy()] * np.repeat(absmax2.numpy(), 256)  # float32 * float32 -> float32
    want = (prod.astype(np.float32) + np.float32(offset.item())).astype(np.float32)
    assert np.array_equal(got.numpy(), want)
    fused = (
        code2.double().numpy()[a.numpy()] * np.repeat(absmax2.double().numpy(), 256) + offset.item()
    ).astype(np.float32)
    assert not np.array_equal(fused, want)  # the rounding order is observable on this data


def _float32_classes() -> torch.Tensor:
    """Every class of float32 value, both signs: zeros, subnormals, FLT_MIN and its neighbours, normal,
    largest, infinite, NaN (quiet and signalling payloads), and random bit patterns."""
    bits = [
        0,
        1,
        2,
        0x0007_FFFF,
        0x007F_FFFE,
        0x007F_FFFF,
        0x0080_0000,
        0x0080_0001,
        0x3F80_0000,
        0x7F7F_FFFF,
    ]
    bits += [0x7F80_0000, 0x7FC0_0000, 0x7F80_0001, 0x7FFF_FFFF]
    base = torch.tensor(bits, dtype=torch.int64)
    gen = torch.Generator().manual_seed(11)
    both = torch.cat((base, base | 0x8000_0000, torch.randint(0, 1 << 32, (4096,), generator=gen)))
    return (both - ((both >= 1 << 31).long() << 32)).to(torch.int32).view(torch.float32)


def test_flush_denormals_replaces_exactly_the_denormals_by_zeros_of_their_sign(device):
    """Below FLT_MIN in magnitude -> zero of the same sign; every other value keeps its bits, and a NaN stays
    a NaN (its payload as float32 arithmetic leaves it: a GPU's multiply gives its canonical NaN, so do the
    products this flushes)."""
    x = _float32_classes().to(device)
    subnormal = (x.abs() < torch.finfo(torch.float32).tiny) & (x != 0)
    want = torch.where(subnormal, torch.zeros_like(x).copysign(x), x)
    got = torch_side._nf4.flush_denormals_(x.clone())
    nan = x.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))
    assert int(subnormal.sum()) >= 10 and int(nan.sum()) >= 8


@pytest.mark.parametrize(
    "offset",
    [0.1, 1 / 3 + 1e-12, -2.5e-39, 1e39, torch.tensor(1 / 3, dtype=torch.float64), torch.tensor([0.7])],
    ids=["float", "between-float32s", "denormal", "overflows", "float64-tensor", "one-element"],
)
def test_the_nested_offset_is_rounded_to_float32_then_added(device, offset):
    """However the offset comes (a number, a float64 or one-element tensor), the decode adds its float32
    rounding, as bitsandbytes does with its float32 offset."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=gen)
    absmax2 = torch.rand(4, generator=gen) * 3
    code2 = torch.sort(torch.randn(256, generator=gen)).values
    as_float32 = torch.as_tensor(offset, dtype=torch.float32).reshape(())
    want = torch_side.decode_nested_absmax_reference(a, absmax2, code2, 256, as_float32)
    got = torch_side.decode_nested_absmax_reference(
        a.to(device), absmax2.to(device), code2.to(device), 256, offset
    )
    assert_bitwise_equal(got.cpu(), want)


def test_denormal_products_flush_to_zero_as_on_cuda(device):
    """bitsandbytes' CUDA kernels flush float32 denormals; so does every backend here."""
    for dtype in (torch.float32, torch.bfloat16):
        _, packed, qs = bnb_quantize((64, 256), nested=False, dtype=dtype, device=device, scale=1e-38)
        got = torch_side.dequantize(packed, qs)
        assert_bitwise_equal(got, bnb_reference(packed, qs))
        assert not bool(((got.float().abs() < torch.finfo(torch.float32).tiny) & (got != 0)).any())
        if device == "cuda":
            assert_bitwise_equal(got, F.dequantize_4bit(packed, qs))


def test_check_finite():
    _, packed, qs = bnb_quantize((8, 64), nested=False)
    absmax = qs.absmax.clone()
    absmax[3] = float("nan")
    got = torch_side.dequantize_nf4(packed, absmax, shape=(8, 64), dtype=torch.float32)
    assert torch.isnan(got.reshape(-1)[3 * 64 : 4 * 64]).all()  # propagates by default, like bitsandbytes
    assert not torch.isnan(got.reshape(-1)[: 3 * 64]).any()
    with pytest.raises(ValueError, match=r"absmax holds 1 non-finite value.*index \(3,\)"):
        torch_side.dequantize_nf4(packed, absmax, shape=(8, 64), check_finite=True)


def test_check_finite_checks_the_tables_too():
    """A NaN in a nested absmax's table, or in a custom 4-bit table, is a damaged piece as a NaN scale is."""
    packed, qs, pieces = _nested_pieces()
    nested_code = pieces["nested_code"].clone()
    nested_code[int(qs.absmax[0])] = float("nan")  # the entry the first absmax code picks
    bad = {**pieces, "nested_code": nested_code}
    assert torch.isnan(torch_side.dequantize_nf4(packed, qs.absmax, offset=qs.offset, **bad)).any()
    with pytest.raises(ValueError, match=r"nested_code holds 1 non-finite value"):
        torch_side.dequantize_nf4(packed, qs.absmax, offset=qs.offset, check_finite=True, **bad)
    _, packed, qs = bnb_quantize((8, 64), nested=False)
    code = torch_side.standard_code("nf4").clone()
    code[5] = float("inf")
    with pytest.raises(ValueError, match=r"code holds 1 non-finite value.*index \(5,\)"):
        torch_side.dequantize_nf4(packed, qs.absmax, shape=(8, 64), code=code, check_finite=True)


def _nested_pieces(seed=0):
    _, packed, qs = bnb_quantize((16, 64), nested=True, seed=seed)
    return packed, qs, dict(
        shape=(16, 64), blocksize=qs.blocksize, nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
        nested_blocksize=qs.state2.blocksize, dtype=torch.float32,
    )  # fmt: skip


@pytest.mark.parametrize(
    "offset",
    [np.float32("nan"), np.float16("inf"), 1e39, torch.tensor(1e39, dtype=torch.float64), 2**200, -math.inf],
    ids=[
        "numpy-nan",
        "numpy-float16-inf",
        "overflows-float32",
        "float64-tensor-overflows",
        "big-int",
        "-inf",
    ],
)
def test_check_finite_sees_the_offset_as_the_float32_the_decode_adds(offset):
    packed, qs, pieces = _nested_pieces()
    with pytest.raises(ValueError, match="offset"):
        torch_side.dequantize_nf4(packed, qs.absmax, offset=offset, check_finite=True, **pieces)
    got = torch_side.dequantize_nf4(packed, qs.absmax, offset=offset, **pieces)  # propagates by default
    assert not bool(torch.isfinite(got).all())


def test_a_finite_offset_passes_check_finite():
    packed, qs, pieces = _nested_pieces()
    for offset in (np.float64(0.25), 3.4e38, torch.tensor([0.5], dtype=torch.float64), [0.5]):
        torch_side.dequantize_nf4(packed, qs.absmax, offset=offset, check_finite=True, **pieces)


@pytest.mark.parametrize(
    "offset, error, message",
    [
        ("0.5", TypeError, "offset must be one real number"),
        (1 + 2j, TypeError, "offset must be one real number"),
        (torch.tensor(0.5 + 1j), TypeError, "offset must be a real number"),
        ([0.5, 0.25], ValueError, "offset must be one number, got 2 values"),
        (np.array([0.5, 0.25]), ValueError, "offset must be one number, got 2 values"),
        (np.array([0.5j]), TypeError, "offset must be one real number"),
        (np.array([True]), TypeError, "offset must be one real number"),
        (10**400, ValueError, "offset 1000.*is beyond the range of a float"),
    ],
    ids=["str", "complex", "complex-tensor", "list", "array", "complex-array", "bool-array", "10**400"],
)
def test_an_offset_that_is_not_one_real_number_is_refused_naming_it(offset, error, message):
    packed, qs, pieces = _nested_pieces()
    with pytest.raises(error, match=message):
        torch_side.dequantize_nf4(packed, qs.absmax, offset=offset, **pieces)


def test_an_offset_of_another_length_is_refused_after_a_call_that_planned_the_kind():
    """A repeated call reuses the first call's checks (its plan); an offset of two values after a one-value
    list of the same type is still refused by name, not by a torch error from inside the decode."""
    packed, qs, pieces = _nested_pieces()
    torch_side.dequantize_nf4(packed, qs.absmax, offset=[0.5], **pieces)
    torch_side.dequantize_nf4(packed, qs.absmax, offset=[0.5], **pieces)
    with pytest.raises(ValueError, match="offset must be one number, got 2 values"):
        torch_side.dequantize_nf4(packed, qs.absmax, offset=[0.5, 0.25], **pieces)


def test_an_offset_given_as_a_one_element_list_or_array_is_that_number():
    packed, qs, pieces = _nested_pieces(seed=3)
    want = torch_side.dequantize_nf4(packed, qs.absmax, offset=float(qs.offset), **pieces)
    for offset in ([float(qs.offset)], np.array(float(qs.offset)), np.float32(qs.offset)):
        assert_bitwise_equal(torch_side.dequantize_nf4(packed, qs.absmax, offset=offset, **pieces), want)


def test_result_does_not_alias_input():
    _, packed, qs = bnb_quantize((8, 64))
    got = torch_side.dequantize(packed, qs)
    assert got.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr()
    assert math.prod(got.shape) == 8 * 64


@pytest.mark.gpu
def test_cuda_result_is_ordered_on_the_current_stream():
    """Work goes on the caller's current stream: a write queued there before the call is seen."""
    _, packed_old, qs = bnb_quantize((1024, 1024), nested=True, device="cuda", seed=1)
    _, packed_new, _ = bnb_quantize((1024, 1024), nested=True, device="cuda", seed=2)
    target = packed_old.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy
        target.copy_(packed_new)  # lands only after the sleep
        got = torch_side.dequantize(target, qs)
    side.synchronize()
    # absmax belongs to packed_old's quantization, so compare against the same pieces on the CPU
    assert_bitwise_equal(got, bnb_reference(packed_new, qs))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "bnb"])
def test_a_nested_weight_decodes_without_host_syncs(backend):
    """With the offset a number (as a checkpoint's quant state gives it, and as the loader passes it, with
    the standard table) or a CPU tensor, the exact torch and bitsandbytes paths never make the host wait
    for the GPU (a sync per weight serializes a load)."""
    _, packed, qs = bnb_quantize((256, 320), nested=True, device="cuda", seed=4)
    pieces = dict(
        shape=(256, 320), blocksize=qs.blocksize, nested_absmax=qs.state2.absmax,
        nested_code=qs.state2.code, nested_blocksize=qs.state2.blocksize, dtype=torch.bfloat16,
    )  # fmt: skip
    want = bnb_reference(packed, qs)
    # the first call of a process puts the standard tables on the device (once): the calls after it count
    torch_side.dequantize_nf4(packed, qs.absmax, offset=float(qs.offset), backend=backend, **pieces)
    torch.cuda.synchronize()
    for offset in (float(qs.offset), qs.offset.cpu()):
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = torch_side.dequantize_nf4(packed, qs.absmax, offset=offset, backend=backend, **pieces)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert_bitwise_equal(got, want)


@pytest.mark.gpu
def test_cuda_runs_on_the_tensors_device_not_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _, packed, qs = bnb_quantize((64, 64), device="cuda:1")
    with torch.cuda.device(0):
        got = torch_side.dequantize(packed, qs)
    assert got.device == torch.device("cuda:1")
    assert_bitwise_equal(got, bnb_reference(packed, qs))


@pytest.mark.parametrize("step", [64, 96, 4096, 1 << 18])
@pytest.mark.parametrize("shape", [(1000, 1001), (33, 65), (7,), (2, 3, 257)])
def test_cpu_decode_in_steps_matches_bitsandbytes(shape, step, monkeypatch):
    """The CPU decode works in steps of whole blocks (torch_side._nf4.CPU_CHUNK elements): any step, with
    the last block short and odd element counts, gives bitsandbytes' values bit for bit, and the oracle's."""
    import torch_side._nf4 as nf4

    monkeypatch.setattr(nf4, "CPU_CHUNK", step)
    for i, (quant_type, nested, blocksize) in enumerate(
        [("nf4", True, 64), ("fp4", False, 32), ("nf4", False, 256), ("fp4", True, 128)]
    ):
        dtype = DTYPES[i % len(DTYPES)]
        _, packed, qs = bnb_quantize(
            shape, blocksize=blocksize, quant_type=quant_type, nested=nested, dtype=dtype, seed=i
        )
        got = torch_side.dequantize(packed, qs, backend="torch")
        assert_bitwise_equal(got, as_bnb_returns(bnb_reference(packed, qs), packed))
        pieces = torch_side.parse_quant_state(qs)
        absmax = (
            torch_side.decode_nested_absmax_reference(
                pieces.absmax,
                pieces.nested_absmax,
                pieces.nested_code,
                pieces.nested_blocksize,
                pieces.offset,
            )
            if nested
            else pieces.absmax
        )
        table = torch_side.standard_code(quant_type)
        flat = packed.reshape(-1).view(torch.uint8)[: (math.prod(shape) + 1) // 2]
        want = torch_side.dequantize_4bit_reference(flat, absmax, table, blocksize, math.prod(shape), dtype)
        assert_bitwise_equal(got.reshape(-1), want)


def test_autograd_and_functorch_go_through_the_cpu_decode():
    """The CPU torch path wrote through out=, which autograd and functorch refuse: absmax.requires_grad,
    torch.func.grad, vmap and forward-mode AD all raised torch's internal errors, and a custom table that
    required grad (with the standard values) was replaced by the standard one, dropping its graph."""
    import torch.autograd.forward_ad as fwad

    _, packed, qs = bnb_quantize((48, 70), nested=False)  # a short last block (3360 = 52 * 64 + 32)
    kw = dict(shape=(48, 70), dtype=torch.float32)
    want = torch_side.dequantize_nf4(packed, qs.absmax, **kw)
    codes = torch_side.standard_code("nf4")[
        torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], -1).reshape(-1)[: 48 * 70].long()
    ]  # each element's table value: d(element) / d(its block's absmax)
    block = torch.arange(48 * 70) // 64
    expected_grad = torch.zeros_like(qs.absmax).index_add_(0, block, codes)

    absmax = qs.absmax.clone().requires_grad_()
    got = torch_side.dequantize_nf4(packed, absmax, **kw)
    assert torch.equal(got.detach().view(torch.int32), want.view(torch.int32))
    got.sum().backward()
    torch.testing.assert_close(absmax.grad, expected_grad)

    grad = torch.func.grad(lambda a: torch_side.dequantize_nf4(packed, a, **kw).sum())(qs.absmax)
    torch.testing.assert_close(grad, expected_grad)

    stacked = torch.stack([qs.absmax, 2 * qs.absmax])
    batched = torch.func.vmap(lambda a: torch_side.dequantize_nf4(packed, a, **kw))(stacked)
    for i in range(2):
        one = torch_side.dequantize_nf4(packed, stacked[i].contiguous(), **kw)
        assert torch.equal(batched[i].view(torch.int32), one.view(torch.int32))

    with fwad.dual_level():
        out = torch_side.dequantize_nf4(packed, fwad.make_dual(qs.absmax, torch.ones_like(qs.absmax)), **kw)
        tangent = fwad.unpack_dual(out).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent.reshape(-1), codes)

    table = torch_side.standard_code("nf4") * torch.ones(16, requires_grad=True)
    got = torch_side.dequantize_nf4(packed, qs.absmax, code=table, **kw)
    assert got.requires_grad and torch.equal(got.detach().view(torch.int32), want.view(torch.int32))
