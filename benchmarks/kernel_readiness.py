"""When a process's Triton kernels are ready, and what repeated loads take before and after.

A call with ``backend="auto"`` never waits for Triton (``torch_side._compile``): until the kernel it needs is
ready, it decodes on the exact torch path (or bitsandbytes'), which costs more of the host per weight. This
script writes the NF4 checkpoint of ``fresh_process_raw_route.py`` (N decoder layers with Llama-3-8B's
linear shapes) once, then runs one fresh process per ``--mode``:

- ``busy``: loads it again and again until the kernel is ready, printing each load's time and how many of
  its weights were decoded without the kernel;
- ``idle``: loads it once, then sleeps until the kernel is ready;
- ``steady``: loads it once, waits for the kernels (``torch_side.wait_for_kernels``), then loads it
  ``--loads`` times and prints the median without the first two.

Each process also prints the background work's steps as they ran (a compile process, Triton loading the
kernel from its cache) with their wall and CPU times. Run each mode several times: the first process on a
machine compiles (Triton's cache is empty), later ones load from the cache::

    python benchmarks/kernel_readiness.py --mode busy busy idle steady steady [--layers 4]
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

CHILD = r"""
import collections, statistics, sys, time
t_start = time.perf_counter()
import jax, qbridge, torch_side
from torch_side import _compile

path, mode, loads = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps, not_ready = [], collections.Counter()

def timed(name):
    f = getattr(_compile, name)
    def step(*a, **k):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return f(*a, **k)
        finally:
            steps.append((name, t0 - t_start, time.perf_counter() - t0, time.thread_time() - c0))
    setattr(_compile, name, step)

for name in ("_compile_elsewhere", "_load"):  # looked up when called: the background thread runs these
    timed(name)
ready_kernel = _compile.ready_kernel
def counted(kernel, *a, **k):
    try:
        return ready_kernel(kernel, *a, **k)
    except _compile.KernelNotReady:
        not_ready[getattr(kernel, "__name__", "?")] += 1
        raise
import torch_side._launch
torch_side._launch.ready_kernel = counted

def load():
    t0 = time.perf_counter()
    jax.block_until_ready(qbridge.load_checkpoint(path, device="cuda", progress=False))
    return time.perf_counter() - t0

t0 = time.perf_counter()
print(f"imports {t0 - t_start:.2f} s")
if mode == "busy":
    i = 0
    while True:
        not_ready.clear()
        s = load()
        print(f"load {i}: {s * 1e3:.1f} ms, weights whose kernel was not ready: {sum(not_ready.values())}"
              " (calls made while Triton itself was imported not counted)")  # fmt: skip
        i += 1
        # the first calls may not reach a kernel at all (Triton itself is being imported): done when one is
        # ready and a whole load used it
        if (_compile._READY and not not_ready) or i >= 400:
            break
    print(f"kernel ready by {time.perf_counter() - t0:.3f} s after the imports")
elif mode == "idle":
    print(f"first load {load():.3f} s")
    while not _compile._READY and time.perf_counter() - t0 < 300:
        time.sleep(0.001)
    print(f"kernel ready {time.perf_counter() - t0:.3f} s after the imports" if _compile._READY
          else "no kernel ready after 300 s (a failed background compile: see the log at debug level)")
else:
    load()
    torch_side.wait_for_kernels()
    print(f"kernel ready {time.perf_counter() - t0:.3f} s after the imports")
    ts = [load() for _ in range(loads)]
    print(f"STEADY median {statistics.median(ts[2:]) * 1e3:.1f} ms, min {min(ts) * 1e3:.1f} ms")
for name, at, wall, cpu in steps:
    print(f"  {name:20s} at {at:.3f} s: {wall * 1e3:.1f} ms, of it {cpu * 1e3:.1f} ms of its thread's CPU")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", nargs="+", choices=("busy", "idle", "steady"), default=["busy", "steady"])
    parser.add_argument("--layers", type=int, default=4, help="NF4 decoder layers (default 4)")
    parser.add_argument("--loads", type=int, default=14, help="loads in a steady process (default 14)")
    args = parser.parse_args()
    if args.loads < 3:
        parser.error("--loads must be at least 3 (the first two are left out)")
    import torch

    if not torch.cuda.is_available():
        parser.error("torch sees no CUDA GPU here: this measures the GPU kernels' readiness")
    here = pathlib.Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    import fresh_process_raw_route as raw_route

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="qbridge-ready-") as tmp:
        raw_route.write_checkpoint(pathlib.Path(tmp), args.layers, 1, "cuda")
        for mode in args.mode:
            print(f"== {mode}", flush=True)
            done = subprocess.run(
                [sys.executable, "-c", CHILD, tmp, mode, str(args.loads)],
                cwd=here.parent, capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            print(done.stdout.rstrip(), flush=True)
            if done.returncode:
                raise RuntimeError(f"the {mode} process failed: {done.stderr.strip()[-2000:]}")


if __name__ == "__main__":
    main()
