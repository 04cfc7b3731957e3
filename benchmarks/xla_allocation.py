"""Host time of the XLA programs that allocate the loader's results (``qbridge._handoff``'s allocation
programs: ``count`` arrays of one shape from one call), per call and per array, compiled ahead of time
(as the loader calls them) and through ``jax.jit``, on the default device.

    python benchmarks/xla_allocation.py

Results: in ``results/loader-host-per-tensor-h200.txt``.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def allocation(count: int, shape: tuple[int, ...], fill: jax.Array, aot: bool):
    def allocate(fill: jax.Array) -> tuple[jax.Array, ...]:  # distinct values: distinct buffers
        return tuple(jax.lax.broadcast(fill + np.asarray(i, jnp.bfloat16), shape) for i in range(count))

    jitted = jax.jit(
        allocate, out_shardings=(jax.sharding.SingleDeviceSharding(fill.devices().pop()),) * count
    )
    return jitted.lower(fill).compile() if aot else jitted


def main() -> None:
    device = jax.devices()[0]
    fill = jax.device_put(np.zeros((), jnp.bfloat16), device)
    print(f"{device.device_kind}; jax {jax.__version__}")
    for shape in [(256, 128), (2048, 7168)]:
        for count in (1, 8, 32):
            for aot in (True, False):
                fn = allocation(count, shape, fill, aot)
                for _ in range(5):
                    jax.block_until_ready(fn(fill))
                times = []
                for _ in range(7):
                    start = time.perf_counter()
                    for _ in range(20):
                        out = fn(fill)
                    times.append((time.perf_counter() - start) / 20)
                    jax.block_until_ready(out)
                    del out
                per_call = statistics.median(times)
                print(f"shape {shape} count {count:2d} {'aot' if aot else 'jit'}: {per_call * 1e6:7.1f} us per call, "
                      f"{per_call / count * 1e6:6.1f} us per array", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
