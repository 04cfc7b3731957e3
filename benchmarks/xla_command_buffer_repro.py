"""XLA fails to update a CUDA-graph memcpy node whose source moves between memory allocators.

JAX alone (plus any DLPack producer for the foreign buffer: CuPy, else torch), no qbridge. With XLA's
defaults, a jitted program runs from CUDA graphs ("command buffers") that XLA records on the first call
and updates with each later call's buffers. A program that copies an input to an output (here it returns
its parameters, as ``nnx.jit`` returns a module's state) records a device-to-device memcpy node. If the
first call's parameter is a zero-copy DLPack import of memory that another library allocated (CuPy's or
torch's ``cudaMalloc``) and the second call's parameter is memory XLA allocated, CUDA refuses the update:

    JaxRuntimeError: INTERNAL: CUDA error: Failed to set memcpy D2D node params: CUDA_ERROR_INVALID_VALUE

(``cuGraphExecMemcpyNodeSetParams`` requires the new operands to be allocated like the recorded ones.) Seen
on an H200 with jax 0.11.2, at 4 MB and 256 MB, with XLA's preallocation on and off
(``benchmarks/results/xla-command-buffer-h200.txt``). Parameters copied by XLA first pass, and so does
the foreign buffer with command buffers off.

Usage (on a CUDA machine; each case runs in a fresh process):

    python benchmarks/xla_command_buffer_repro.py            # all cases, one line each
    python benchmarks/xla_command_buffer_repro.py CASE MB    # one case

Cases: ``foreign`` (the failure), ``xla-copy`` (the parameters copied by XLA first: passes),
``foreign-no-cmdbuf`` (``--xla_gpu_enable_command_buffer=``: passes), ``foreign-prealloc``
(``XLA_PYTHON_CLIENT_PREALLOCATE=true``: XLA's arena allocated up front; fails too).
"""

from __future__ import annotations

import os
import subprocess
import sys

CASES = ("foreign", "xla-copy", "foreign-no-cmdbuf", "foreign-prealloc")


def _foreign(shape: tuple[int, int]):
    """A bf16-sized buffer allocated with cudaMalloc by another library, as a zero-copy jax.Array."""
    import jax
    import numpy as np

    try:
        import cupy

        buf = cupy.asarray(np.random.default_rng(0).standard_normal(shape, dtype=np.float32) * 0.02)
        return jax.dlpack.from_dlpack(buf), "cupy"
    except ImportError:
        import torch

        t = torch.randn(shape, device="cuda") * 0.02
        torch.cuda.synchronize()
        return jax.dlpack.from_dlpack(t), "torch"


def run_case(case: str, mb: int) -> str:
    import jax
    import jax.numpy as jnp

    n = max(256, int((mb * 2**20 / 4) ** 0.5) // 256 * 256)  # a float32 [n, n] parameter of about `mb` MB
    params = []
    for _ in range(4):
        p, producer = _foreign((n, n))
        params.append(jax.device_put(p, may_alias=False) if case == "xla-copy" else p)

    @jax.jit
    def step(ps, x):  # returns its parameters (copied: inputs are not donated), like nnx.jit's state
        for p in ps:
            x = jnp.tanh(x @ p)
        return ps, x

    x = jnp.ones((8, n), jnp.float32)
    done = 0
    try:
        for _ in range(5):
            params, y = step(params, x)  # from the second call on, the parameters are XLA's outputs
            y.block_until_ready()
            done += 1
        return f"{case:<18} {4 * n * n * 4 / 2**20:8.0f} MB of {producer} parameters: 5 of 5 calls ok"
    except Exception as e:
        return f"{case:<18} {4 * n * n * 4 / 2**20:8.0f} MB of {producer} parameters: call {done + 1} FAILED: {str(e).splitlines()[0][:160]}"


def main() -> None:
    if len(sys.argv) == 3:
        print(run_case(sys.argv[1], int(sys.argv[2])), flush=True)
        return
    import jax

    print(f"jax {jax.__version__}; {jax.devices()[0].device_kind}; XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}")
    for case in CASES:
        for mb in (1, 64):
            env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
            if case == "foreign-no-cmdbuf":
                env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
            if case == "foreign-prealloc":
                env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true"
                env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.3"
            out = subprocess.run(
                [sys.executable, __file__, case, str(mb)], env=env, capture_output=True, text=True
            )
            print(
                out.stdout.strip() or f"{case} {mb} MB: exit {out.returncode}: {out.stderr.strip()[-300:]}",
                flush=True,
            )


if __name__ == "__main__":
    main()
