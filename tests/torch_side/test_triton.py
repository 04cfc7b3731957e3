"""The Triton kernels against their oracles and against bitsandbytes: bit-identical.

On CPU they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when no GPU is
visible) on small and odd shapes; on a GPU (`pytest -m gpu`) compiled, on the benchmark's real shapes too.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DTYPES,
    assert_bitwise_equal,
    bnb_quantize,
    bnb_reference,
    fp8_reference_loops,
    random_fp8,
    random_scales,
)

import torch_side

pytest.importorskip("triton")
F = pytest.importorskip("bitsandbytes.functional")

SMALL = [(64, 128), (7, 48), (33, 65), (5, 7), (1, 1), (100,), (3, 5, 8), (2, 2048)]
BENCH = [(8192, 8192), (14336, 4096), (4096, 14336), (576, 7168), (1000, 1001)]


def _pieces(qs):
    if not qs.nested:
        return dict(shape=tuple(qs.shape), blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=qs.dtype)
    return dict(
        shape=tuple(qs.shape), blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=qs.dtype,
        nested_absmax=qs.state2.absmax, nested_code=qs.state2.code, nested_blocksize=qs.state2.blocksize, offset=qs.offset,
    )  # fmt: skip


def _check_4bit(packed, qs, device):
    want = bnb_reference(packed, qs)
    got = torch_side.dequantize_nf4(packed, qs.absmax, **_pieces(qs), backend="triton")
    assert_bitwise_equal(got, want)
    if device == "cuda":
        assert_bitwise_equal(got, F.dequantize_4bit(packed, qs))  # bitsandbytes' own CUDA kernel
    if qs.nested:  # the nested offset as a number, as the checkpoint loader passes it: a kernel argument
        number = {**_pieces(qs), "offset": float(qs.offset)}
        assert_bitwise_equal(torch_side.dequantize_nf4(packed, qs.absmax, **number, backend="triton"), want)
        # numbers float32 cannot hold exactly or at all round to float32 first, as on the torch path
        for offset in (1e-40, 1e300, -1e300, float("nan")):
            odd = {**_pieces(qs), "offset": offset}
            assert_bitwise_equal(
                torch_side.dequantize_nf4(packed, qs.absmax, **odd, backend="triton"),
                torch_side.dequantize_nf4(packed, qs.absmax, **odd, backend="torch"),
            )
    if len(qs.shape) == 2:
        got_t = torch_side.dequantize_nf4(packed, qs.absmax, **_pieces(qs), transpose=True, backend="triton")
        assert got_t.is_contiguous()  # written transposed, not a view
        assert_bitwise_equal(got_t, want.t())


@pytest.mark.parametrize("shape", SMALL)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
def test_4bit_kernels_small_and_odd(device, shape, quant_type, nested):
    for i, dtype in enumerate(DTYPES):
        _, packed, qs = bnb_quantize(
            shape, quant_type=quant_type, nested=nested, dtype=dtype, seed=i, device=device
        )
        _check_4bit(packed, qs, device)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_4bit_kernels_every_blocksize(device, blocksize):
    _, packed, qs = bnb_quantize(
        (21, 390), blocksize=blocksize, quant_type="nf4", nested=True, device=device, seed=blocksize
    )
    _check_4bit(packed, qs, device)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", BENCH)
def test_4bit_kernels_bench_shapes(shape):
    for quant_type, nested in (("nf4", True), ("fp4", False)):
        _, packed, qs = bnb_quantize(
            shape, quant_type=quant_type, nested=nested, dtype=torch.bfloat16, device="cuda"
        )
        _check_4bit(packed, qs, "cuda")


def test_4bit_denormal_products_flush_as_bitsandbytes_cuda_does(device):
    for nested in (False, True):
        _, packed, qs = bnb_quantize(
            (256, 512), nested=nested, dtype=torch.float32, device=device, scale=1e-38
        )
        got = torch_side.dequantize(packed, qs, backend="triton")
        assert_bitwise_equal(got, bnb_reference(packed, qs))
        if device == "cuda":
            assert_bitwise_equal(got, F.dequantize_4bit(packed, qs))


def test_4bit_out_and_seed_convention(device):
    _, packed, qs = bnb_quantize((48, 80), device=device)
    want = bnb_reference(packed, qs)
    out = torch.full(qs.shape, float("nan"), dtype=qs.dtype, device=device)
    assert torch_side.dequantize(packed, qs, out=out, backend="triton") is out
    assert_bitwise_equal(out, want)
    strided = torch.zeros(48, 160, dtype=qs.dtype, device=device)[:, ::2]
    torch_side.dequantize(packed, qs, out=strided, backend="triton")
    assert_bitwise_equal(strided, want)
    assert_bitwise_equal(torch_side.dequantize(packed.t(), qs, backend="triton"), want.t())
    out_t = torch.empty(80, 48, dtype=qs.dtype, device=device)
    got = torch_side.dequantize_nf4(
        packed, qs.absmax, **_pieces(qs), transpose=True, out=out_t, backend="triton"
    )
    assert got is out_t
    assert_bitwise_equal(out_t, want.t())


def test_fp4_negative_zero(device):
    _, packed, qs = bnb_quantize((64, 128), quant_type="fp4", nested=False, device=device, scale=1e-3)
    got = torch_side.dequantize(packed, qs, backend="triton")
    assert_bitwise_equal(got, bnb_reference(packed, qs))
    assert torch.signbit(got[got == 0]).any()


@pytest.mark.parametrize(
    "shape, scale_shape, block",
    [((576, 7168), (5, 56), (128, 128)), ((130, 129), (2, 2), (128, 128)), ((7, 300), (7, 1), (1, 300)),
     ((5, 9), (1, 1), (5, 9)), ((300, 200), (3, 4), (100, 64)), ((1, 1), (1, 1), (1, 1))],
)  # fmt: skip
def test_fp8_kernel(device, shape, scale_shape, block):
    if device == "cpu" and shape == (576, 7168):  # the interpreter: DeepSeek-V3's rows, fewer columns
        shape, scale_shape = (576, 640), (5, 5)
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        for dtype in DTYPES:
            w = random_fp8(shape, dtype=fp8).to(device)
            s = random_scales(scale_shape).to(device)
            kw = dict(block_size=block) if block == (100, 64) else {}
            want = fp8_reference_loops(w, s, block, dtype)
            assert_bitwise_equal(torch_side.dequantize_fp8(w, s, dtype, backend="triton", **kw), want)
            got_t = torch_side.dequantize_fp8(w, s, dtype, backend="triton", transpose=True, **kw)
            assert got_t.is_contiguous()
            assert_bitwise_equal(got_t, want.t())


def test_fp8_kernel_every_bit_pattern(device):
    """All 256 codes of each float8 type (NaN and the largest values included), times scales."""
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        w = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(fp8).to(device)  # [3, 256]
        s = torch.tensor([[0.5, 3.0], [1e-3, 7.0]], device=device)
        for dtype in DTYPES:
            got = torch_side.dequantize_fp8(w, s, dtype, block_size=(2, 128), backend="triton")
            assert_bitwise_equal(
                got, torch_side.dequantize_fp8(w, s, dtype, block_size=(2, 128), backend="torch")
            )
    w = random_fp8((4, 6)).to(device)
    assert_bitwise_equal(torch_side.dequantize_fp8(w, torch.tensor(0.25, device=device), backend="triton"),
                         torch_side.dequantize_fp8(w, torch.tensor(0.25, device=device), backend="torch"))  # fmt: skip
    w3 = random_fp8((2, 3, 5)).to(device)
    one = torch.tensor([0.125], device=device)
    assert_bitwise_equal(
        torch_side.dequantize_fp8(w3, one, backend="triton"), (w3.float() * 0.125).to(torch.bfloat16)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8192, 8192), (18432, 7168), (7168, 2048), (576, 7168), (1000, 1001)])
def test_fp8_kernel_bench_shapes(shape):
    w = random_fp8(shape).cuda()
    s = random_scales(((shape[0] + 127) // 128, (shape[1] + 127) // 128)).cuda()
    want = torch_side.dequantize_fp8(w, s, backend="torch")
    assert_bitwise_equal(torch_side.dequantize_fp8(w, s, backend="triton"), want)
    assert_bitwise_equal(torch_side.dequantize_fp8(w, s, backend="triton", transpose=True), want.t())


def test_auto_picks_triton_on_cuda_only(device):
    from torch_side._backend import choose_4bit_backend, choose_fp8_backend

    kw = dict(shape=(8, 64), blocksize=64, quant_type="nf4", standard_code=True)
    want = "triton" if device == "cuda" else "torch"
    assert choose_4bit_backend(torch.device(device), "auto", **kw) == want
    assert choose_fp8_backend(torch.device(device), "auto") == want


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _, packed, qs = bnb_quantize((8, 64))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        torch_side.dequantize(packed, qs, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        torch_side.dequantize_fp8(random_fp8((4, 4)), torch.ones(1), backend="triton")


@pytest.mark.gpu
def test_repeated_calls_reuse_their_checked_plan_with_new_data():
    """After the first call of a kind, calls with equal shapes, dtypes, devices and pointer alignment skip
    the checks and Triton's argument binding (torch_side._plans): they must still read their own pieces,
    and a weight whose pointer is not 16-byte aligned, or whose sizes differ, must get a plan of its own."""
    from torch_side._plans import FP8_PLANS, NF4_PLANS

    FP8_PLANS.clear()
    for i, (rows, cols) in enumerate([(256, 512), (256, 512), (1, 512), (255, 509), (256, 512)]):
        for offset in (0, 1, 0):  # a weight 1 byte into its storage is not 16-byte aligned
            raw = random_fp8((rows * cols + 1,), seed=10 * i + offset).cuda()
            w = raw[offset : offset + rows * cols].view(rows, cols)
            s = random_scales((-(-rows // 128), -(-cols // 128)), seed=i + offset).cuda()
            want = fp8_reference_loops(w, s, (128, 128), torch.bfloat16)
            assert_bitwise_equal(torch_side.dequantize_fp8(w, s, backend="triton"), want)
            assert_bitwise_equal(torch_side.dequantize_fp8(w, s, backend="triton", transpose=True), want.t())
    # {aligned, misaligned} x {256x512, 1x512, 255x509} x {row-major, transposed}
    assert len(FP8_PLANS) == 12
    # a transposed view of a weight and of its scales: copied to row-major for the kernel, never planned
    for _ in range(2):
        w = random_fp8((512, 256), seed=3).cuda().t()
        s = random_scales((4, 2), seed=4).cuda().t()
        want = fp8_reference_loops(w, s, (128, 128), torch.bfloat16)
        assert_bitwise_equal(torch_side.dequantize_fp8(w, s, backend="triton"), want)
    assert len(FP8_PLANS) == 12

    NF4_PLANS.clear()
    for seed in range(3):  # new data, same kind: one plan, each call reads its own pieces
        for nested in (True, False):
            _, packed, qs = bnb_quantize((64, 320), nested=nested, seed=seed, device="cuda")
            assert_bitwise_equal(
                torch_side.dequantize(packed, qs, backend="triton"), F.dequantize_4bit(packed, qs)
            )
            pieces = _pieces(qs)
            if nested:  # the nested offset as a number (as the checkpoint loader passes it)
                pieces["offset"] = float(qs.offset)
            got = torch_side.dequantize_nf4(packed, qs.absmax, **pieces, transpose=True, backend="triton")
            assert_bitwise_equal(got, F.dequantize_4bit(packed, qs).t())
            buffer = torch.empty(64 * 320 + 1, dtype=qs.dtype, device="cuda")
            for start in (0, 1):  # out= as given, 16-byte aligned or not
                out = buffer[start : start + 64 * 320].view(64, 320)
                assert torch_side.dequantize(packed, qs, out=out, backend="triton") is out
                assert_bitwise_equal(out, F.dequantize_4bit(packed, qs))
    # {nested, plain} x {offset tensor and row-major, offset number and transposed, out aligned or not}
    assert len(NF4_PLANS) == 8


def test_a_hook_chain_without_calls_is_no_launch_hook():
    """Since Triton 3.5 its launch hooks are ``HookChain`` objects, never None: an empty one is no hook (a
    planned call then launches the compiled kernel itself), one holding a call is, and so is any callable
    assigned in the chain's place (as Triton 3.4 takes a hook), whatever attributes it has."""
    knobs = pytest.importorskip("triton.knobs")
    from torch_side._launch import hooked

    assert not hooked(None)
    assert hooked(print)
    if not hasattr(knobs, "HookChain"):
        pytest.skip("this Triton's launch hooks are callables or None")
    assert not hooked(knobs.runtime.launch_enter_hook) and not hooked(knobs.runtime.launch_exit_hook)
    chain = knobs.HookChain()
    assert not hooked(chain)
    chain.add(print)
    assert hooked(chain)
    chain.remove(print)
    assert not hooked(chain)

    class Counting:  # a hook assigned in the chain's place, whose own "calls" says nothing of being set
        calls = 0

        def __call__(self, metadata) -> None:
            self.calls += 1

    assert hooked(Counting())


