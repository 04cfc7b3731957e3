"""Every Triton kernel variant compiles for Hopper (sm_90) without a GPU: compile errors show in CPU CI,
not first on the GPU machine. (A subprocess: under TRITON_INTERPRET=1 kernels are not compilable.)"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import itertools, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torch_side.kernels._fp8 import fp8_kernel
from torch_side.kernels._nf4 import nf4_rows_kernel, nf4_transposed_any_kernel, nf4_transposed_kernel

SM90 = GPUTarget("cuda", 90, 32)

def compile(fn, types, constexprs):
    sig = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=SM90)

count = 0
# nested absmax with its offset as a tensor or as a number (a float32 argument); plain absmax
for out, (nested, offset_tensor) in itertools.product(["*bf16", "*fp16", "*fp32"], [(True, True), (True, False), (False, True)]):
    types = dict(packed_ptr="*u8", absmax_ptr="*u8" if nested else "*fp32", pairs_ptr="*fp32", out_ptr=out,
                 nested_absmax_ptr="*fp32", nested_code_ptr="*fp32", offset_ptr="*fp32" if offset_tensor else "fp32",
                 n_bytes="i64", n_elements="i64", rows="i32", cols="i32")
    common = dict(NESTED=nested, NESTED_BLOCKSIZE=256, OFFSET_TENSOR=offset_tensor, SOFT=False)
    compile(nf4_rows_kernel, types, dict(BYTES_PER_BLOCK=32, ROWS=128, COLS=32, **common))
    for row_scale in (True, False):
        compile(nf4_transposed_kernel, types, dict(BLOCKSIZE=64, ROW_SCALE=row_scale, TILE_R=128, TILE_B=32, **common))
    compile(nf4_transposed_any_kernel, types, dict(BLOCKSIZE=64, TILE_R=32, TILE_C=64, **common))
    count += 4
for out, e5m2, mode, transpose in itertools.product(["*bf16", "*fp16", "*fp32"], [True, False], [0, 1, 2], [True, False]):
    types = dict(w_ptr="*u8", scale_ptr="*fp32", out_ptr=out, rows="i32", cols="i32", scale_cols="i32", bo="i32", bi="i32")
    compile(fp8_kernel, types, dict(E5M2=e5m2, TRANSPOSE=transpose, SCALE_MODE=mode, TILE_R=64, TILE_C=128, SOFT=False))
    count += 1
print("COMPILED", count)
"""


def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = pathlib.Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0 and "COMPILED 72" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-5000:]
    )
