"""Every Triton kernel variant compiles for Hopper (sm_90) without a GPU: compile errors show in CPU CI,
not first on the GPU machine. (A subprocess: under TRITON_INTERPRET=1 kernels are not compilable.)"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _run(script: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh Python process at the repository's root, Triton's interpreter off (kernels are
    not compilable under it), with ``env`` added."""
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    root = pathlib.Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=full, capture_output=True, text=True, timeout=timeout
    )


SCRIPT = r"""
import itertools, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torch_side.kernels._fp8 import fp8_group_kernel, fp8_kernel
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
    compile(fp8_group_kernel, dict(types, members_ptr="*i64"),
            dict(E5M2=e5m2, TRANSPOSE=transpose, SCALE_MODE=mode, TILE_R=64, TILE_C=128, SOFT=False))
    count += 2
print("COMPILED", count)
"""


def test_every_kernel_variant_compiles_for_sm90():
    result = _run(SCRIPT, 900, TRITON_DEFAULT_FP_FUSION="1")
    assert result.returncode == 0 and "COMPILED 108" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-5000:]
    )


BACKGROUND = r"""
import torch, triton.compiler.compiler as tc
from torch_side import _compile
from torch_side._compile_child import compile_only
from torch_side.kernels._fp8 import fp8_kernel
from torch_side.kernels._nf4 import nf4_rows_kernel

bytes_ = torch.zeros(4096, dtype=torch.uint8)
floats = torch.zeros(64)
out = torch.zeros(4096, dtype=torch.bfloat16)
meta = dict(E5M2=False, TRANSPOSE=False, SCALE_MODE=0, TILE_R=64, TILE_C=128, SOFT=False, num_warps=4)
cases = [
    (bytes_, floats, out, 256, 512, 4, 128, 128),
    (bytes_, floats, out, 272, 528, 4, 128, 128),  # other sizes, same divisibility: the same variant
    (bytes_[1:], floats, out, 256, 512, 4, 128, 128),  # weight 1 byte off 16-byte alignment
    (bytes_, floats[1:], out, 256, 512, 4, 128, 128),  # scales 4 bytes off
    (bytes_, floats, out[3:], 256, 512, 4, 128, 128),  # output 6 bytes off
    (bytes_, floats, out, 1, 512, 4, 128, 128),  # one row: Triton makes it a constant
    (bytes_, floats, out, 255, 509, 4, 128, 128),  # sizes that are no multiple of 16
    (bytes_, floats, out, 2**31 + 16, 512, 4, 128, 128),  # a size that needs 64 bits
]
by_key = {}
with compile_only(90):
    for args in cases:
        real = fp8_kernel.warmup(*args, grid=(1,), **meta).hash
        stand_in = fp8_kernel.warmup(*_compile.stand_ins(args), grid=(1,), **meta).hash
        assert real == stand_in, args[3:]
        key = _compile.variant_key(fp8_kernel, 0, args, meta)
        assert by_key.setdefault(key, real) == real, ("one key, two compiled variants", args[3:])
print("VARIANTS", len(by_key), len(set(by_key.values())))
# one record per variant, whatever the sizes: a record names what Triton specializes on
assert _compile.record_path(fp8_kernel, cases[0], meta, 90) == _compile.record_path(fp8_kernel, cases[1], meta, 90)
assert _compile.record_path(fp8_kernel, cases[0], meta, 90) != _compile.record_path(fp8_kernel, cases[2], meta, 90)
assert _compile.record_path(fp8_kernel, cases[0], meta, 90) != _compile.record_path(fp8_kernel, cases[0], meta, 89)

# the compile process fills the cache that this process then reads without compiling
nf4_args = (bytes_, floats, floats, out, floats, floats, 0.5, 64, 128)
nf4_meta = dict(BYTES_PER_BLOCK=32, NESTED=True, NESTED_BLOCKSIZE=256, OFFSET_TENSOR=False, ROWS=128, COLS=32,
                SOFT=False, num_warps=4, enable_fp_fusion=False)
record = _compile.record_path(nf4_rows_kernel, _compile.stand_ins(nf4_args), nf4_meta, 90)
spec = _compile.describe(nf4_rows_kernel, nf4_args, nf4_meta, record)
assert not record.exists()
assert _compile._compile_elsewhere([spec], 90)
assert record.exists()  # written by the compile process: later processes load, whether or not this one does
def no_compiling(*a, **k):
    raise AssertionError("compiled in this process")
tc.ASTSource.make_ir = no_compiling
with compile_only(90):
    nf4_rows_kernel.warmup(*_compile.stand_ins(nf4_args), grid=(1,), **nf4_meta)
    try:  # a variant the compile process was not asked for is not in the cache
        nf4_rows_kernel.warmup(*_compile.stand_ins(nf4_args[:-1] + (129,)), grid=(1,), **nf4_meta)
    except AssertionError:
        print("FROM THE CACHE")
"""


