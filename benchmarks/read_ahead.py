"""The loader's read-ahead: a checkpoint's large tensors read by its background threads into host memory.

Writes a safetensors file of ``--tensors`` uint8 tensors of 7168x4096 (28 MiB, a Llama-3-8B MLP weight's NF4
bytes), reads it once into the page cache, then times ``Checkpoint.read_ahead`` of every tensor followed by
``read`` of each (pageable memory, as a CPU load reads; ``--pin``: pinned memory, as a GPU load reads),
median of ``--rounds`` (the first left out). Also one thread's rate for one tensor: a positioned read into
host memory against a copy from a map of the file.

    python benchmarks/read_ahead.py [--tensors 16] [--rounds 7]
"""

from __future__ import annotations

import argparse
import mmap
import os
import pathlib
import platform
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=16, help="28 MiB tensors in the file (default 16)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds, the first left out (default 7)")
    parser.add_argument(
        "--pin", action="store_true", help="read into pinned memory, as a GPU load does (CUDA)"
    )
    args = parser.parse_args()
    if args.tensors < 1 or args.rounds < 2:
        parser.error("--tensors must be at least 1 and --rounds at least 2 (the first round is left out)")
    if args.pin and not torch.cuda.is_available():
        parser.error("--pin reads into pinned memory, for copies to a CUDA GPU, and torch sees none here")
    from safetensors.torch import save_file

    from qbridge._checkpoint import READ_THREADS, open_checkpoint

    shape = (7168, 4096)
    size = shape[0] * shape[1]
    print(
        f"{platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; {READ_THREADS} reading threads"
    )
    with tempfile.TemporaryDirectory(prefix="qbridge-read-ahead-") as tmp:
        path = pathlib.Path(tmp) / "model.safetensors"
        gen = torch.Generator().manual_seed(0)
        save_file({f"w{i}.weight": torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
                   for i in range(args.tensors)}, path)  # fmt: skip
        path.read_bytes()  # into the page cache
        with open(path, "rb") as f:
            fd, out = f.fileno(), torch.empty(size, dtype=torch.uint8)
            out.fill_(0)
            offset = 8 + int.from_bytes(f.read(8), "little")  # the first tensor's bytes follow the header

            def mapped() -> None:
                start = offset - offset % mmap.ALLOCATIONGRANULARITY
                m = mmap.mmap(fd, offset - start + size, offset=start, access=mmap.ACCESS_COPY)
                t = torch.frombuffer(m, dtype=torch.uint8, count=size, offset=offset - start)
                out.copy_(t)
                del t
                m.close()

            def positioned() -> None:
                if os.preadv(fd, [out.numpy().data.cast("B")], offset) != size:
                    raise RuntimeError("short read")

            for label, fn in [("copy from a map of the file", mapped), ("positioned read", positioned)]:
                times = []
                for _ in range(21):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                print(
                    f"one thread, one 28 MiB tensor, {label}: {size / statistics.median(times[1:]) / 1e9:.2f} GB/s"
                )
        times = []
        for _ in range(args.rounds):
            with open_checkpoint(path) as ckpt:
                keys = sorted(ckpt.source.shapes)
                t0 = time.perf_counter()
                for key in keys:
                    ckpt.read_ahead(key, pin=args.pin)
                for key in keys:
                    ckpt.read(key)
                times.append(time.perf_counter() - t0)
        median = statistics.median(times[1:])
        print(f"read ahead and read, {args.tensors} x 28 MiB: {median * 1e3:.1f} ms "
              f"({args.tensors * size / median / 1e9:.2f} GB/s), median of {args.rounds - 1}")  # fmt: skip


if __name__ == "__main__":
    main()
