"""A checkpoint's stored bytes from the page cache to GPU memory: the loader's route against two others.

Writes the NF4 checkpoint of ``in_process_ab.py`` (``--layers`` Llama-3-8B decoder layers), reads it once into
the page cache, then, ``--rounds`` times with the routes alternating, moves every tensor's bytes to one device
buffer and times it (wall time until the device has them):

- ``region``: the loader's route: reading threads (8) read each tensor whole into one page-locked region with
  positioned reads; the calling thread waits for each tensor in order and queues its host-to-device copy.
- ``ring C``: each reading thread reads a part of at most C MiB into one of its two page-locked buffers and
  queues that part's copy to the device on a stream of its own; a buffer is read into again once its last
  copy has finished. Nothing waits for a whole tensor.
- ``ring 8 MiB x4, blocking`` / ``one stream``: four buffers per thread, events that block instead of
  spinning, and all threads' copies on one stream.
- ``qbridge``: ``qbridge.load_checkpoint`` itself, to ready arrays (decode and handoff included), with its
  kernels ready.

Beside them the floor as ``in_process_ab.py`` measures it: the slower of an 8-thread page-cache read (4 MiB
at a time) and pinned host-to-device copies.

    python benchmarks/read_to_device.py [--layers 4] [--rounds 7] [--out results.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time

import torch

THREADS = 8


def tensor_ranges(path: pathlib.Path) -> list[tuple[int, int]]:
    """(file offset, bytes) of every tensor in a safetensors file, in file order."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    base = 8 + n
    spans = sorted(
        (base + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
        for k, v in header.items()
        if k != "__metadata__"
    )
    return [(o, s) for o, s in spans if s]


def region_route(fd: int, ranges: list[tuple[int, int]], host: torch.Tensor, dev: torch.Tensor, pool) -> None:
    raw = memoryview(host.numpy()).cast("B")
    dests, at = [], 0
    for _, size in ranges:
        dests.append(at)
        at += -(-size // 4096) * 4096

    def read(i: int) -> None:
        offset, size = ranges[i]
        done = 0
        while done < size:
            got = os.preadv(fd, [raw[dests[i] + done : dests[i] + size]], offset + done)
            if not got:
                raise EOFError
            done += got

    futures = [pool.submit(read, i) for i in range(len(ranges))]
    for i, fut in enumerate(futures):
        fut.result()
        d, size = dests[i], ranges[i][1]
        dev[d : d + size].copy_(host[d : d + size], non_blocking=True)
    torch.cuda.synchronize()


class _Ring(threading.local):
    """Per reading thread: (part, buffers, one stream) -> that variant's buffers, events, stream, turn."""

    def __init__(self) -> None:
        self.variants: dict[tuple[int, int, bool], dict] = {}


_SHARED: dict[str, torch.cuda.Stream] = {}


def ring_route(
    fd: int,
    ranges: list[tuple[int, int]],
    dev: torch.Tensor,
    pool,
    part: int,
    ring: _Ring,
    *,
    buffers: int = 2,
    blocking: bool = False,
    shared_stream: bool = False,
) -> None:
    jobs, at = [], 0
    for offset, size in ranges:
        for a in range(0, size, part):
            jobs.append((offset + a, at + a, min(part, size - a)))
        at += -(-size // 4096) * 4096

    def run(job: tuple[int, int, int]) -> None:
        offset, d, size = job
        # one ring per variant and thread, kept across rounds (its pinned buffers made in the first)
        mine = ring.variants
        state = mine.get((part, buffers, shared_stream))
        if state is None:
            state = mine[(part, buffers, shared_stream)] = {
                "bufs": [torch.empty(part, dtype=torch.uint8, pin_memory=True) for _ in range(buffers)],
                "events": [None] * buffers,
                "stream": _SHARED.setdefault("s", torch.cuda.Stream())
                if shared_stream
                else torch.cuda.Stream(),
                "turn": 0,
            }
        k = state["turn"]
        state["turn"] = (k + 1) % buffers
        if state["events"][k] is not None:
            state["events"][k].synchronize()
        buf = state["bufs"][k]
        raw = memoryview(buf.numpy()).cast("B")
        done = 0
        while done < size:
            got = os.preadv(fd, [raw[done:size]], offset + done)
            if not got:
                raise EOFError
            done += got
        with torch.cuda.stream(state["stream"]):
            dev[d : d + size].copy_(buf[:size], non_blocking=True)
            ev = torch.cuda.Event(blocking=blocking)
            ev.record(state["stream"])
        state["events"][k] = ev

    for fut in [pool.submit(run, j) for j in jobs]:
        fut.result()
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--parts", type=int, nargs="+", default=[4, 8, 16], help="ring part sizes in MiB")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    here = pathlib.Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    import deepseek_v3_scale as ds
    import fresh_process_raw_route as raw_route
    import jax

    import qbridge
    import torch_side

    with tempfile.TemporaryDirectory(prefix="qbridge-read-") as tmp:
        ckpt = pathlib.Path(tmp)
        raw_route.write_checkpoint(ckpt, args.layers, 1, "cuda")
        file = ckpt / "model.safetensors"
        ranges = tensor_ranges(file)
        total = sum(s for _, s in ranges)
        span = sum(-(-s // 4096) * 4096 for _, s in ranges)
        ds.read_bandwidth([file], 8, 4 << 20)
        read8 = ds.read_bandwidth([file], 8, 4 << 20)
        copy = ds.pinned_copy_bandwidth()
        floor = file.stat().st_size / min(read8, copy)
        print(
            f"{len(ranges)} tensors, {total / 1e9:.3f} GB; floor {floor * 1e3:.1f} ms (page cache "
            f"{read8 / 1e9:.1f} GB/s with 8 threads, pinned copies {copy / 1e9:.1f} GB/s)",
            flush=True,
        )
        host = torch.empty(span, dtype=torch.uint8, pin_memory=True)
        host.fill_(1)
        dev = torch.empty(span, dtype=torch.uint8, device="cuda")
        pool = concurrent.futures.ThreadPoolExecutor(THREADS)
        ring = _Ring()
        jax.block_until_ready(qbridge.load_checkpoint(str(ckpt), device="cuda", progress=False))
        torch_side.wait_for_kernels()
        fd = os.open(file, os.O_RDONLY)
        routes = {"region": lambda: region_route(fd, ranges, host, dev, pool)}
        for p in args.parts:
            routes[f"ring {p} MiB"] = lambda p=p: ring_route(fd, ranges, dev, pool, p << 20, ring)
        routes["ring 8 MiB x4, blocking"] = lambda: ring_route(
            fd, ranges, dev, pool, 8 << 20, ring, buffers=4, blocking=True
        )
        routes["ring 8 MiB x4, one stream"] = lambda: ring_route(
            fd, ranges, dev, pool, 8 << 20, ring, buffers=4, blocking=True, shared_stream=True
        )
        routes["qbridge"] = lambda: jax.block_until_ready(
            qbridge.load_checkpoint(str(ckpt), device="cuda", progress=False)
        )
        times: dict[str, list[float]] = {name: [] for name in routes}
        for r in range(args.rounds + 1):
            for name, fn in routes.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if r:  # the first round warms each route up
                    times[name].append(dt)
        check = torch.empty(span, dtype=torch.uint8)
        region_route(fd, ranges, host, dev, pool)
        want = dev.cpu()
        ring_route(fd, ranges, dev, pool, args.parts[0] << 20, ring)
        check.copy_(dev)
        assert torch.equal(check, want), "the ring route moved other bytes than the region route"
        rows = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            rows[name] = {"median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3}
            print(
                f"{name:24s} {med * 1e3:7.1f} ms [{min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}]  "
                f"{total / med / 1e9:5.1f} GB/s  {med / floor:.2f}x the floor",
                flush=True,
            )
        result = {
            "card": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "jax": jax.__version__,
            "tensors": len(ranges),
            "bytes": total,
            "floor_ms": floor * 1e3,
            "read8_GBps": read8 / 1e9,
            "pinned_copy_GBps": copy / 1e9,
            "routes": rows,
        }
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
