"""The grouped FP8 route's bookkeeping on the CPU (``qbridge/_group.py``), where the grouped kernel and
XLA's allocation call are not used (``take_many`` answers None off CUDA): weights gathered by kind, groups
decoded when full, early when pending bytes outgrow the bound, and at the end; every weight decoded as one
call gives it; a damaged scale inside a group named. The GPU half is ``test_group_gpu.py``."""

from __future__ import annotations

import concurrent.futures
import threading

import jax
import numpy as np
import pytest
import torch
from checkpoints import FP8_EXPERT_KINDS, fp8_experts
from helpers import to_numpy

import qbridge
from qbridge import _group
from qbridge._checkpoint import SMALL_TENSOR_BYTES, open_checkpoint
from qbridge._handoff import XlaDestinations
from qbridge._loader import plan_load


def _grouped(folder, max_bytes, readers=None, settled=False):
    """Every FP8 weight of the checkpoint through FP8Groups, the weights to come said first as the loader
    says them: (values by leaf path, group sizes decoded). ``readers`` collects the name of the thread that
    read each group (a reading thread when its reads were started ahead); ``settled``: the first reads ahead
    finish before the first weight is added (none is dropped before it ran)."""
    sizes = []
    with open_checkpoint(folder) as ckpt:
        _, plan, _, _ = plan_load(ckpt, None)
        values = {}
        groups = _group.FP8Groups(ckpt, torch.device("cpu"), jax.devices("cpu")[0], XlaDestinations(), values,
                                  max_bytes)  # fmt: skip
        flush, read = groups.flush, groups._read

        def sized(kind):
            sizes.append(len(groups.pending[kind]))
            flush(kind)

        def named(*args):
            if readers is not None:
                readers.append(threading.current_thread().name)
            return read(*args)

        groups.flush, groups._read = sized, named
        kinds = [groups.kind(ckpt.entries[p.key], p.rule, None) for p in plan]
        for p, kind in zip(plan, kinds):
            if kind is not None:
                groups.expect(kind, ckpt.entries[p.key])
        groups.start()
        if settled:
            concurrent.futures.wait([future for *_, future, _ in groups.ahead.values()])
        try:
            for p, kind in zip(plan, kinds):
                if kind is not None:
                    values[p.leaf.path] = None
                    groups.add(kind, p.leaf.path, ckpt.entries[p.key])
            groups.flush_all()
        finally:
            groups.close()
        assert not groups.ahead and groups.ahead_bytes == 0
        # each weight's bytes counted once, whether its reads ran ahead, were dropped, or ran here
        assert ckpt.bytes_read == sum(ckpt.entries[p.key].stored_bytes for p, k in zip(plan, kinds) if k)
    return values, sizes


def _assert_a_cpu_loads_values(folder, values):
    """Each grouped result has the bits of a CPU load of the checkpoint (weight by weight)."""
    loaded = qbridge.load_checkpoint(folder, device="cpu", progress=False)
    for path, got in values.items():
        want = loaded
        for segment in path:
            want = want[segment]
        np.testing.assert_array_equal(
            np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16), err_msg=str(path)
        )


@pytest.mark.parametrize(
    ("max_bytes", "cap", "want"),
    [
        (1 << 30, 256, [37, 40]),  # each kind's weights in one group, decoded at the end
        (1 << 30, 16, [5, 8, 16, 16, 16, 16]),  # full groups of 16 (at most GROUP), then the remainders
        # groups sized to half the bound: weights of 98 KB (gate_proj) by 2, of 26 KB (down_proj) by 8
        (600_000, 256, [2] * 20 + [8] * 4 + [5]),
        (300_000, 256, [1] * 40 + [4] * 9 + [1]),
        # groups not sized to the bound (as when many kinds wait together): decoded early as the pending
        # weights outgrow it
        (300_000, None, None),
    ],
)
def test_groups_decode_every_weight_as_a_load_does(tmp_path, monkeypatch, max_bytes, cap, want):
    if cap is None:
        monkeypatch.setattr(_group, "group_size", lambda weight_bytes, max_bytes: _group.GROUP)
    else:
        monkeypatch.setattr(_group, "GROUP", cap)
    fp8_experts(tmp_path)
    readers = []
    values, sizes = _grouped(tmp_path, max_bytes, readers)
    counts = sorted(c for _, c in FP8_EXPERT_KINDS.values())
    assert len(values) == sum(counts) and all(v is not None for v in values.values())
    here = readers.count(threading.main_thread().name)
    if want is not None:
        assert sorted(sizes) == sorted(want), sizes
        # every group's reads started ahead, and taken
        assert here == 0 and len(readers) == len(sizes), readers
    else:
        assert max(sizes) < min(counts) and sum(sizes) == sum(counts), sizes
        # groups decoded early read their own (their reads ahead, of other weights, dropped)
        assert 0 < here < len(sizes) < len(readers), readers
    _assert_a_cpu_loads_values(tmp_path, values)


