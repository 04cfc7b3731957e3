"""A fresh process's first loads of a checkpoint, with the loader's read-ahead window of pinned host memory
set to a given size (or with pageable instead of pinned memory): what a script that loads once sees.

Each run is one fresh process: imports, then three ``qbridge.load_checkpoint`` calls of the same checkpoint
to the GPU, each to ready arrays. The first pays what a process pays once (CUDA and XLA start-up, pinning
the window's host memory, kernels and allocation programs loaded or compiled in the background while
weights take the per-weight route); the later ones show the steady state. The window is
``qbridge._loader.READ_AHEAD_BYTES`` (default 1 GiB); ``nopin`` keeps the default window in pageable memory.

    python benchmarks/deepseek_v3_scale.py --layers 1 --experts 32 --loads 2 --dir /tmp/ds32   # a checkpoint
    for w in 1024 256 64 nopin; do python benchmarks/first_load.py /tmp/ds32 $w; done

Results: ``results/first-load-window-h200.txt``.
"""

from __future__ import annotations

import sys
import time

t0 = time.perf_counter()
import jax

import qbridge
from qbridge import _loader

t1 = time.perf_counter()


def main() -> None:
    path, window = sys.argv[1], sys.argv[2]
    if window == "nopin":
        init = _loader._ReadAhead.__init__

        def pageable(self, ckpt, keys, *, pin):
            init(self, ckpt, keys, pin=False)

        _loader._ReadAhead.__init__ = pageable  # type: ignore[method-assign]
    else:
        _loader.READ_AHEAD_BYTES = int(window) << 20
    times = []
    for _ in range(3):
        start = time.perf_counter()
        params = qbridge.load_checkpoint(path, device="cuda", progress=False)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - start)
        del params
    print(
        f"PROCESS {window:>6}: imports {t1 - t0:.2f} s, loads {' '.join(f'{t:.3f}' for t in times)} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
