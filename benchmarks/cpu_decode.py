"""4-bit decode on the CPU: ``torch_side.dequantize`` and ``jax_side.dequantize_nf4`` against bitsandbytes' own
CPU kernel, same process; and FP8 decode on the CPU (``torch_side.dequantize_fp8``) against the torch path.

bitsandbytes' CPU kernel is wrong for some shapes (``torch_side._backend.bnb_cpu_kernel_restarts_blocks``),
so qbridge never calls it; its speed is the bar. The shapes here are ones where it is right. Per call:
medians of wall-clock time over back-to-back calls, random data, bf16 output, nested and plain absmax, warm-up
excluded; ``qbridge`` is the default call (qbridge's C kernel, ``torch_side/_native.py``), ``torch path``
the same call with ``backend="torch"`` (what answers while the kernel is being built, or without a
compiler). ``jax_side`` is ``jax_side.dequantize_nf4`` on concrete CPU arrays (the same pieces, moved with
numpy; result ready), through the C kernel (``jax_side/_cpu_kernel.py``) and through XLA's operations (what
answers before that kernel is built, or without a compiler). Whole process: a fresh ``python -c`` that imports torch_side, makes an NF4 weight and times its
first ``dequantize_nf4`` and the next 100, with an empty cache directory (the kernel is built in the
background meanwhile) and with the one that run left (loaded on the first call).

Written transposed: a Linear's weight decoded as its Flax kernel (``transpose=True``, contiguous), against a
row-major decode followed by a transposed copy (the route before the kernel wrote transposes itself).

Usage: ``python benchmarks/cpu_decode.py [--out results/cpu-decode.txt]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import bitsandbytes
import bitsandbytes.functional as F
import jax
import jax.numpy as jnp
import torch

import jax_side
import torch_side
from jax_side import _cpu_kernel


def median_ms(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


PROCESS = """
import time
t0 = time.perf_counter()
import torch, torch_side
imported = time.perf_counter() - t0
g = torch.Generator().manual_seed(0)
packed = torch.randint(0, 256, (4096 * 4096 // 2,), dtype=torch.uint8, generator=g)
absmax = torch.rand(4096 * 4096 // 64, generator=g)
t0 = time.perf_counter()
torch_side.dequantize_nf4(packed, absmax, shape=(4096, 4096))
first = time.perf_counter() - t0
t0 = time.perf_counter()
for _ in range(100):
    torch_side.dequantize_nf4(packed, absmax, shape=(4096, 4096))
print(f"{imported:.2f} {first * 1e3:.1f} {(time.perf_counter() - t0) * 1e3:.0f}")
"""


@contextlib.contextmanager
def _xla_operations() -> Iterator[None]:
    """jax_side's CPU decodes traced inside decode with XLA's operations, as before the kernel is built."""
    saved = _cpu_kernel._READY, _cpu_kernel._UNAVAILABLE
    _cpu_kernel._READY, _cpu_kernel._UNAVAILABLE = False, True
    try:
        yield
    finally:
        _cpu_kernel._READY, _cpu_kernel._UNAVAILABLE = saved


def _jax_call(packed: torch.Tensor, qs: object) -> Callable[[], object]:
    """``jax_side.dequantize_nf4`` on the same pieces, as CPU jax arrays; waits for the result."""
    d = qs.as_dict(packed=False)  # type: ignore[attr-defined]
    kw = dict(shape=tuple(qs.shape), blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=jnp.bfloat16)  # type: ignore[attr-defined]
    p, a = jnp.asarray(packed.numpy()), jnp.asarray(qs.absmax.numpy())  # type: ignore[attr-defined]
    if qs.nested:  # type: ignore[attr-defined]
        kw.update(
            nested_absmax=jnp.asarray(d["nested_absmax"].numpy()),
            nested_code=jnp.asarray(d["nested_quant_map"].numpy()),
            nested_blocksize=d["nested_blocksize"],
            offset=float(d["nested_offset"]),
        )
    return lambda: jax_side.dequantize_nf4(p, a, **kw).block_until_ready()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch_side.wait_for_kernels()
    jax_side.wait_for_kernels()
    lines = [
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), jax {jax.__version__}, bitsandbytes {bitsandbytes.__version__}, "
        f"Python {platform.python_version()}",
        "per call (median ms):",
        f"{'shape':<12}{'absmax':<8}{'qbridge':>10}{'torch path':>12}{'bitsandbytes':>14}{'qbridge/bnb':>13}"
        f"{'jax_side':>10}{'XLA ops':>10}{'jax_side/bnb':>14}",
    ]
    torch.manual_seed(0)
    for shape in [(64, 64), (1024, 1024), (4096, 4096)]:
        for nested in (False, True):
            w = torch.randn(shape, dtype=torch.bfloat16)
            packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
            reps = 15 if shape[0] > 2000 else 300
            theirs = median_ms(lambda p=packed, q=qs: F.dequantize_4bit(p, q), reps)
            ours = median_ms(lambda p=packed, q=qs: torch_side.dequantize(p, q), reps)
            torch_path = median_ms(lambda p=packed, q=qs: torch_side.dequantize(p, q, backend="torch"), reps)
            call = _jax_call(packed, qs)
            jax_kernel = median_ms(call, reps)
            with _xla_operations():
                jax_xla = median_ms(call, reps)
            lines.append(
                f"{'x'.join(map(str, shape)):<12}{'nested' if nested else 'plain':<8}{ours:>10.4f}"
                f"{torch_path:>12.4f}{theirs:>14.4f}{ours / theirs:>12.2f}x"
                f"{jax_kernel:>10.4f}{jax_xla:>10.4f}{jax_kernel / theirs:>13.2f}x"
            )
    lines += [
        "FP8 -> bf16, block 128x128 scales, per call (median ms); no library decodes FP8 on the CPU faster than",
        "torch's own ops, so the bar is the torch path (float32(W) * scale, rounded once: what answers without",
        "the kernel, and what a hand-written decode does):",
        f"{'shape':<12}{'fp8':<8}{'qbridge':>10}{'torch path':>12}{'torch/qbridge':>15}",
    ]
    for shape in [(64, 64), (1024, 1024), (576, 7168), (2048, 7168), (7168, 2048), (4096, 4096)]:
        for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
            W = (torch.randn(shape) * 64).to(fp8)
            s = torch.rand(-(-shape[0] // 128), -(-shape[1] // 128)) * 1e-3 + 1e-5
            reps = 15 if shape[0] * shape[1] > 2_000_000 else 300
            ours = median_ms(lambda W=W, s=s: torch_side.dequantize_fp8(W, s), reps)
            torch_path = median_ms(lambda W=W, s=s: torch_side.dequantize_fp8(W, s, backend="torch"), reps)
            lines.append(
                f"{'x'.join(map(str, shape)):<12}{str(fp8).split('_')[-1]:<8}{ours:>10.4f}{torch_path:>12.4f}"
                f"{torch_path / ours:>14.1f}x"
            )
    lines += [
        "Written transposed (a Linear's [out, in] weight as its [in, out] Flax kernel, contiguous, as the loader",
        "asks), per call (median ms): the kernel writing the transpose itself, against the route before it",
        "(row-major decode by the kernel, then a transposed copy), and the torch path:",
        f"{'shape':<12}{'format':<12}{'qbridge':>10}{'row-major+copy':>16}{'torch path':>12}{'copy/qbridge':>14}",
    ]
    for shape in [(1024, 4096), (4096, 4096), (14336, 4096)]:
        w = torch.randn(shape, dtype=torch.bfloat16)
        packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        p = torch_side.parse_quant_state(qs)
        kw = dict(shape=p.shape, blocksize=p.blocksize, nested_absmax=p.nested_absmax, nested_code=p.nested_code,
                  nested_blocksize=p.nested_blocksize, offset=p.offset, dtype=torch.bfloat16)  # fmt: skip
        reps = 7 if shape[0] > 2000 else 51
        ours = median_ms(
            lambda a=p.absmax, k=kw, q=packed: torch_side.dequantize_nf4(q, a, transpose=True, **k), reps
        )
        copy = median_ms(
            lambda a=p.absmax, k=kw, q=packed: torch_side.dequantize_nf4(q, a, **k).t().contiguous(), reps
        )
        torch_path = median_ms(
            lambda a=p.absmax, k=kw, q=packed: torch_side.dequantize_nf4(
                q, a, transpose=True, backend="torch", **k
            ).contiguous(),
            reps,
        )
        lines.append(
            f"{'x'.join(map(str, shape)):<12}{'nf4 nested':<12}{ours:>10.3f}{copy:>16.3f}{torch_path:>12.3f}"
            f"{copy / ours:>13.2f}x"
        )
    for shape in [(576, 7168), (2048, 7168), (7168, 2048)]:
        W = (torch.randn(shape) * 64).to(torch.float8_e4m3fn)
        s = torch.rand(-(-shape[0] // 128), -(-shape[1] // 128)) * 1e-3 + 1e-5
        reps = 15
        ours = median_ms(lambda W=W, s=s: torch_side.dequantize_fp8(W, s, transpose=True), reps)
        copy = median_ms(lambda W=W, s=s: torch_side.dequantize_fp8(W, s).t().contiguous(), reps)
        torch_path = median_ms(
            lambda W=W, s=s: torch_side.dequantize_fp8(W, s, transpose=True, backend="torch").contiguous(),
            reps,
        )
        lines.append(
            f"{'x'.join(map(str, shape)):<12}{'fp8 e4m3':<12}{ours:>10.3f}{copy:>16.3f}{torch_path:>12.3f}"
            f"{copy / ours:>13.2f}x"
        )
    lines.append("fresh process, NF4 4096x4096 plain (imports s, first call ms, next 100 calls ms):")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "QBRIDGE_CACHE_DIR": cache}
        for label in ("empty cache", "warm cache"):
            done = subprocess.run([sys.executable, "-c", PROCESS], env=env, capture_output=True, text=True)
            lines.append(f"  {label:<12} {done.stdout.strip() or done.stderr.strip()[-300:]}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
