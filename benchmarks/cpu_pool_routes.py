"""Which threads a large CPU decode runs on, and what torch's OpenMP threads do to a pool beside them.

``torch_side``'s C kernel splits a call of 2**19 elements or more over torch's thread count. Called from the
main thread of a process whose torch runs on GNU OpenMP (torch's Linux wheels), it runs on torch's own OpenMP
threads; called from another thread, on a pool of its own (``torch_side/kernels/cpu_4bit.c``). Before
2026-12-07 every call took the pool. This probe times NF4 1024x1024 -> bf16 (plain absmax) in fresh
processes, from the main thread and from another thread, each in turns with bitsandbytes' own CPU
``dequantize_4bit`` (which runs on torch's OpenMP threads): 10 blocks of 50 calls of each, new result and
``out=``. Per case it prints the median, the 90th percentile and each block's median (us), and how many
blocks took 1.5x the fastest block's time or more. ``--omp-passive`` runs the processes with
``OMP_WAIT_POLICY=passive`` (torch's threads sleep at once instead of spinning after each parallel region).

    python benchmarks/cpu_pool_routes.py --processes 3 [--omp-passive]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

PROBE = r"""
import statistics, sys, threading, time
import bitsandbytes.functional as F
import torch
import torch_side
from torch_side import _native

torch.manual_seed(0)
w = torch.randn(1024, 1024, dtype=torch.bfloat16)
packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
torch_side.dequantize(packed, qs)
torch_side.wait_for_kernels()
out = torch.empty(1024, 1024, dtype=torch.bfloat16)
calls = {
    "new result": lambda: torch_side.dequantize(packed, qs),
    "out=": lambda: torch_side.dequantize(packed, qs, out=out),
    "bitsandbytes": lambda: F.dequantize_4bit(packed, qs),
}


def timed():
    times = {name: [] for name in calls}
    for fn in calls.values():
        for _ in range(3):
            fn()
    for _ in range(10):
        for name, fn in calls.items():
            for _ in range(50):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e6)
    return times


for route in ("main thread", "another thread"):
    if route == "main thread":
        times = timed()
    else:
        box = {}
        thread = threading.Thread(target=lambda: box.update(timed()))
        thread.start()
        thread.join()
        times = box
    for name, t in times.items():
        blocks = [statistics.median(t[i * 50 : (i + 1) * 50]) for i in range(10)]
        slow = sum(b >= 1.5 * min(blocks) for b in blocks)
        print(
            f"{route:14s} {name:12s} median {statistics.median(t):6.1f} p90 {statistics.quantiles(t, n=10)[-1]:6.1f}"
            f"  slow blocks {slow:2d}/10  blocks {[round(b) for b in blocks]}"
        )
print("torch's OpenMP team handed to the kernel:", _native.torch_openmp_team() is not None)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=passive in the processes")
    args = parser.parse_args()
    here = pathlib.Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    if args.omp_passive:
        env["OMP_WAIT_POLICY"] = "passive"
    for i in range(args.processes):
        done = subprocess.run(
            [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
        )
        print(f"# process {i + 1}" + (" (OMP_WAIT_POLICY=passive)" if args.omp_passive else ""))
        print(done.stdout, end="", flush=True)


if __name__ == "__main__":
    main()
