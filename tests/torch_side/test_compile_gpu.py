"""No compile wait on the caller's thread (torch_side._compile), on the GPU, in fresh processes.

Each process forbids compiling in itself (Triton's front end raises), so everything it runs with Triton
was compiled by the compile process or read from Triton's cache; every result is compared bit for bit
with the torch backend, whether it came from the kernels or from the path that answers while they
compile."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

SCRIPT = r"""
import sys, time, torch
import torch_side
from torch_side import _compile

def no_compiling(*a, **k):
    raise AssertionError("compiled on the calling process")

if sys.argv[1] == "forbid":
    import triton.compiler.compiler as tc

    tc.ASTSource.make_ir = no_compiling
if sys.argv[3] == "bnb":  # imported: the first 4-bit calls use its kernel while ours load
    import bitsandbytes

g = torch.Generator(device="cuda").manual_seed(0)
rows, cols = 384, 520
n = rows * cols
packed = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8, device="cuda", generator=g)
absmax = torch.randint(0, 256, (-(-n // 64),), dtype=torch.uint8, device="cuda", generator=g)
nested_absmax = torch.rand(-(-absmax.numel() // 256), device="cuda", generator=g)
nested_code = torch.randn(256, device="cuda", generator=g)
nf4 = dict(shape=(rows, cols), nested_absmax=nested_absmax, nested_code=nested_code, offset=0.25)
w = (torch.randn(rows, cols, device="cuda", generator=g) * 64).to(torch.float8_e4m3fn)
s = torch.rand(-(-rows // 128), -(-cols // 128), device="cuda", generator=g)

def calls():
    for transpose in (False, True):
        want = torch_side.dequantize_nf4(packed, absmax, **nf4, transpose=transpose, backend="torch")
        got = torch_side.dequantize_nf4(packed, absmax, **nf4, transpose=transpose)
        assert got.is_contiguous() and torch.equal(got.view(torch.int16), want.contiguous().view(torch.int16))
        out = torch.empty_like(want)
        assert torch_side.dequantize_nf4(packed, absmax, **nf4, transpose=transpose, out=out) is out
        assert torch.equal(out.view(torch.int16), want.view(torch.int16))
        want = torch_side.dequantize_fp8(w, s, transpose=transpose, backend="torch")
        got = torch_side.dequantize_fp8(w, s, transpose=transpose)
        assert got.is_contiguous() and torch.equal(got.view(torch.int16), want.contiguous().view(torch.int16))

calls()
print("READY AFTER THE FIRST CALLS", len(_compile._READY))
# Triton imported, then every variant asked for made ready (FP8's single launches ask for their grouped
# launches too: a planned kind's weights come many at a time)
def waiting():
    return len(_compile._READY) < 4 or _compile._REQUESTED - set(_compile._READY) - {_compile.IMPORT_KEY}

deadline = time.monotonic() + 240
while waiting() and not _compile._FAILED and time.monotonic() < deadline:
    time.sleep(0.1)
    calls()
assert not _compile._FAILED, _compile._FAILED
print("READY", len(_compile._READY))
calls()
from torch_side._plans import FP8_PLANS, NF4_PLANS
# the last calls ran the kernels: a plan for each launch of NF4 and FP8 row-major and transposed, and of
# NF4 into out= (its transposed out= is a strided view: written through a copy, no plan)
print("PLANS", len(NF4_PLANS) + len(FP8_PLANS))
if sys.argv[2] == "triton":  # asked for by name: waits for (or compiles) the kernel on the spot
    torch_side.dequantize_fp8(w.t().contiguous(), s.t().contiguous(), backend="triton")
    print("READY AFTER A TRITON CALL", len(_compile._READY))
"""


def _run(tmp: pathlib.Path, *argv: str, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "QBRIDGE_TRITON_COMPILE")}
    full.update(TRITON_CACHE_DIR=str(tmp / "triton"), **env)
    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *argv], cwd=root, env=full, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def test_first_calls_never_compile_on_the_calling_process(tmp_path):
    # an empty cache: the compile process compiles; the first calls answer from the torch path
    first = _run(tmp_path, "forbid", "auto", "torch")
    # NF4 and FP8, row-major and transposed (out= shares their variants), and FP8's grouped launches
    assert "READY AFTER THE FIRST CALLS 0" in first and "READY 6" in first and "PLANS 5" in first, first
    assert len(list((tmp_path / "triton" / "qbridge-variants").iterdir())) == 6
    # a warm cache: loaded in the background, nothing compiled anywhere (no compile process either)
    second = _run(tmp_path, "forbid", "auto", "bnb")
    assert "READY AFTER THE FIRST CALLS 0" in second and "READY 6" in second and "PLANS 5" in second, second


def test_wait_mode_and_backend_triton_compile_on_the_spot(tmp_path):
    # waiting calls compile what they launch, and ask for nothing beside it
    out = _run(tmp_path / "a", "allow", "auto", "torch", QBRIDGE_TRITON_COMPILE="wait")
    assert "READY AFTER THE FIRST CALLS 4" in out and "PLANS 5" in out, out
    out = _run(tmp_path / "b", "allow", "triton", "torch")
    assert "READY AFTER THE FIRST CALLS 0" in out and "READY AFTER A TRITON CALL 7" in out, out