def test_background_compiles_are_the_variants_a_launch_would_compile(tmp_path):
    """The variant key and the stand-in arguments of the background compile (torch_side._compile) give
    the compiled kernel Triton picks for the real arguments (pointer alignment, sizes of 1, multiples of
    16, 64-bit sizes); the compile process fills the cache a launch then reads without compiling, and
    writes the variant's record."""
    # an empty Triton cache of the test's own (removed with tmp_path)
    result = _run(BACKGROUND, 900, TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path / "triton"))
    # 8 cases, 7 variants: 256x512 and 272x528 (multiples of 16, aligned) share one
    assert result.returncode == 0 and "VARIANTS 7 7" in result.stdout and "FROM THE CACHE" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-5000:]
    )


EARLY_EXIT = r"""
import time, torch
from torch_side import _compile
from torch_side._compile_child import compile_only
from torch_side.kernels._fp8 import fp8_kernel

_compile._capability = lambda device_index: 90  # no GPU here: what an H200 reports


def load(kernel, args, meta, device_index):  # a GPU load's stand-in: compile (from the cache) for sm_90
    with compile_only(90):
        return kernel.warmup(*args, grid=(1,), **meta)


_compile._load = load
bytes_, floats, out = torch.zeros(4096, dtype=torch.uint8), torch.zeros(64), torch.zeros(4096, dtype=torch.bfloat16)
meta = dict(E5M2=False, TRANSPOSE=False, SCALE_MODE=0, TILE_R=64, TILE_C=128, SOFT=False, num_warps=4)
for args in [(bytes_, floats, out, 256, 512, 4, 128, 128), (bytes_, floats, out, 256, 7160, 64, 128, 128)]:
    print("RECORD", _compile.record_path(fp8_kernel, _compile.stand_ins(args), meta, 90), flush=True)
    _compile._request(_compile.variant_key(fp8_kernel, 0, args, meta), fp8_kernel, args, meta, 0)
    time.sleep(0.5)  # the first variant's compile process is running when the second is asked for
print("EXIT", flush=True)  # long before either compile process is done
"""


def test_a_process_that_ends_early_leaves_every_variant_it_asked_for_recorded(tmp_path):
    """A script's one load asks for its variants one after another and ends before they are compiled: each
    variant's compile process starts at once (not after the one before it) and records what it compiled,
    so the next process finds every one of them in Triton's cache."""
    import time

    started = time.monotonic()
    result = _run(EARLY_EXIT, 300, TRITON_CACHE_DIR=str(tmp_path))
    asked = time.monotonic() - started
    records = [
        pathlib.Path(line.split(maxsplit=1)[1])
        for line in result.stdout.splitlines()
        if line.startswith("RECORD")
    ]
    assert result.returncode == 0 and "EXIT" in result.stdout and len(set(records)) == 2, result.stderr[
        -3000:
    ]
    if records[1].exists():  # compiled before the process ended: this machine is too fast to tell
        pytest.skip("the second variant was compiled before its process ended")
    deadline = time.monotonic() + max(300.0, 10 * asked)
    while not all(r.exists() for r in records) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [r.exists() for r in records] == [True, True]


MANY_GPUS = r"""
import time, torch
from torch_side import _compile
from torch_side._compile_child import compile_only
from torch_side.kernels._fp8 import fp8_kernel

_compile._capability = lambda device_index: 90


def load(kernel, args, meta, device_index):
    with compile_only(90):
        return kernel.warmup(*args, grid=(1,), **meta)


_compile._load = load
calls = []
elsewhere = _compile._compile_elsewhere
_compile._compile_elsewhere = lambda specs, capability: calls.append(len(specs)) or elsewhere(specs, capability)
args = (torch.zeros(4096, dtype=torch.uint8), torch.zeros(64), torch.zeros(4096, dtype=torch.bfloat16), 256, 512, 4, 128, 128)
meta = dict(E5M2=False, TRANSPOSE=False, SCALE_MODE=0, TILE_R=64, TILE_C=128, SOFT=False, num_warps=4)
for device_index in range(4):  # one variant, asked for on four GPUs of one architecture
    _compile._request(_compile.variant_key(fp8_kernel, device_index, args, meta), fp8_kernel, args, meta, device_index)
    time.sleep(0.2)
_compile.wait_for_kernels()
print("READY", len(_compile._READY), "COMPILE PROCESSES", len(calls), flush=True)
"""


