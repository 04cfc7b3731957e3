"""Python's garbage collector during a load: its collections of the older generations deferred.

Each collection of Python's oldest generation traverses every object the collector tracks in the process:
the caller's own heap (torch, JAX and qbridge imported: about 236,000 objects) and the load's entries, plan
and results, which grow with the checkpoint. At about DeepSeek-V3's tensor count (95,038 tensors: its 61
layers as MoE layers at tiny shapes, ``benchmarks/loader_gc.py``) those collections made a whole load on a
2-core CPU machine measurably slower (``benchmarks/RESULTS.md``). :func:`older_generations_deferred` raises
the thresholds of the two older generations while a load runs; the youngest generation is collected at its
usual pace, so short-lived reference cycles still go promptly. It leaves the collector alone on Python 3.14
and later, whose incremental collector gives the thresholds another meaning.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
from collections.abc import Iterator

FACTOR = 10  # the older generations' thresholds are multiplied by this during a load (1: left alone)
_INCREMENTAL = sys.version_info >= (3, 14)  # an incremental collector: the thresholds mean something else

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
    if _INCREMENTAL:
        yield
        return
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
