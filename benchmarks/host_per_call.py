"""Host work per call, as users call the functions one weight at a time (GPU machine).

For each case: ``host us``, the time the Python thread spends per call while calls queue up (300 calls
without a sync, the device synchronized before and after); ``wall us``, the same loop including the wait
for the device at its end, per call; ``event us``, CUDA events around single calls with L2 flushed
(``triton.testing.do_bench``). Peers run in the same process: bitsandbytes ``dequantize_4bit``, a
one-128x128-tile-per-program FP8 launch, bare ``jax.dlpack.from_dlpack``. Random data. Kernels compile
on their first call (``torch_side.wait_for_kernels()``), before the warm-up calls end.

Usage: ``python benchmarks/host_per_call.py [case name ...]``; each named case is also profiled
(cProfile, by own time).
"""

import cProfile
import io
import pstats
import sys
import time

import bitsandbytes.functional as F
import jax
import torch

import qbridge
import torch_side
from qbridge._bench_kernels import one_tile_per_program_fp8

torch.manual_seed(0)
dev = "cuda"
# every later call waits for the kernel it needs instead of answering from the torch path while Triton
# compiles in the background (the per-call figures are of the compiled kernels; a fresh process's first
# calls are timed by fresh_process_load.py and `qbridge bench`'s process rows)
torch_side.wait_for_kernels()


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def ev_us(fn, n=100):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def prof(name, fn, n=300, top=22):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    print(f"=== profile {name} ({n} calls)")
    print("\n".join(line for line in s.getvalue().splitlines()[6:] if line.strip()))


cases = {}
for shape in [(8192, 8192), (1024, 4096)]:
    w = torch.randn(shape, device=dev, dtype=torch.bfloat16)
    p, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    out = torch.empty(shape, device=dev, dtype=torch.bfloat16)
    cases[f"nf4 {shape} qbridge dequantize"] = lambda p=p, qs=qs: torch_side.dequantize(p, qs)
    cases[f"nf4 {shape} qbridge dequantize(out=)"] = lambda p=p, qs=qs, o=out: torch_side.dequantize(
        p, qs, out=o
    )
    cases[f"nf4 {shape} qbridge dequantize_nf4 number offset transpose"] = (
        lambda p=p, qs=qs, off=float(qs.offset): torch_side.dequantize_nf4(
            p,
            qs.absmax,
            shape=tuple(qs.shape),
            nested_absmax=qs.state2.absmax,
            nested_code=qs.state2.code,
            offset=off,
            transpose=True,
        )
    )
    cases[f"nf4 {shape} bnb dequantize_4bit(out=)"] = lambda p=p, qs=qs, o=out: F.dequantize_4bit(
        p, qs, out=o
    )
    cases[f"nf4 {shape} bnb dequantize_4bit"] = lambda p=p, qs=qs: F.dequantize_4bit(p, qs)
for shape in [(2048, 7168), (576, 7168), (8192, 8192)]:
    w = (torch.randn(shape, device=dev) * 64).to(torch.float8_e4m3fn)
    s = torch.rand((-(-shape[0] // 128), -(-shape[1] // 128)), device=dev) * 1e-2 + 1e-4
    out = torch.empty(shape, device=dev, dtype=torch.bfloat16)
    cases[f"fp8 {shape} qbridge dequantize_fp8"] = lambda w=w, s=s: torch_side.dequantize_fp8(w, s)
    cases[f"fp8 {shape} one tile per program"] = lambda w=w, s=s, o=out: one_tile_per_program_fp8(w, s, o)
t = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
cases["to_jax auto"] = lambda: qbridge.to_jax(t)
cases["to_jax current"] = lambda: qbridge.to_jax(t, producer="current")
cases["bare from_dlpack"] = lambda: jax.dlpack.from_dlpack(t)
w = (torch.randn(2048, 7168, device=dev) * 64).to(torch.float8_e4m3fn)
s = torch.rand(16, 56, device=dev)
cases["fp8 2048x7168 dequantize_to_jax"] = lambda: qbridge.dequantize_to_jax(w, s)
kept = []
cases["fp8 2048x7168 dequantize_to_jax kept"] = lambda: kept.append(qbridge.dequantize_to_jax(w, s))
cases["fp8 2048x7168 dequantize_fp8+from_dlpack kept"] = lambda: kept.append(
    jax.dlpack.from_dlpack(torch_side.dequantize_fp8(w, s))
)
print(f"{'case':<48}{'host us':>10}{'wall us':>10}{'event us':>10}")
for name, fn in cases.items():
    h, wl = host_us(fn)
    kept.clear()
    e = ev_us(fn)
    print(f"{name:<48}{h:>10.1f}{wl:>10.1f}{e:>10.1f}")
from qbridge._handoff import _torch_streams

print("torch streams scanned:", len(_torch_streams(0)))
for name in sys.argv[1:]:
    prof(name, cases[name])
