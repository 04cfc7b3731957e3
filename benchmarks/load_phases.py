"""The NF4 checkpoint's steady in-process load split into its two phases: reading, and the loading loop.

Writes the NF4 checkpoint of ``in_process_ab.py`` (``--layers`` Llama-3-8B decoder layers), loads it once and
waits for the kernels, then alternates, ``--rounds`` times (the first two left out):

- ``normal``: ``qbridge.load_checkpoint`` as users call it (the reads run beside the loop);
- ``preread``: the same load, with every read ahead started at once and waited for before the loop's first
  weight: its **read phase** (8 reading threads, whole tensors into the pinned region) and its **loop
  phase** (copies to the device, decode, handoff, the small pieces; the reads done) timed apart;
- ``normal, pieces one by one`` and ``preread, pieces one by one``: the same with ``Checkpoint.stage_small``
  turned off (each weight's scales and tables read and copied on their own, as before it), the preread's two
  phases timed apart too;
- ``normal, decoded then copied`` and ``preread, decoded then copied``: the same with each 4-bit weight decoded
  into a torch tensor of its own, then copied into its array (the route before 4-bit weights were decoded
  straight into the arrays XLA allocated);
- ``switch X``: the normal load under ``sys.setswitchinterval(X)`` (how often a thread waiting for the GIL
  takes it);
- ``normal, N reading threads`` and ``preread, N reading threads``: the normal and preread loads with N
  threads reading ahead instead of ``qbridge._checkpoint.READ_THREADS`` (each setting's threads started
  once, before the rounds).

Then the peak of torch's GPU memory during one ``normal`` load and one ``normal, decoded then copied``, above
what the process held before it. Each route's median is also printed over the floor measured in the same process after the loads, as
``in_process_ab.py`` measures it: the file's size over the slower of an 8-thread page-cache read and a pinned
host-to-device copy.

    python benchmarks/load_phases.py [--layers 4] [--rounds 10]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import pathlib
import statistics
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (the first two are left out)")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import fresh_process_raw_route as raw_route
    import jax
    import torch

    import qbridge
    import torch_side
    from qbridge import _checkpoint, _loader

    with tempfile.TemporaryDirectory(prefix="qbridge-phases-") as tmp:
        ckpt = pathlib.Path(tmp)
        raw_route.write_checkpoint(ckpt, args.layers, 1, "cuda")

        def load() -> None:
            jax.block_until_ready(qbridge.load_checkpoint(str(ckpt), device="cuda", progress=False))

        load()
        torch_side.wait_for_kernels()
        advance = _loader._ReadAhead.advance
        marks: dict[str, list[float]] = {
            "read phase": [],
            "loop phase": [],
            "read phase, pieces one by one": [],
            "loop phase, pieces one by one": [],
            "read phase, decoded then copied": [],
            "loop phase, decoded then copied": [],
        }
        stage_small = _checkpoint._Source.stage_small

        def read_all_first(self, i: int) -> None:
            if i:
                return advance(self, i)
            window = _loader.READ_AHEAD_BYTES
            _loader.READ_AHEAD_BYTES = 1 << 62
            try:
                advance(self, 0)
            finally:
                _loader.READ_AHEAD_BYTES = window
            concurrent.futures.wait(list(self.ckpt.source._ahead.values()))
            marks["read done"] = [time.perf_counter()]

        written_by_kernel = _loader.written_by_kernel

        def preread(staged: bool = True, copied: bool = False, label: str = "") -> None:
            _loader._ReadAhead.advance = read_all_first
            if not staged:
                _checkpoint._Source.stage_small = lambda self, keys, device: 0
            if copied:
                _loader.written_by_kernel = lambda entry, rule: None
            try:
                t0 = time.perf_counter()
                load()
                t1 = time.perf_counter()
            finally:
                _loader._ReadAhead.advance = advance
                _checkpoint._Source.stage_small = stage_small
                _loader.written_by_kernel = written_by_kernel
            suffix = (
                ("" if staged else ", pieces one by one")
                + (", decoded then copied" if copied else "")
                + label
            )
            marks.setdefault("read phase" + suffix, []).append(marks["read done"][0] - t0)
            marks.setdefault("loop phase" + suffix, []).append(t1 - marks["read done"][0])

        def copied() -> None:
            _loader.written_by_kernel = lambda entry, rule: None
            try:
                load()
            finally:
                _loader.written_by_kernel = written_by_kernel

        def unstaged() -> None:
            _checkpoint._Source.stage_small = lambda self, keys, device: 0
            try:
                load()
            finally:
                _checkpoint._Source.stage_small = stage_small

        def switch(seconds: float):
            def run() -> None:
                before = sys.getswitchinterval()
                sys.setswitchinterval(seconds)
                try:
                    load()
                finally:
                    sys.setswitchinterval(before)

            return run

        pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}

        def readers(n: int, fn):
            if n not in pools:
                pools[n] = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="qbridge-read")

            def run() -> None:
                before = _checkpoint._readers("read")
                _checkpoint._pools["read"] = pools[n]
                try:
                    fn()
                finally:
                    _checkpoint._pools["read"] = before

            return run

        routes = {
            "normal": load,
            "normal, pieces one by one": unstaged,
            "preread": preread,
            "preread, pieces one by one": lambda: preread(False),
            "normal, decoded then copied": copied,
            "preread, decoded then copied": lambda: preread(copied=True),
        }
        routes.update({f"switch {s * 1e3:g} ms": switch(s) for s in (1e-4, 5e-4, 2e-2)})
        for n in (12, 16):
            routes[f"normal, {n} reading threads"] = readers(n, load)
            routes[f"preread, {n} reading threads"] = readers(
                n, functools.partial(preread, label=f", {n} reading threads")
            )
        times: dict[str, list[float]] = {name: [] for name in routes}
        for r in range(args.rounds):
            for name, fn in routes.items():
                t0 = time.perf_counter()
                fn()
                if r >= 2:
                    times[name].append(time.perf_counter() - t0)
        # peak torch GPU memory of one load above what the process held before it (the results are XLA's)
        peaks = {}
        for name in ("normal", "normal, decoded then copied"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            routes[name]()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() - start
        # the floor as in_process_ab.py measures it, here in the loading process after its loads
        import deepseek_v3_scale as ds

        file = ckpt / "model.safetensors"
        read8 = ds.read_bandwidth([file], 8, 4 << 20)
        more = {n: ds.read_bandwidth([file], n, 4 << 20) for n in (12, 16)}  # the floor's read, more threads
        copy = ds.pinned_copy_bandwidth()
        floor = file.stat().st_size / min(read8, copy)
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, jax {jax.__version__}")
        print(
            f"NF4 checkpoint {file.stat().st_size / 1e9:.3f} GB: floor {floor * 1e3:.1f} ms (page cache "
            f"{read8 / 1e9:.1f} GB/s with 8 threads, pinned copies {copy / 1e9:.1f} GB/s; in this process, "
            "after its loads)"
        )
        print(
            "page cache read with " + ", ".join(f"{n} threads: {bw / 1e9:.1f} GB/s" for n, bw in more.items())
        )
        print(", ".join(f"{name}: peak torch memory {peak / 1e6:.1f} MB" for name, peak in peaks.items()))
        for name, ts in {**times, **{k: v[2:] for k, v in marks.items() if k != "read done"}}.items():
            median = statistics.median(ts)
            print(
                f"{name:16s} median {median * 1e3:6.1f} ms [{min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}]"
                f"  {median / floor:.2f}x the floor"
            )


if __name__ == "__main__":
    main()
