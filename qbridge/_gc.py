"""Python's garbage collector during a load: its collections of the older generations deferred.

Each collection of Python's oldest generation traverses every object the collector tracks in the process:
the caller's own heap (torch, JAX and transformers imported: about 240,000 objects) and the load's entries,
plan and results, which grow with the checkpoint. At DeepSeek-V3's tensor count (95,038 tensors, the tiny
layout of ``benchmarks/loader_gc.py``) those collections took about 15 % of a whole load on a 2-core CPU
machine (``benchmarks/RESULTS.md``). :func:`older_generations_deferred` raises the thresholds of the two
older generations while a load runs; the youngest generation is collected at its usual pace, so short-lived
reference cycles still go promptly.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

FACTOR = 10  # the older generations' thresholds are multiplied by this during a load (1: left alone)

_lock = threading.Lock()
_depth = 0  # loads running now, in any thread
_saved: tuple[int, ...] = ()  # the thresholds before the first of them
_raised: tuple[int, ...] = ()  # the thresholds set for them


@contextlib.contextmanager
def older_generations_deferred() -> Iterator[None]:
    """Inside, ``gc.get_threshold()`` is the caller's with its second and third values multiplied by
    :data:`FACTOR`; the caller's thresholds come back when the last of the loads running in any thread
    leaves (an exception included), unless the thresholds were changed meanwhile (that change is kept)."""
    global _depth, _saved, _raised
    with _lock:
        if _depth == 0:
            _saved = gc.get_threshold()
            first, *older = _saved
            _raised = (first, *(t * FACTOR for t in older))
            gc.set_threshold(*_raised)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and gc.get_threshold() == _raised:
                gc.set_threshold(*_saved)
