"""A fresh process's first load with some of its first-time costs paid before it: which ones decide it.

Each run is one fresh process: imports, then, by ``variant`` (names joined by ``+``):
``init`` starts torch's CUDA and JAX's GPU client; ``pin`` pins 1.1 GiB of host memory through torch
(``pin_memory=True``, 72 blocks of 16 MiB, then freed into torch's cache); ``triton`` imports Triton, hashes
its installation (``triton_key``) and imports the kernels' module. Then two ``qbridge.load_checkpoint``
calls of the same checkpoint to the GPU, each to ready arrays. ``base`` pays nothing before.

    python benchmarks/deepseek_v3_scale.py --layers 1 --experts 32 --loads 1 --dir /tmp/ds32   # a checkpoint
    for v in base init init+pin init+triton init+pin+triton; do python benchmarks/first_load_parts.py /tmp/ds32 $v; done

Results: ``results/first-load-parts-h200.txt``.
"""

import sys
import time

t0 = time.perf_counter()
import jax
import torch

import qbridge

t1 = time.perf_counter()
path, variant = sys.argv[1], sys.argv[2]
pre = {}
if "init" in variant:
    s = time.perf_counter()
    torch.cuda.init()
    torch.empty(1, device="cuda")
    pre["torch cuda"] = time.perf_counter() - s
    s = time.perf_counter()
    jax.devices("gpu")
    pre["jax client"] = time.perf_counter() - s
if "pin" in variant:
    s = time.perf_counter()
    bufs = [torch.empty(16 << 20, dtype=torch.uint8, pin_memory=True) for _ in range(72)]
    del bufs
    pre["pin 1.1 GiB in 16 MiB"] = time.perf_counter() - s
if "triton" in variant:
    s = time.perf_counter()

    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        from triton.compiler.compiler import triton_key
    triton_key()

    pre["triton import+key"] = time.perf_counter() - s
s = time.perf_counter()
p = qbridge.load_checkpoint(path, device="cuda", progress=False)
jax.block_until_ready(p)
first = time.perf_counter() - s
del p
s = time.perf_counter()
p = qbridge.load_checkpoint(path, device="cuda", progress=False)
jax.block_until_ready(p)
second = time.perf_counter() - s
print(
    f"VARIANT {variant:18s} imports {t1 - t0:.2f} s; pre "
    + ", ".join(f"{k} {v:.3f}" for k, v in pre.items())
    + f"; first load {first:.3f} s, second {second:.3f} s",
    flush=True,
)
