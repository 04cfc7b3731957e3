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
import os
import sys
import threading
from collections.abc import Iterator

FACTOR = 10  # the older generations' thresholds are multiplied by this during a load (1: left alone)
_INCREMENTAL = sys.version_info >= (3, 14)  # an incremental collector: the thresholds mean something else
_INT_MAX = 2**31 - 1  # gc.set_threshold takes C ints

_lock = threading.Lock()
_depth = 0  # loads running now, in any thread
_epoch = 0  # moves on in a forked child: loads entered before the fork leave the child's state alone
_saved: tuple[int, ...] = ()  # the thresholds before the first of them
_raised: tuple[int, ...] = ()  # the thresholds set for them


def _restore() -> None:
    """Each older generation's threshold that still holds its raised value gets the caller's back (a value
    changed meanwhile, by the caller or another thread, is kept)."""
    now = gc.get_threshold()
    gc.set_threshold(now[0], *(s if n == r else n for n, s, r in zip(now[1:], _saved[1:], _raised[1:])))


def _after_fork_in_child() -> None:  # the child has none of the parent's loading threads
    global _depth, _epoch, _lock
    _lock = threading.Lock()
    if _depth:
        _restore()
    _depth, _epoch = 0, _epoch + 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def older_generations_deferred() -> Iterator[None]:
    """Inside, ``gc.get_threshold()`` is the caller's with its second and third values multiplied by
    :data:`FACTOR` (at most ``2**31 - 1``); each comes back when the last of the loads running in any thread
    leaves (an exception included), unless it was changed meanwhile (that change is kept). A process forked
    during a load starts with the caller's thresholds."""
    global _depth, _saved, _raised
    if _INCREMENTAL:
        yield
        return
    epoch = None
    try:
        with _lock:
            _depth += 1
            epoch = _epoch
            if _depth == 1:
                _saved = gc.get_threshold()
                first, *older = _saved
                _raised = (first, *(min(t * FACTOR, _INT_MAX) for t in older))
                gc.set_threshold(*_raised)
        yield
    finally:
        if epoch is not None:
            with _lock:
                if epoch == _epoch:
                    _depth -= 1
                    if _depth == 0:
                        _restore()
