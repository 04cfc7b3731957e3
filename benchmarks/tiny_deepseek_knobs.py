"""The tiny DeepSeek-V3 layer's host work under settings that change its waits for the reading threads.

``deepseek_v3_scale.py --tiny`` (one MoE layer, 1558 tensors at tiny shapes: a load's wall time is its host
work) loaded again and again in one process on a GPU, after its kernels and allocation programs are ready,
five settings alternating, ``--rounds`` times (the first two left out):

- ``default``;
- ``reads one by one``: torch_side's library's ``qb_read_ranges`` left unused, so that a group's tensors are
  read from Python, one positioned read each (as before it was used), each giving the GIL up and taking it
  back;
- ``switch 0.5 ms``: ``sys.setswitchinterval`` (how soon a thread waiting for the GIL, a reading thread back
  from its read, takes it from the loading thread);
- ``gap 96 KiB``: ``qbridge._checkpoint._GAP_READ`` 96 KiB and ``_RUN_BYTES`` 32 MiB, so that a group's 256
  tiny float8 weights, which lie 64 KiB apart (the other projections' weights between them), are read with
  one positioned read instead of one each;
- ``dense one by one``: ``qbridge._place.HOST_PUT_BYTES`` 0, so that the small unquantized tensors (norms,
  the router's bias) are each read, copied to the GPU and handed over by itself (as before they were put
  together from the host).

Prints each setting's wall time per checkpoint tensor, median [range], and the calling thread's CPU time.
``--layers N`` writes N MoE layers (one file each, as DeepSeek-V3's checkpoint is sharded): a load's work per
tensor without the parts it does once per load.

    python benchmarks/tiny_deepseek_knobs.py [--rounds 12] [--layers 1]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--layers", type=int, default=1, help="MoE layers of the checkpoint (default 1)")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (the first two are left out)")
    if args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import deepseek_v3_scale
    import jax
    import torch

    import qbridge
    import torch_side
    from qbridge import _checkpoint, _place
    from qbridge._handoff import wait_for_allocators
    from torch_side import _native

    if not torch.cuda.is_available():
        parser.error("torch sees no CUDA GPU here: the loads this times are a GPU's")
    deepseek_v3_scale.use_tiny_shapes()
    gap, run, switch = _checkpoint._GAP_READ, _checkpoint._RUN_BYTES, sys.getswitchinterval()
    host = _place.HOST_PUT_BYTES

    read = _native.read_ranges(wait=True)
    if read is None:
        parser.error("torch_side's library did not load here (see the log): its reads are what this compares")

    def setting(name: str) -> None:
        sys.setswitchinterval({"switch 0.5 ms": 5e-4}.get(name, switch))
        _native._READ = None if name == "reads one by one" else read
        _checkpoint._GAP_READ, _checkpoint._RUN_BYTES = (
            (96 << 10, 32 << 20) if name == "gap 96 KiB" else (gap, run)
        )
        _place.HOST_PUT_BYTES = 0 if name == "dense one by one" else host

    with tempfile.TemporaryDirectory(prefix="qbridge-knobs-") as tmp:
        root = pathlib.Path(tmp)
        count, _ = deepseek_v3_scale.write_checkpoint(root, args.layers, 256, "cpu")

        def load() -> None:
            jax.block_until_ready(qbridge.load_checkpoint(root, device="cuda", progress=False))

        names = ["default", "reads one by one", "switch 0.5 ms", "gap 96 KiB", "dense one by one"]
        # each setting three times: what each asks XLA to compile is ready before the timed rounds
        for _ in range(3):
            for n in names:
                setting(n)
                load()
        setting("default")
        torch_side.wait_for_kernels()
        wait_for_allocators()
        for _ in range(3):
            load()
        wall: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        try:
            for r in range(args.rounds):
                for n in names:
                    setting(n)
                    t0, c0 = time.perf_counter(), time.thread_time()
                    load()
                    if r >= 2:
                        wall[n].append(time.perf_counter() - t0)
                        cpu[n].append(time.thread_time() - c0)
        finally:
            setting("default")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, jax {jax.__version__}; "
          f"{args.layers} layer(s), {count} tensors")  # fmt: skip
    for n in names:
        us = [t / count * 1e6 for t in wall[n]]
        print(f"{n:16s} wall {statistics.median(us):5.1f} us per tensor [{min(us):.1f}-{max(us):.1f}]"
              f"  calling thread CPU {statistics.median(cpu[n]) / count * 1e6:5.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
