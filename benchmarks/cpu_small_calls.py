"""Small 4-bit decodes on the CPU, where a call's host work is most of its time: ``torch_side.dequantize``
(new result), ``torch_side.dequantize(out=)``, and bitsandbytes' own CPU ``dequantize_4bit``, in one
process, at 64x64 and 1024x1024, plain and nested absmax, bf16. Per call: the median of every call's wall
time (3000 calls at 64x64, 500 at 1024x1024), after 3 warm-up calls, with qbridge's C kernel ready
(``wait_for_kernels``). The three are timed in turns of a tenth of their calls each (qbridge, ``out=``,
bitsandbytes, qbridge, ...), so that a slow stretch of the machine (on a shared 2-core machine, tens of
milliseconds in which the second CPU delivers less: ``cpu_slow_windows.py``) falls on all three alike,
not on whichever ran then. About 15-60 s.

Each output line starts with the label given as the first argument and the ``torch_side`` it measured,
then per case the three times and two ratios, both against bitsandbytes in the same process: ``(new result
/ bitsandbytes, out= / bitsandbytes)``. Before/after comparisons run it alternately with each tree first on
``PYTHONPATH``::

    for i in 1 2 3; do
      PYTHONPATH=old-tree python benchmarks/cpu_small_calls.py before
      PYTHONPATH=. python benchmarks/cpu_small_calls.py after
    done

``--blocks 1`` times each callable's calls in one stretch, as the script did before 2026-12-07.

Results: ``results/cpu-small-calls-2core.txt``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import bitsandbytes.functional as F
import torch

import torch_side


def interleaved_us(calls: list[Callable[[], object]], reps: int, blocks: int) -> list[float]:
    """The median wall time (us) of ``reps`` calls of each of ``calls``, timed in ``blocks`` turns."""
    for fn in calls:
        for _ in range(3):
            fn()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(blocks):
        for fn, into in zip(calls, times, strict=True):
            for _ in range(reps // blocks):
                t0 = time.perf_counter()
                fn()
                into.append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e6 for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("label", nargs="?", default="")
    parser.add_argument("--blocks", type=int, default=10, help="turns each callable's calls are split into")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for shape in ((64, 64), (1024, 1024)):
        for nested in (False, True):
            w = torch.randn(*shape, dtype=torch.bfloat16)
            packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
            torch_side.dequantize(packed, qs)
            torch_side.wait_for_kernels()  # built in the background on a machine's first call
            reps = 3000 if shape[0] == 64 else 500
            out = torch.empty(*shape, dtype=torch.bfloat16)
            ours, into, bnb = interleaved_us(
                [
                    lambda: torch_side.dequantize(packed, qs),  # noqa: B023
                    lambda: torch_side.dequantize(packed, qs, out=out),  # noqa: B023
                    lambda: F.dequantize_4bit(packed, qs),  # noqa: B023
                ],
                reps,
                args.blocks,
            )
            rows.append(
                f"{shape[0]}x{shape[1]} {'nested' if nested else 'plain'}: qbridge {ours:.2f} out= {into:.2f} "
                f"bnb {bnb:.2f} us ({ours / bnb:.2f}x, out= {into / bnb:.2f}x)"
            )
    print(f"{args.label} ({os.path.dirname(torch_side.__file__)})", "|", " ; ".join(rows), flush=True)


if __name__ == "__main__":
    main()
