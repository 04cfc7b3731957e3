"""Small 4-bit decodes on the CPU, where a call's host work is most of its time: ``torch_side.dequantize``
(new result), ``torch_side.dequantize(out=)``, and bitsandbytes' own CPU ``dequantize_4bit``, in one
process, at 64x64 and 1024x1024, plain and nested absmax, bf16. Medians of back-to-back calls (3000 at
64x64, 500 at 1024x1024) after 3 warm-up calls, with qbridge's C kernel ready (``wait_for_kernels``).
About 15-60 s.

Each output line starts with the label given as the first argument and the ``torch_side`` it measured,
then per case the three times and two ratios, both against bitsandbytes in the same process: ``(new result
/ bitsandbytes, out= / bitsandbytes)``. Before/after comparisons run it alternately with each tree first on
``PYTHONPATH``::

    for i in 1 2 3; do
      PYTHONPATH=old-tree python benchmarks/cpu_small_calls.py before
      PYTHONPATH=. python benchmarks/cpu_small_calls.py after
    done

Results: ``results/cpu-small-calls-2core.txt``.
"""

from __future__ import annotations

import os
import sys

import bitsandbytes.functional as F
import torch
from cpu_decode import median_ms

import torch_side


def main() -> None:
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
            ours = median_ms(lambda: torch_side.dequantize(packed, qs), reps) * 1e3  # noqa: B023
            into = median_ms(lambda: torch_side.dequantize(packed, qs, out=out), reps) * 1e3  # noqa: B023
            bnb = median_ms(lambda: F.dequantize_4bit(packed, qs), reps) * 1e3  # noqa: B023
            rows.append(
                f"{shape[0]}x{shape[1]} {'nested' if nested else 'plain'}: qbridge {ours:.2f} out= {into:.2f} "
                f"bnb {bnb:.2f} us ({ours / bnb:.2f}x, out= {into / bnb:.2f}x)"
            )
    label = sys.argv[1] if len(sys.argv) > 1 else ""
    print(f"{label} ({os.path.dirname(torch_side.__file__)})", "|", " ; ".join(rows), flush=True)


if __name__ == "__main__":
    main()
