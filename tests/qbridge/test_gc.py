"""During a load, Python's collections of its older generations are deferred (``qbridge._gc``): at
DeepSeek-V3's tensor count they took about 15 % of a load. The caller's thresholds come back afterwards,
whatever happens."""

from __future__ import annotations

import gc
import os
import threading
import warnings

import pytest

import qbridge
from qbridge import _gc


def _raised(thresholds):
    first, *older = thresholds
    return (first, *(t * _gc.FACTOR for t in older))


def test_older_generations_deferred_during_a_load_and_restored(dense_dir):
    before = gc.get_threshold()
    seen = []

    def record(name, shape):  # called for every leaf while the load runs
        seen.append(gc.get_threshold())

    qbridge.load_checkpoint(dense_dir, device="cpu", progress=False, sharding=record)
    assert seen and set(seen) == {_raised(before)}
    assert gc.get_threshold() == before


def test_restored_when_a_load_fails(dense_dir, tmp_path):
    before = gc.get_threshold()

    def fail(name, shape):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        qbridge.load_checkpoint(dense_dir, device="cpu", progress=False, sharding=fail)
    assert gc.get_threshold() == before
    with pytest.raises(qbridge.CheckpointError):
        qbridge.load_checkpoint(tmp_path / "nothing here", device="cpu", progress=False)
    assert gc.get_threshold() == before


def test_concurrent_loads_restore_once_the_last_ends(dense_dir):
    before = gc.get_threshold()
    both_inside = threading.Barrier(2, timeout=60)
    first_done = threading.Event()
    seen = {}

    def loader(i):
        def meet(name, shape):
            if i not in seen:
                both_inside.wait()  # both loads are running now
                seen[i] = gc.get_threshold()
                if i == 1:  # the second outlives the first: the first leaving must not restore
                    first_done.wait(timeout=60)
                    seen["after the first left"] = gc.get_threshold()

        qbridge.load_checkpoint(dense_dir, device="cpu", progress=False, sharding=meet)
        if i == 0:
            first_done.set()

    threads = [threading.Thread(target=loader, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert seen == {0: _raised(before), 1: _raised(before), "after the first left": _raised(before)}
    assert gc.get_threshold() == before


def test_a_change_made_during_a_load_is_kept(dense_dir):
    before = gc.get_threshold()
    try:

        def change(name, shape):
            gc.set_threshold(1234, 5, 6)

        qbridge.load_checkpoint(dense_dir, device="cpu", progress=False, sharding=change)
        assert gc.get_threshold() == (1234, 5, 6)
    finally:
        gc.set_threshold(*before)


def test_left_alone_under_an_incremental_collector(dense_dir, monkeypatch):
    monkeypatch.setattr(_gc, "_INCREMENTAL", True)  # Python 3.14 and later
    before = gc.get_threshold()
    seen = set()
    qbridge.load_checkpoint(
        dense_dir, device="cpu", progress=False, sharding=lambda n, s: seen.add(gc.get_threshold())
    )
    assert seen == {before}


def test_only_the_older_generations_the_load_raised_come_back(dense_dir):
    before = gc.get_threshold()
    try:
        qbridge.load_checkpoint(
            dense_dir, device="cpu", progress=False, sharding=lambda n, s: gc.set_threshold(2000)
        )
        assert gc.get_threshold() == (2000, *before[1:])  # the caller's change kept, the load's raise undone
    finally:
        gc.set_threshold(*before)


def test_thresholds_too_large_to_multiply_are_capped(dense_dir):
    before = gc.get_threshold()
    seen = set()
    try:
        gc.set_threshold(700, 300_000_000, 10)
        qbridge.load_checkpoint(
            dense_dir, device="cpu", progress=False, sharding=lambda n, s: seen.add(gc.get_threshold())
        )
        assert seen == {(700, 2**31 - 1, 10 * _gc.FACTOR)}
        assert gc.get_threshold() == (700, 300_000_000, 10)
    finally:
        gc.set_threshold(*before)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_process_forked_during_a_load_starts_with_the_callers_thresholds():
    before = gc.get_threshold()
    with _gc.older_generations_deferred():
        read, write = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # JAX warns that its process forks while it has threads
            pid = os.fork()
        if pid == 0:  # the child: report its thresholds, then one load's worth of entering and leaving
            with _gc.older_generations_deferred():
                inside = gc.get_threshold()
            os.write(write, repr((gc.get_threshold(), inside, _gc._depth)).encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        reported = os.read(read, 1000).decode()
        os.close(read)
        assert gc.get_threshold() == _raised(before)  # the parent's load goes on
    assert gc.get_threshold() == before
    assert reported == repr((before, _raised(before), 0))
