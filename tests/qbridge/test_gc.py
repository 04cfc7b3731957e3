"""During a load, Python's collections of its older generations are deferred (``qbridge._gc``): at
DeepSeek-V3's tensor count they took about 15 % of a load. The caller's thresholds come back afterwards,
whatever happens."""

from __future__ import annotations

import gc
import threading

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
