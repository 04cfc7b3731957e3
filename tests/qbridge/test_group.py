"""The grouped FP8 route's bookkeeping on the CPU (``qbridge/_group.py``), where the grouped kernel and
XLA's allocation call are not used (``take_many`` answers None off CUDA): weights gathered by kind, groups
decoded when full, early when pending bytes outgrow the bound, and at the end; every weight decoded as one
call gives it; a damaged scale inside a group named. The GPU half is ``test_group_gpu.py``."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from checkpoints import FP8_EXPERT_KINDS, fp8_experts
from helpers import to_numpy

import qbridge
from qbridge import _group
from qbridge._checkpoint import open_checkpoint
from qbridge._handoff import XlaDestinations
from qbridge._loader import plan_load


def _grouped(folder, max_bytes):
    """Every FP8 weight of the checkpoint through FP8Groups: (values by leaf path, group sizes decoded)."""
    sizes = []
    with open_checkpoint(folder) as ckpt:
        _, plan, _, _ = plan_load(ckpt, None)
        values = {}
        groups = _group.FP8Groups(ckpt, torch.device("cpu"), jax.devices("cpu")[0], XlaDestinations(), values,
                                  max_bytes)  # fmt: skip
        flush = groups.flush

        def sized(kind):
            sizes.append(len(groups.pending[kind]))
            flush(kind)

        groups.flush = sized
        for p in plan:
            kind = groups.kind(ckpt.entries[p.key], p.rule, None)
            if kind is not None:
                values[p.leaf.path] = None
                groups.add(kind, p.leaf.path, ckpt.entries[p.key])
        groups.flush_all()
    return values, sizes


@pytest.mark.parametrize("max_bytes", [1 << 30, 300_000])
def test_groups_decode_every_weight_as_a_load_does(tmp_path, max_bytes):
    fp8_experts(tmp_path)
    values, sizes = _grouped(tmp_path, max_bytes)
    counts = sorted(c for _, c in FP8_EXPERT_KINDS.values())
    assert len(values) == sum(counts) and all(v is not None for v in values.values())
    if max_bytes > 1e9:  # full groups, then each kind's remainder at the end
        assert sorted(sizes) == sorted(
            [_group.GROUP] * sum(c // _group.GROUP for c in counts) + [c % _group.GROUP for c in counts]
        )
    else:  # the pending weights outgrew the bound: groups decoded early
        assert max(sizes) < _group.GROUP and sum(sizes) == sum(counts)
    loaded = qbridge.load_checkpoint(tmp_path, device="cpu", progress=False)
    for path, got in values.items():
        want = loaded
        for segment in path:
            want = want[segment]
        np.testing.assert_array_equal(
            np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16), err_msg=str(path)
        )


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