def test_reads_ahead_of_large_scales_dropped_by_early_groups_are_not_counted(tmp_path):
    """Scales over 64 KiB (small blocks) are not remembered as read once: a group decoded early drops the read
    ahead of its kind's full group and reads its own; only the reads a group takes count, so the checkpoint's
    bytes are counted once (``_grouped`` checks) and the values are a CPU load's."""
    import json

    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(5)
    tensors = {}
    for kind in range(5):
        shape = (512, 520 + 4 * kind)  # block 4: scales [128, 130+], over 64 KiB of float32
        for expert in range(2):
            key = f"model.layers.0.mlp.experts.{expert}.p{kind}_proj.weight"
            tensors[key] = (torch.rand(shape, generator=gen) * 2 - 1).to(torch.float8_e4m3fn)
            tensors[f"{key}_scale_inv"] = torch.rand((128, shape[1] // 4), generator=gen) + 0.5
    save_file(tensors, tmp_path / "model.safetensors")
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [4, 4]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    largest = 512 * 536 + 128 * 134 * 4
    assert 128 * 130 * 4 > SMALL_TENSOR_BYTES
    readers = []
    # groups of 2 of every kind; five kinds wait together, so pending bytes pass the bound and groups are
    # decoded early
    values, sizes = _grouped(tmp_path, int(4.5 * largest), readers, settled=True)
    assert min(sizes) == 1 and readers.count(threading.main_thread().name) > 0, (sizes, readers)
    _assert_a_cpu_loads_values(tmp_path, values)


def test_group_size():
    """As many weights as half the bound holds, a power of two, at most GROUP, at least one."""
    gib = 1 << 30
    assert _group.group_size(2048 * 7168 + 16 * 56 * 4, gib) == 32  # a DeepSeek-V3 expert and its scales
    assert _group.group_size(7168 * 18432 + 56 * 144 * 4, gib) == 4
    assert _group.group_size(128 * 256 + 2 * 4, gib) == _group.GROUP == 256  # tiny weights: capped
    assert _group.group_size(gib, gib) == 1 and _group.group_size(0, gib) == 256
    assert [_group.group_size(100, b) for b in (200, 399, 400, 1599, 1600)] == [1, 1, 2, 4, 8]


def test_a_damaged_scale_inside_a_group_is_named(tmp_path):
    bad = "model.layers.0.mlp.experts.7.down_proj.weight_scale_inv"
    fp8_experts(tmp_path, damaged=bad)
    with pytest.raises(qbridge.CheckpointError, match=rf"model.safetensors \[{bad}\]: 1 scale\(s\) are NaN"):
        _grouped(tmp_path, 1 << 30)


def test_which_weights_join_a_group(tmp_path):
    """FP8 2-D weights laid out as stored or transposed, keeping their dtype; not a cast, not a flip, not
    another format."""
    import jax_side

    stored = fp8_experts(tmp_path)
    with open_checkpoint(tmp_path) as ckpt:
        groups = _group.FP8Groups(ckpt, torch.device("cpu"), jax.devices("cpu")[0], XlaDestinations(), {}, 1)
        entry = ckpt.entries["model.layers.0.mlp.experts.0.gate_proj.weight"]
        linear, embedding = jax_side.rule_for("linear", "weight"), jax_side.rule_for("embedding", "weight")
        assert groups.kind(entry, linear, None)[-1] is True  # a Linear's kernel: the transpose
        assert groups.kind(entry, embedding, None)[-1] is False  # an embedding table: as stored
        assert groups.kind(entry, linear, np.dtype("float32")) is None  # cast to another dtype: by itself
        assert groups.kind(entry, linear, jax.numpy.bfloat16) is not None
        assert (
            groups.kind(ckpt.entries["model.norm.weight"], jax_side.rule_for("layernorm", "weight"), None)
            is None
        )
    assert to_numpy(stored["model.norm.weight"]).shape == (384,)
