"""The loader's grouped FP8 route on a GPU (``qbridge/_group.py``): FP8 weights of one kind decoded
together, in one launch, into arrays XLA allocated, give the bits of one call per weight; a damaged scale
inside a group is named; and the arrays hold their values even when XLA's allocation waits behind other
work on the device (run with `pytest -m gpu`)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from checkpoints import FP8_EXPERT_KINDS as KINDS
from checkpoints import fp8_experts as _write
from checkpoints import fp8_experts_decoded as _expected
from checkpoints import loaded_weights as _flat
from helpers import to_numpy

pytestmark = pytest.mark.gpu


def _loads_grouped(tmp_path, monkeypatch, scale_dtype, readers=None):
    """Four loads, each weight's bits checked; returns each grouped launch's answer. ``readers`` collects the
    name of the thread that read each group's scales (a reading thread when they were read ahead)."""
    import qbridge
    import torch_side
    from qbridge import _group, _handoff

    stored = _write(tmp_path / "ckpt", scale_dtype=scale_dtype)
    want = _expected(stored)
    grouped = []
    real = _group.dequantize_fp8_group_into

    def recorded(*args, **kwargs):
        grouped.append(real(*args, **kwargs))
        return grouped[-1]

    monkeypatch.setattr(_group, "dequantize_fp8_group_into", recorded)
    readers = [] if readers is None else readers
    read = _group.FP8Groups._read

    def named(self, *args):
        readers.append(threading.current_thread().name)
        return read(self, *args)

    monkeypatch.setattr(_group.FP8Groups, "_read", named)
    for load in range(4):  # first loads: kernels and allocation calls compile in the background
        tree, report = qbridge.load_checkpoint(tmp_path / "ckpt", progress=False, return_report=True)
        params = _flat(tree["params"])
        assert report.read_bytes == report.stored_bytes  # each weight counted once, read ahead or not
        kernels = {k: v for k, v in params.items() if "_proj" in k}
        assert len(kernels) == sum(c for _, c in KINDS.values())
        for key, got in kernels.items():
            np.testing.assert_array_equal(
                np.asarray(got).view(np.uint16), to_numpy(want[key]).view(np.uint16), err_msg=key
            )
        if load == 1:
            torch_side.wait_for_kernels()
            _handoff.wait_for_allocators()
    return grouped


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap", [256, 16])  # one group per kind; several, and a remainder
def test_grouped_loads_give_the_bits_of_one_call_per_weight(tmp_path, monkeypatch, scale_dtype, cap):
    from qbridge import _group

    monkeypatch.setattr(_group, "GROUP", cap)
    readers = []
    grouped = _loads_grouped(tmp_path, monkeypatch, scale_dtype, readers)
    assert True in grouped, grouped  # the grouped route ran (and gave the bits above)
    # every group's scales and small float8 bytes were read ahead in a reading thread
    assert readers and all(name.startswith("qbridge-group") for name in readers), readers


def test_one_weight_at_a_time_gives_the_same(tmp_path, monkeypatch):
    """The control: with groups of one, the loader decodes weight by weight (the route before groups)."""
    from qbridge import _group

    monkeypatch.setattr(_group, "GROUP", 1)
    assert _loads_grouped(tmp_path, monkeypatch, torch.float32) == []


def test_a_group_of_one_weight_gets_one_array(tmp_path, monkeypatch):
    """A kind's last group of one weight is handed over by itself with its array expected: once the loads'
    allocation calls are compiled, it asks for one array, not a pool of a shape nobody said would come (32
    arrays at this shape, 31 of them for nothing)."""
    import qbridge
    from qbridge import _group, _handoff

    monkeypatch.setattr(_group, "GROUP", 4)  # down_proj: 37 weights, nine groups of 4 and a last one of 1
    asked, loads = [], []
    real, load = _handoff._allocator, qbridge.load_checkpoint

    def recorded(key, *args, **kwargs):
        asked.append((len(loads), key))
        return real(key, *args, **kwargs)

    def counted(*args, **kwargs):
        loads.append(None)
        return load(*args, **kwargs)

    monkeypatch.setattr(_handoff, "_allocator", recorded)
    monkeypatch.setattr(qbridge, "load_checkpoint", counted)
    grouped = _loads_grouped(tmp_path, monkeypatch, torch.float32)
    assert len(loads) == 4 and True in grouped, grouped
    down = (KINDS["down_proj"][0][1], KINDS["down_proj"][0][0])  # its Flax kernel: [in, out]
    # the last load: the groups of 4 (their grouped call) and the last one's single array
    assert {key[3] for n, key in asked if n == 4 and key[0] == down} == {4, 1}, asked


def test_a_damaged_scale_inside_a_group_is_named(tmp_path):
    import qbridge

    bad = "model.layers.0.mlp.experts.33.gate_proj.weight_scale_inv"
    _write(tmp_path / "ok")
    _write(tmp_path / "bad", damaged=bad)
    for _ in range(3):
        qbridge.load_checkpoint(tmp_path / "ok", progress=False)
    with pytest.raises(qbridge.CheckpointError, match=rf"model.safetensors \[{bad}\]: 1 scale\(s\) are NaN"):
        qbridge.load_checkpoint(tmp_path / "bad", progress=False)


