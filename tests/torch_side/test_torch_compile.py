"""Dequantization inside ``torch.compile``: a traced call gives the bits of an eager one. The C kernel
and the plans (which read and write memory through pointers) are left out of traced calls, which take the
torch path; traced, the pointers and tables they would use are not the values (before, the FP8 decode on
the CPU gave garbage under every backend of ``torch.compile``)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bitwise_equal, bnb_quantize, fp8_reference_loops, random_fp8, random_scales

import torch_side


@pytest.fixture(autouse=True, scope="module")
def _kernels_built():
    torch_side.wait_for_kernels()  # eager calls below take the C kernel, as a user's calls do once it is built


def _compiled(fn, backend):
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=False)


FP8_CASES = {  # weight shape, scale shape (block 128x128 with partial tiles; per row; per tensor)
    "block": ((300, 500), (3, 4)),
    "row": ((70, 260), (70, 1)),
    "tensor": ((33, 129), ()),
}


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("case", FP8_CASES)
@pytest.mark.parametrize("transpose", [False, True])
def test_fp8_traced_gives_the_eager_bits(backend, case, transpose):
    wshape, sshape = FP8_CASES[case]
    W = random_fp8(wshape, seed=3)
    s = random_scales(sshape, seed=4) if sshape else torch.tensor(0.0123)
    eager = [torch_side.dequantize_fp8(W, s, transpose=transpose) for _ in range(2)][-1]
    got = _compiled(lambda w, sc: torch_side.dequantize_fp8(w, sc, transpose=transpose), backend)(W, s)
    assert_bitwise_equal(got, eager)
    if case == "block":
        want = fp8_reference_loops(W, s, (128, 128), torch.bfloat16)
        assert_bitwise_equal(got, want.t().contiguous() if transpose else want)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_4bit_traced_gives_the_eager_bits(backend, quant_type, nested):
    _, packed, qs = bnb_quantize((96, 200), quant_type=quant_type, nested=nested, seed=5)
    eager = [torch_side.dequantize(packed, qs) for _ in range(2)][-1]  # the second call runs the plan
    got = _compiled(lambda p: torch_side.dequantize(p, qs), backend)(packed)
    assert_bitwise_equal(got, eager)


def test_a_compiled_module_that_decodes_its_weight_gives_the_eager_output():
    """What a user compiles: a layer whose forward decodes its FP8 weight, through the default compiler."""

    class FP8Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(random_fp8((300, 500), seed=7), requires_grad=False)
            self.scale = torch.nn.Parameter(random_scales((3, 4), seed=8), requires_grad=False)

        def forward(self, x):
            w = torch_side.dequantize_fp8(self.weight, self.scale)
            return w, x @ w.t()

    layer, x = FP8Linear(), torch.randn(4, 500).bfloat16()
    w_eager, y_eager = layer(x)
    torch._dynamo.reset()
    w, y = torch.compile(layer)(x)
    assert_bitwise_equal(w, w_eager)
    torch.testing.assert_close(y, y_eager)  # the compiler may order the matmul's sums otherwise


@pytest.mark.gpu
@pytest.mark.parametrize("asked", ["auto", "triton"])
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_cuda_calls_traced_give_the_kernels_bits(backend, asked):
    """On a GPU, traced calls take the torch path too (``backend="triton"`` asked for by name: Triton's
    kernel); their bits are the kernels' (tested elsewhere), here checked against the eager (Triton) call of
    the same weights."""
    torch_side.wait_for_kernels()
    W, s = random_fp8((300, 500), seed=9).cuda(), random_scales((3, 4), seed=10).cuda()
    eager = [torch_side.dequantize_fp8(W, s, transpose=True) for _ in range(2)][-1]
    got = _compiled(lambda w, sc: torch_side.dequantize_fp8(w, sc, transpose=True, backend=asked), backend)(
        W, s
    )
    assert_bitwise_equal(got, eager)
    _, packed, qs = bnb_quantize((96, 200), seed=11, device="cuda")
    eager = [torch_side.dequantize(packed, qs) for _ in range(2)][-1]
    assert_bitwise_equal(
        _compiled(lambda p: torch_side.dequantize(p, qs, backend=asked), backend)(packed), eager
    )
