"""Where the CPU decode's outliers come from: time windows in which the second thread's share slows down.

``cpu_small_calls.py`` showed, in some processes on the 2-core CPU machine, one case of
``torch_side.dequantize`` running 1.2-1.7x its usual time while the other cases did not. This probe times one
NF4 1024x1024 -> bf16 decode (plain absmax, written through ``out=``: no allocation) in blocks of 150
back-to-back calls, and for each slow block (median above ``--slow`` us) prints what ``/proc/stat`` says each
CPU did meanwhile (user + system ticks, steal ticks); then bitsandbytes' own CPU ``dequantize_4bit`` and
qbridge's decode with torch's thread count at 2 and at 1, alternating, so that a single thread's time, what a
call costs when the second thread's share does not come, is measured beside the peer's.

    python benchmarks/cpu_slow_windows.py --processes 3
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time

PROBE = r"""
import sys
import bitsandbytes.functional as F
import torch
import torch_side
from cpu_decode import median_ms

blocks, slow_us = int(sys.argv[1]), float(sys.argv[2])
torch.manual_seed(0)
w = torch.randn(1024, 1024, dtype=torch.bfloat16)
packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
torch_side.dequantize(packed, qs)
torch_side.wait_for_kernels()
out = torch.empty(1024, 1024, dtype=torch.bfloat16)


def cpu_ticks():
    rows = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and not line.startswith("cpu "):
                p = line.split()
                rows[p[0]] = (int(p[1]) + int(p[3]), int(p[8]))  # user + system, steal
    return rows


def block_us(fn, calls=150):  # cpu_decode's median of back-to-back calls (after 3 untimed), in us
    return median_ms(fn, calls) * 1e3


decode = lambda: torch_side.dequantize(packed, qs, out=out)
for _ in range(20):
    decode()
slow = []
for b in range(blocks):
    before = cpu_ticks()
    us = block_us(decode)
    after = cpu_ticks()
    if us > slow_us:
        busy = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}
        slow.append(f"block {b}: {us:.0f} us, (busy, steal) ticks per CPU {busy}")
print(f"slow blocks: {len(slow)} of {blocks}")
for line in slow[:8]:
    print("  " + line)
for threads in (2, 1, 2, 1):
    torch.set_num_threads(threads)
    bnb = block_us(lambda: F.dequantize_4bit(packed, qs), 400)
    ours = block_us(lambda: torch_side.dequantize(packed, qs), 400)
    print(f"torch threads {threads}: qbridge {ours:.1f} us, bitsandbytes {bnb:.1f} us ({ours / bnb:.2f}x)")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=3, help="fresh processes (default 3)")
    parser.add_argument(
        "--blocks", type=int, default=200, help="blocks of 150 calls per process (default 200)"
    )
    parser.add_argument("--slow", type=float, default=80.0, help="a block above this median (us) is slow")
    args = parser.parse_args()
    if args.processes < 1 or args.blocks < 1 or args.slow <= 0:
        parser.error("--processes and --blocks take at least 1, --slow a positive number")
    for i in range(args.processes):
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(args.blocks), str(args.slow)],
            capture_output=True, text=True, cwd=pathlib.Path(__file__).parent,  # finds cpu_decode
        )  # fmt: skip
        if done.returncode:
            sys.exit(f"process {i + 1} failed:\n{done.stderr[-2000:]}")
        print(f"process {i + 1} ({time.perf_counter() - t0:.0f} s):\n{done.stdout.rstrip()}", flush=True)


if __name__ == "__main__":
    main()
