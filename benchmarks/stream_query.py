"""What ``to_jax``'s default ``producer="auto"`` pays to ask torch's streams whether they are busy (GPU machine).

``to_jax(t)`` asks every stream torch hands out on ``t``'s device (the default stream and the stream pools:
129 on a CUDA device) whether it is still running work, so that a tensor written on another stream is
handed over only after it; ``RESULTS.md`` records that at about 4x a bare ``jax.dlpack.from_dlpack``. This
benchmark splits that cost and times cheaper ways to ask the same question, in one process:

- ``torch query``: the scan as ``qbridge._handoff`` made it until 2026-12-04 (torch's ``Stream.query`` per
  stream, in a list comprehension);
- ``torch all(map)``: the scan as it makes it now (``all(map(Stream.query, streams))``: no Python bytecode
  per stream when none is busy);
- ``driver ctypes``: ``cuStreamQuery`` per stream through ctypes;
- ``driver C loop``: one call of torch_side's library's loop (``kernels/stream_scan.c``) over every
  stream's handle, calling ``cuStreamQuery`` for each (until 2026-12-04 a loop compiled here that listed
  every busy stream: the same calls when none is busy);
- ``qbridge scan``: the scan ``to_jax`` makes now, once torch_side's library is loaded (its C loop over the
  driver's ``cuStreamQuery`` for the pool streams, torch's query for the default stream);
- beside them, per tensor: ``to_jax(t)`` (one call of the library scans and orders JAX's stream after
  torch's current one), ``to_jax(t)`` with the C scan and torch's ``__dlpack__`` ordering the streams (as
  before 2026-12-05), ``to_jax(t)`` with the scan through torch's queries (as before the C scan, or before
  the library is loaded), ``to_jax(t, producer="current")`` both ways, and bare ``from_dlpack``.

Each way is first checked to find the one stream made busy on purpose (``torch.cuda._sleep``) and no other.
Medians of 15 rounds of 200 calls, warm-up excluded, host time (no call here waits for the GPU).

    python benchmarks/stream_query.py
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import time

import jax
import torch

import qbridge
from qbridge import _handoff
from qbridge._env import jax_gpu_for
from torch_side import _native


def per_call_us(fn, calls: int = 200, rounds: int = 15) -> float:
    for _ in range(50):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times) * 1e6


def main() -> None:
    dev = torch.device("cuda", 0)
    torch.cuda.init()
    streams = _handoff._torch_streams(0)
    handles = [s.cuda_stream for s in streams]
    n = len(handles)
    query = _handoff._query
    driver = ctypes.CDLL("libcuda.so.1")
    driver.cuStreamQuery.argtypes = [ctypes.c_void_p]
    array = (ctypes.c_void_p * n)(*handles)
    scan = _native.stream_scan(wait=True)
    assert scan is not None, "torch_side's library (the C scan) could not be built"
    driver_query = _handoff._driver_query()

    def c_loop() -> list[int]:  # the first busy stream, as a list like the other ways' answers
        first = scan(driver_query, array, n)
        return [] if first < 0 else [first]

    others = _handoff._Others(streams)  # the scan of to_jax("auto"), over the same streams
    ways = {
        "torch query": lambda: [i for i, s in enumerate(streams) if not query(s)],
        # qbridge's scan before the C loop, and its fallback: no Python per stream when nothing is busy
        "torch all(map)": lambda: (
            [] if all(map(query, streams)) else [i for i, s in enumerate(streams) if not query(s)]
        ),
        "driver ctypes": lambda: [i for i, h in enumerate(handles) if driver.cuStreamQuery(h) != 0],
        "driver C loop": c_loop,
        "qbridge scan": lambda: [] if others.idle(0) else [i for i, s in enumerate(streams) if not query(s)],
    }
    # each way finds the one busy stream, and no other
    target = 1 + n // 2
    torch.cuda.synchronize()
    with torch.cuda.stream(streams[target]):
        torch.cuda._sleep(2_000_000_000 // 1000 * 200)  # some 0.1 s of spinning on the GPU
    for name, way in ways.items():
        found = way()
        assert found == [target], (name, found)
    torch.cuda.synchronize()
    for name, way in ways.items():
        assert way() == [], name

    t = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    kept: list = []

    def bare() -> None:
        kept.append(jax.dlpack.from_dlpack(t))

    def auto() -> None:
        kept.append(qbridge.to_jax(t))

    def current() -> None:
        kept.append(qbridge.to_jax(t, producer="current"))

    def auto_torch_scan() -> None:
        saved, _native._SCAN, saved_order, _native._ORDER = _native._SCAN, None, _native._ORDER, None
        try:
            kept.append(qbridge.to_jax(t))
        finally:
            _native._SCAN, _native._ORDER = saved, saved_order

    def through_dlpack(fn):  # the C scan, then torch's __dlpack__ orders JAX's stream (before 2026-12-05)
        def run() -> None:
            saved, _native._ORDER = _native._ORDER, None
            try:
                fn()
            finally:
                _native._ORDER = saved

        return run

    assert _native.stream_order(wait=True) is not None
    kept.append(qbridge.to_jax(t))
    assert _handoff._export_ordered(t, jax_gpu_for(0), 0, "auto") is not None, "not taken"

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, jax {jax.__version__}, {n} streams")
    for _ in range(3):
        row = {name: per_call_us(way) for name, way in ways.items()}
        for name, fn in (
            ("from_dlpack", bare),
            ("to_jax auto", auto),
            ("to_jax auto, __dlpack__", through_dlpack(auto)),
            ("to_jax auto, torch queries", auto_torch_scan),
            ("to_jax current", current),
            ("to_jax current, __dlpack__", through_dlpack(current)),
        ):
            row[name] = per_call_us(fn, calls=100, rounds=9)
            kept.clear()
        print(
            " | ".join(f"{k} {v:.1f} us" for k, v in row.items()),
            f"| per stream: torch {row['torch query'] / n:.2f}, C loop {row['driver C loop'] / n:.2f} us",
            f"| to_jax auto / bare {row['to_jax auto'] / row['from_dlpack']:.2f}x",
            f"(C scan + __dlpack__ {row['to_jax auto, __dlpack__'] / row['from_dlpack']:.2f}x,",
            f"torch queries {row['to_jax auto, torch queries'] / row['from_dlpack']:.2f}x),",
            f"current / bare {row['to_jax current'] / row['from_dlpack']:.2f}x",
            f"(__dlpack__ {row['to_jax current, __dlpack__'] / row['from_dlpack']:.2f}x)",
            flush=True,
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