def test_one_variant_asked_for_on_several_gpus_is_compiled_once(tmp_path):
    result = _run(MANY_GPUS, 600, TRITON_CACHE_DIR=str(tmp_path))
    assert result.returncode == 0 and "READY 4 COMPILE PROCESSES 1" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-3000:]
    )


CHILD_REQUEST = r"""
import json, sys, torch
from torch_side import _compile
from torch_side.kernels._fp8 import fp8_kernel

meta = dict(E5M2=False, TRANSPOSE=False, SCALE_MODE=0, TILE_R=64, TILE_C=128, SOFT=False, num_warps=4)
specs = []
for cols in (512, 7160):
    args = (torch.zeros(4096, dtype=torch.uint8), torch.zeros(64), torch.zeros(4096, dtype=torch.bfloat16), 256, cols, 4, 128, 128)
    record = _compile.record_path(fp8_kernel, _compile.stand_ins(args), meta, 90)
    specs.append(_compile.describe(fp8_kernel, args, meta, record))
print(json.dumps({"capability": 90, "variants": specs}))
"""


def test_a_compile_process_whose_asker_has_gone_compiles_and_records_every_variant(tmp_path):
    """The asking process ended (its end of the pipe is closed) before the first variant was done: the
    compile process still compiles and records the others, instead of dying on its first line of output."""
    request = _run(CHILD_REQUEST, 300, TRITON_CACHE_DIR=str(tmp_path))
    assert request.returncode == 0, request.stderr[-3000:]
    records = [pathlib.Path(v["record"]) for v in json.loads(request.stdout)["variants"]]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
        "TRITON_CACHE_DIR": str(tmp_path)
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "torch_side._compile_child"], cwd=pathlib.Path(__file__).resolve().parents[2], env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    child.stdin.write(request.stdout)
    child.stdin.close()
    child.stdout.close()  # nobody reads what it prints any more
    child.wait(timeout=600)
    assert [r.exists() for r in records] == [True, True], child.stderr.read()[-3000:]


GROUP_ASKED = r"""
import threading, torch
from torch_side import _compile
from torch_side._compile import KernelNotReady
from torch_side._triton import dequantize_fp8_group, dequantize_fp8_triton

_compile._capability = lambda device_index: 90  # no GPU here: what an H200 reports
_compile._compile_elsewhere = lambda specs, capability: True
_compile._load = lambda *args: threading.Event().wait()  # still compiling while the calls below ask
torch.manual_seed(0)
weights = [torch.randn(256, 7160).to(torch.float8_e4m3fn) for _ in range(3)]
scales = [torch.rand(2, 56) for _ in range(3)]
for transpose in (False, True):
    kind = dict(block=(128, 128), grid_shape=(2, 56), dtype=torch.bfloat16, transpose=transpose)
    try:  # a planned kind's first weight, as dequantize_fp8 calls it
        dequantize_fp8_triton(weights[0], scales[0], plan_key=("kind", transpose), wait=False, **kind)
    except KernelNotReady:
        pass
    asked = set(_compile._REQUESTED)
    try:  # the kind's other weights, as dequantize_fp8_many and the loader call them
        dequantize_fp8_group(weights[1:], scales[1:], wait=False, **kind)
    except KernelNotReady:
        pass
    print("ASKED", len(asked), "NEW", len(_compile._REQUESTED - asked), flush=True)
"""


def test_a_single_weights_compile_asks_for_its_grouped_kernel_too():
    """When the kernel for one weight of a planned kind is asked for, the grouped launch that the kind's
    other weights take is asked for with it (one compile process makes both), not only once the single
    kernel is ready and a grouped call comes: a fresh process's grouped loads start a compile earlier."""
    result = _run(GROUP_ASKED, 300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["ASKED 2 NEW 0", "ASKED 4 NEW 0"], result.stdout
