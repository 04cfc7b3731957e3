"""A checkpoint loaded by a fresh process, profiled: ``python benchmarks/fresh_process_load.py PATH``.

Prints the import time, the load time (``qbridge.load_checkpoint(PATH, device="cuda")`` to ready arrays)
and the functions with the most cumulative time. Run it twice with the same ``TRITON_CACHE_DIR``, first
empty, to see what Triton's compilation adds.
"""

import cProfile
import io
import pstats
import sys
import time

t0 = time.perf_counter()
import jax

import qbridge

t1 = time.perf_counter()
pr = cProfile.Profile()
pr.enable()
params = qbridge.load_checkpoint(sys.argv[1], device="cuda", progress=False)
jax.block_until_ready(params)
pr.disable()
t2 = time.perf_counter()
print(f"PROCESS imports {t1 - t0:.2f} s, load {t2 - t1:.2f} s, leaves {len(jax.tree.leaves(params))}")
s = io.StringIO()
pstats.Stats(pr, stream=s).sort_stats("cumtime").print_stats(28)
print("\n".join(line[:170] for line in s.getvalue().splitlines()[6:] if line.strip()))
