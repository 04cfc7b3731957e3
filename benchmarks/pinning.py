"""How fast host memory can be page-locked for host-to-device copies, by the routes a loader could take,
and how fast the device reads each: what ``qbridge/_staging.py`` chose its route by.

1. torch's ``pin_memory=True`` (``cudaHostAlloc`` through torch's cache of pinned memory): 64 blocks of
   16 MiB (a load's read-ahead window of one weight each), then the same again from torch's cache, then
   one block of 1 GiB;
2. anonymous memory (``mmap``), with or without transparent huge pages (``madvise(MADV_HUGEPAGE)``), first
   touched by 1 or 8 threads, then registered with ``cudaHostRegister``; and unregistering it;
3. torch's own registering mode (``PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,
   pinned_num_register_threads:8``), in a child process (the setting is read once per process);
4. host-to-device bandwidth out of 1 GiB of each kind (whole, and in 16 MiB copies), and 4 threads writing
   into it (the loader's reading threads).

    python benchmarks/pinning.py

Results: ``results/pinning-h200.txt``.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import threading
import time

import numpy as np
import torch

GiB = 1 << 30


def caching(n: int = GiB, chunk: int = 16 << 20) -> list[torch.Tensor]:
    return [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(n // chunk)]


def registered(n: int = GiB, *, huge: bool, threads: int, touch: bool = True) -> tuple[mmap.mmap, np.ndarray]:
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        m.madvise(mmap.MADV_HUGEPAGE)
    a = np.frombuffer(m, dtype=np.uint8)
    if touch:
        step = n // threads
        ts = [threading.Thread(target=a[i * step : (i + 1) * step].fill, args=(0,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    err = torch.cuda.cudart().cudaHostRegister(a.ctypes.data, n, 0)
    assert int(err) == 0, err
    return m, a


def timed(label: str, fn, *args, **kwargs):
    s = time.perf_counter()
    out = fn(*args, **kwargs)
    d = time.perf_counter() - s
    print(f"PIN {label:48s} {d:.3f} s ({GiB / d / 1e9:5.1f} GB/s)", flush=True)
    return out


def bandwidth(label: str, host: torch.Tensor, dev: torch.Tensor, src: np.ndarray) -> None:
    for _ in range(2):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    whole, chunks, writes = [], [], []
    for _ in range(5):
        s = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        whole.append(time.perf_counter() - s)
    for _ in range(3):
        s = time.perf_counter()
        for o in range(0, GiB, 16 << 20):
            dev[o : o + (16 << 20)].copy_(host[o : o + (16 << 20)], non_blocking=True)
        torch.cuda.synchronize()
        chunks.append(time.perf_counter() - s)
    hn, step = host.numpy(), GiB // 4
    for _ in range(3):
        s = time.perf_counter()
        ts = [threading.Thread(target=np.copyto, args=(hn[i * step : (i + 1) * step], src[i * step : (i + 1) * step]))
              for i in range(4)]  # fmt: skip
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        writes.append(time.perf_counter() - s)
    print(
        f"BW {label:32s} host-to-device {GiB / min(whole) / 1e9:5.1f} GB/s (median {GiB / sorted(whole)[2] / 1e9:5.1f}); "
        f"in 16 MiB copies {GiB / min(chunks) / 1e9:5.1f}; 4 threads writing {GiB / min(writes) / 1e9:5.1f} GB/s",
        flush=True,
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--torch-register":
        torch.empty(1, device="cuda")
        timed("torch host_register mode, 8 threads, 64 x 16 MiB", caching)
        timed("torch host_register mode, 8 threads, one 1 GiB", caching, chunk=GiB)
        return
    print("transparent huge pages:", open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip())
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    held = timed("torch pinned, 64 x 16 MiB", caching)
    del held
    held = timed("torch pinned, 64 x 16 MiB again (torch's cache)", caching)
    del held
    timed("torch pinned, one 1 GiB", caching, chunk=GiB)
    rt = torch.cuda.cudart()
    for huge in (True, False):
        for threads in (1, 8):
            m, a = timed(f"mmap, {'huge' if huge else '4 KiB'} pages, {threads} touching, register", registered,
                         huge=huge, threads=threads)  # fmt: skip
            s = time.perf_counter()
            rt.cudaHostUnregister(a.ctypes.data)
            print(f"    unregister {time.perf_counter() - s:.3f} s")
            del a
            m.close()
    m, a = timed("mmap, huge pages, untouched, register", registered, huge=True, threads=1, touch=False)
    rt.cudaHostUnregister(a.ctypes.data)
    del a
    m.close()
    env = dict(
        os.environ, PYTORCH_CUDA_ALLOC_CONF="pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
    )
    out = subprocess.run(
        [sys.executable, __file__, "--torch-register"], env=env, capture_output=True, text=True
    )
    print(
        "".join(line + "\n" for line in out.stdout.splitlines() if line.startswith("PIN")), end="", flush=True
    )

    dev = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    src = np.random.default_rng(0).integers(0, 255, GiB, dtype=np.uint8)
    pinned = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    bandwidth("torch pinned", pinned, dev, src)
    del pinned
    for huge in (True, False):
        m, a = registered(huge=huge, threads=8)
        bandwidth(f"registered, {'huge' if huge else '4 KiB'} pages", torch.from_numpy(a), dev, src)


if __name__ == "__main__":
    main()