def test_arrays_hold_their_values_when_the_allocation_waits_behind_other_work(tmp_path, monkeypatch):
    """All arrays of one allocation call share its completion on the GPU: torch waits for one of them and
    then writes every one. XLA's stream is kept busy before each allocation call, so a write that did not
    wait would be overwritten by the allocation's fill."""
    import jax
    import jax.numpy as jnp

    import qbridge
    import torch_side
    from qbridge import _handoff

    stored = _write(tmp_path / "ckpt")
    want = _expected(stored)
    for _ in range(2):
        qbridge.load_checkpoint(tmp_path / "ckpt", progress=False)
    torch_side.wait_for_kernels()
    _handoff.wait_for_allocators()
    qbridge.load_checkpoint(tmp_path / "ckpt", progress=False)
    _handoff.wait_for_allocators()
    busy_when_taken = []
    take_many = _handoff.XlaDestinations.take_many
    x = jnp.ones((4096, 4096), jnp.float32, device=jax.local_devices(backend="gpu")[0])
    busy = jax.jit(lambda y, w: jax.lax.fori_loop(0, 100, lambda _, y: jnp.tanh(y @ w), y))
    jax.block_until_ready(busy(x, x))  # compiled here: inside the hook it only queues work

    def after_busy_work(self, *args, **kwargs):
        y = busy(x, x)  # tens of milliseconds queued on XLA's stream before the allocation
        out = take_many(self, *args, **kwargs)
        busy_when_taken.append(not y.is_ready())
        return out

    monkeypatch.setattr(_handoff.XlaDestinations, "take_many", after_busy_work)
    params = _flat(qbridge.load_checkpoint(tmp_path / "ckpt", progress=False)["params"])
    # the host may fall behind the device (a loaded machine) for one call: the race is exercised where any
    # allocation call was queued behind unfinished work, and every array's values are checked below
    assert any(busy_when_taken), busy_when_taken
    for key, value in want.items():
        np.testing.assert_array_equal(
            np.asarray(params[key]).view(np.uint16), to_numpy(value).view(np.uint16), err_msg=key
        )


def test_pending_weights_are_decoded_before_they_outgrow_the_bound(tmp_path, monkeypatch):
    """The weights waiting for their group hold at most the loader's read-ahead window: past it, the
    largest group is decoded early (fewer than GROUP weights), with the same bits."""
    from qbridge import _group, _loader

    monkeypatch.setattr(_loader, "READ_AHEAD_BYTES", 300_000)  # about 3 of the larger kind's weights
    # groups not sized to the bound, as when many kinds of weights wait together
    monkeypatch.setattr(_group, "group_size", lambda weight_bytes, max_bytes: _group.GROUP)
    sizes = []
    flush = _group.FP8Groups.flush

    def sized(self, kind):
        sizes.append(len(self.pending[kind]))
        return flush(self, kind)

    monkeypatch.setattr(_group.FP8Groups, "flush", sized)
    readers = []
    _loads_grouped(tmp_path, monkeypatch, torch.float32, readers)
    assert sizes and max(sizes) < min(count for _, count in KINDS.values()), sizes
    assert threading.main_thread().name in readers, readers  # groups decoded early read their own


FRESH_PROCESS = r"""
import sys
import qbridge
import torch_side._triton  # Triton imported up front: the first load asks for the kernels it needs
from qbridge import _group, _handoff
from torch_side import _compile

grouped = []
real = _group.dequantize_fp8_group_into
_group.dequantize_fp8_group_into = lambda *args, **kwargs: grouped.append(real(*args, **kwargs)) or grouped[-1]
for load in range(3):
    grouped.clear()
    qbridge.load_checkpoint(sys.argv[1], progress=False)
    print("LOAD", load, "GROUPED", grouped, flush=True)
    # what the load asked for is made ready (without wait_for_kernels, after which every call waits)
    with _compile._IDLE:
        _compile._IDLE.wait_for(lambda: _compile._WORKING == 0, timeout=600)
    _handoff.wait_for_allocators()
"""


def test_a_fresh_process_loads_grouped_once_what_its_loads_asked_for_is_ready(tmp_path):
    """In a fresh process, the compiles asked for by one load of FP8 weights one by one (the single
    weight's kernel) bring the grouped kernel and the groups' allocation calls too: once they are ready,
    the next load decodes its groups together. (Before, the grouped kernel was asked for only by the load
    after the one that made the single kernel ready, so a process loaded one by one for a load more.)"""
    import subprocess
    import sys

    _write(tmp_path / "ckpt")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "QBRIDGE_TRITON_COMPILE")}
    env["QBRIDGE_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "ckpt")], env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loads = [line for line in done.stdout.splitlines() if line.startswith("LOAD")]
    # load 0 asks for the kernels; load 1 decodes every group together
    assert loads[1].startswith("LOAD 1 GROUPED [True") and "False" not in loads[1], done.stdout


def test_a_groups_allocation_call_is_compiled_from_its_first_ask():
    """n arrays of one shape are asked for by a group of a model's repeated weights, which come again: the
    call is compiled from the first ask (a single array's, from the second), so a load's second group of a
    kind can use it."""
    import jax

    from qbridge import _handoff

    into = _handoff.XlaDestinations()
    device, on = jax.local_devices(backend="gpu")[0], torch.device("cuda", 0)
    assert into.take_many(7, (136, 72), torch.bfloat16, device, on) is None  # not compiled yet
    _handoff.wait_for_allocators()
    arrays = into.take_many(7, (136, 72), torch.bfloat16, device, on)
    assert arrays is not None and len(arrays) == 7 and arrays[0].shape == (136, 72)
    into.settle()