@pytest.mark.gpu
def test_planned_calls_launch_directly_unless_a_launch_hook_is_set(monkeypatch):
    """A planned call launches the compiled kernel itself, not through Triton's runner (which builds launch
    metadata and calls the launch hooks on every launch); with a launch hook set (a profiler's), planned calls
    go through the runner, which calls it with each launch's kernel. The bits are the same either way."""
    from triton import knobs
    from triton.compiler.compiler import CompiledKernel

    w = random_fp8((256, 512), seed=5).cuda()
    s = random_scales((2, 4), seed=6).cuda()
    _, packed, qs = bnb_quantize((64, 320), nested=True, seed=7, device="cuda")
    calls = [
        (lambda: torch_side.dequantize_fp8(w, s, backend="triton"), fp8_reference_loops(w, s, (128, 128), torch.bfloat16)),
        (lambda: torch_side.dequantize(packed, qs, backend="triton"), F.dequantize_4bit(packed, qs)),
    ]  # fmt: skip
    for call, _ in calls:  # their plans
        call()
    runner = CompiledKernel.__getitem__
    through_runner: list[object] = []
    monkeypatch.setattr(
        CompiledKernel, "__getitem__", lambda self, grid: through_runner.append(grid) or runner(self, grid)
    )
    for call, want in calls:
        assert_bitwise_equal(call(), want)
    assert through_runner == []

    names: list[str] = []

    def hook(metadata) -> None:
        names.append(metadata.get()["name"])  # Triton's LazyDict, as its profiler reads it

    enter = knobs.runtime.launch_enter_hook
    if hasattr(enter, "add"):  # a HookChain (Triton 3.5 and later)
        enter.add(hook)
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
    try:
        for call, want in calls:
            assert_bitwise_equal(call(), want)
    finally:
        if hasattr(enter, "remove"):
            enter.remove(hook)
    assert len(through_runner) == 2
    assert names[0] != names[1] and "fp8" in names[0] and "nf4" in names[1], names
