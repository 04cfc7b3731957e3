"""One kept NF4 matmul, one kept FP8 matmul and one dense bf16 matmul of a Llama-3-8B shape, each called a few
times, for Nsight Compute to read the kernels' hardware counters (the Mosaic kernels are named
``body_mosaic_gpu_kernel``; XLA's GEMM of the dense matmul ``nvjet_*`` or ``gemm_fusion_*``)::

    XLA_FLAGS=--xla_gpu_enable_command_buffer= ncu --clock-control none -k regex:"body_mosaic|gemm|nvjet" -c 6 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        --section SchedulerStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \\
        --section InstructionStats python benchmarks/ncu_probe.py --calls 2

Weights are random, as in ``fused_matmul.py`` (NF4 nested, FP8 with 128x128 block scales); x is bf16.
``--variants`` (as ``fused_matmul_mosaic.py``'s) runs the kept matmuls once per setting of ``jax_side._mosaic``,
in the order given (raise ``-c`` to match: one kernel per kept matmul call).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fused_matmul as fm
import fused_matmul_mosaic as fmm

from jax_side import _fused


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=2, default=[14336, 4096], help="the weight's [out, in]")
    p.add_argument("--tokens", type=int, default=16, help="rows of x")
    p.add_argument("--formats", nargs="+", default=["NF4", "FP8", "dense"], choices=["NF4", "FP8", "dense"])
    p.add_argument("--calls", type=int, default=3, help="calls of each matmul (the first compiles)")
    p.add_argument("--variants", nargs="+", default=[""],
                   help="settings of jax_side._mosaic, each NAME=INT,... ('' is the module as it is)")  # fmt: skip
    a = p.parse_args()
    fmm.check_variants(p, a.variants)
    n, k = a.shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((a.tokens, k), dtype=np.float32)).astype(jnp.bfloat16)
    for fmt in a.formats:
        if fmt == "dense":
            w = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32)).astype(jnp.bfloat16)
            f = jax.jit(lambda x, w: x @ w)
            for _ in range(a.calls):
                jax.block_until_ready(f(x, w))
            print(fmt, "done", flush=True)
            continue
        w = (fm.nf4_weight if fmt == "NF4" else fm.fp8_weight)(rng, n, k)
        for spec in a.variants:
            # a new function: traced under the setting
            f = jax.jit(lambda x, w: _fused.quantized_matmul(x, w))
            with fmm.variant(spec):
                for _ in range(a.calls):
                    jax.block_until_ready(f(x, w))
            print(fmt, repr(spec), "done", flush=True)


if __name__ == "__main__":
    main()
