"""4-bit decode on the CPU: ``torch_side.dequantize`` against bitsandbytes' own CPU kernel, same process.

bitsandbytes' CPU kernel is wrong for some shapes (``torch_side._backend.bnb_cpu_kernel_restarts_blocks``),
so qbridge never calls it; its speed is the bar. The shapes here are ones where it is right. Medians of
wall-clock time, random data, bf16 output, nested and plain absmax.

Usage: ``python benchmarks/cpu_decode.py [--out results/cpu-decode.txt]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import bitsandbytes
import bitsandbytes.functional as F
import torch

import torch_side


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = [
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), bitsandbytes {bitsandbytes.__version__}",
        f"{'shape':<12}{'absmax':<8}{'qbridge ms':>12}{'bitsandbytes ms':>17}{'ratio':>8}",
    ]
    torch.manual_seed(0)
    for shape in [(64, 64), (1024, 1024), (4096, 4096)]:
        for nested in (False, True):
            w = torch.randn(shape, dtype=torch.bfloat16)
            packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
            reps = 7 if shape[0] > 2000 else 50
            ours = median_ms(lambda p=packed, q=qs: torch_side.dequantize(p, q), reps)
            theirs = median_ms(lambda p=packed, q=qs: F.dequantize_4bit(p, q), reps)
            lines.append(
                f"{'x'.join(map(str, shape)):<12}{'nested' if nested else 'plain':<8}{ours:>12.3f}{theirs:>17.3f}"
                f"{ours / theirs:>7.1f}x"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
