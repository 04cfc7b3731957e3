"""Pinned host staging, the pipeline's second stage: during a GPU load the loader's reading threads copy the
next weights' stored bytes into page-locked host memory, from which their host-to-device copies run
asynchronously while the host goes on.

Page-locking memory through the CUDA runtime's allocator (``cudaHostAlloc``, which torch's
``pin_memory=True`` calls) ran at about 2 GB/s on an H200 host: 0.55 s for the loader's 1 GiB window, paid
by the first load of every process, on its critical path. This module locks one region per process
instead: anonymous memory, on transparent huge pages where the kernel offers them, first touched by several
threads, then registered with ``cudaHostRegister``: 0.07 s per GiB on the same host
(``benchmarks/RESULTS.md``). The region is carved into blocks for the reading threads; a block comes back
once the device has finished copying out of it (a CUDA event recorded on the stream of the copy), and a
reader asking for more than is free waits for the oldest such copy. When the region cannot be made, or has
no room for a block, the caller allocates pinned memory through torch as before.

The region lives as long as the process (as torch's cache of pinned memory does) and is sized by the first
GPU load that asks for it: twice ``qbridge._loader.READ_AHEAD_BYTES``, the weights read ahead and those
waiting for their groups (``qbridge._group``).
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import mmap
import os
import threading
from typing import Any

import numpy as np
import torch

log = logging.getLogger("qbridge")

ALIGN = 1 << 12  # every block starts on a page
TOUCH_THREADS = 8  # threads faulting the region's pages in before it is registered
_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, so for every GPU


class Block:
    """``nbytes`` bytes of a :class:`Region` at ``offset``, held by one reader until given back."""

    __slots__ = ("given_back", "nbytes", "offset", "region")

    def __init__(self, region: Region, offset: int, nbytes: int) -> None:
        self.region, self.offset, self.nbytes = region, offset, nbytes
        self.given_back = False

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The block's memory as a CPU tensor of ``dtype`` and ``shape`` (its first bytes; aliases the block)."""
        n = math.prod(shape) * dtype.itemsize
        return self.region.memory[self.offset : self.offset + n].view(dtype).view(shape)

    def give_back(self, after: torch.cuda.Event | None = None) -> None:
        """Returns the block: at once, or, with ``after``, once that event has completed (a copy out of it)."""
        self.region.give_back(self, after)


class Region:
    """Page-locked host memory of ``nbytes`` (rounded up to a page), handed out in blocks.

    ``register=False`` leaves it pageable (the bookkeeping alone, for machines without a GPU).

    Raises:
        OSError: the memory could not be mapped, or CUDA refused to register it.
    """

    def __init__(self, nbytes: int, *, register: bool = True) -> None:
        nbytes = _pages(nbytes)
        self.nbytes = nbytes
        self._map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        huge = getattr(mmap, "MADV_HUGEPAGE", None)
        if huge is not None:
            try:
                self._map.madvise(huge)  # 2 MiB pages: far fewer to fault in and to lock
            except OSError:
                pass
        raw = np.frombuffer(self._map, dtype=np.uint8)
        _touch(raw)
        if register:
            err = torch.cuda.cudart().cudaHostRegister(raw.ctypes.data, nbytes, _HOST_REGISTER_PORTABLE)
            if int(err) != 0:
                raise OSError(f"cudaHostRegister of {nbytes} bytes failed: {err}")
        self.memory = torch.frombuffer(self._map, dtype=torch.uint8)
        self._free: list[tuple[int, int]] = [(0, nbytes)]  # (offset, length), sorted, never adjacent
        self._returning: collections.deque[tuple[Any, Block]] = collections.deque()  # (event, block)
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Block | None:
        """A block of at least ``nbytes``; waits for copies out of returned blocks while none is free and
        some are on their way back. None when the blocks in use leave no room."""
        size = _pages(nbytes)
        while True:
            with self._lock:
                self._reclaim()
                coming = sum(block.nbytes for _, block in self._returning)
                if size > sum(length for _, length in self._free) + coming:
                    return None  # waiting for every copy would not make room
                for i, (offset, length) in enumerate(self._free):
                    if length >= size:
                        if length == size:
                            del self._free[i]
                        else:
                            self._free[i] = (offset + size, length - size)
                        return Block(self, offset, size)
                if not self._returning:
                    return None
                event = self._returning[0][0]
            event.synchronize()  # the oldest copy out of the region (the GIL is released meanwhile)

    def give_back(self, block: Block, after: Any = None) -> None:
        """Takes ``block`` back: at once, or once the event ``after`` has completed.

        Raises:
            ValueError: the block is another region's, or was given back already.
        """
        with self._lock:
            if block.region is not self or block.given_back:
                raise ValueError(
                    f"block at {block.offset} of {block.nbytes} bytes: given back already, or not this region's"
                )
            block.given_back = True
            if after is None:
                self._release(block)
            else:
                self._returning.append((after, block))

    def free_bytes(self) -> int:
        """Bytes free now (blocks whose copies are still running not counted)."""
        with self._lock:
            self._reclaim()
            return sum(length for _, length in self._free)

    def _reclaim(self) -> None:
        while self._returning and self._returning[0][0].query():
            self._release(self._returning.popleft()[1])

    def _release(self, block: Block) -> None:
        start, end = block.offset, block.offset + block.nbytes
        i = bisect.bisect_left(self._free, (start, 0))
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:  # joins the range before it
            i -= 1
            start = self._free[i][0]
            del self._free[i]
        if i < len(self._free) and self._free[i][0] == end:  # and the range after it
            end += self._free[i][1]
            del self._free[i]
        self._free.insert(i, (start, end - start))


def _pages(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages, one at least."""
    return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)


def _touch(raw: np.ndarray) -> None:
    """Faults every page of ``raw`` in, in several threads (numpy releases the GIL while it fills)."""
    parts = max(1, min(TOUCH_THREADS, os.cpu_count() or 1))
    step = -(-raw.size // parts // ALIGN) * ALIGN
    threads = [
        threading.Thread(target=raw[i : i + step].fill, args=(0,), name="qbridge-pin")
        for i in range(0, raw.size, step)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


_region: Region | None = None
_started = False
_made = threading.Event()
_making = threading.Lock()


def prepare(nbytes: int) -> None:
    """Starts making the process's region of ``nbytes`` in a background thread, once per process (a later
    call with another size keeps the first region): :func:`take` waits for it."""
    global _started
    with _making:
        if _started:
            return
        _started = True
    threading.Thread(target=_make, args=(nbytes,), name="qbridge-pin", daemon=True).start()


def _make(nbytes: int) -> None:
    global _region
    try:
        _region = Region(nbytes)
    except Exception as e:  # no CUDA runtime, no memory, no anonymous maps here: torch pins, as before
        log.debug("pinned staging region of %d bytes not made, so torch pins each weight: %s", nbytes, e)
    finally:
        _made.set()


def take(nbytes: int) -> Block | None:
    """A block of the process's region (made by :func:`prepare`), or None: none prepared, none could be made
    (for the rest of the process), or no room in it."""
    if not _started:
        return None
    _made.wait()
    return _region.take(nbytes) if _region is not None else None


def _after_fork() -> None:
    """A forked child has its parent's pages copied, not registered, and no thread making them."""
    global _region, _started, _made, _making
    _region, _started = None, False
    _made, _making = threading.Event(), threading.Lock()


os.register_at_fork(after_in_child=_after_fork)
