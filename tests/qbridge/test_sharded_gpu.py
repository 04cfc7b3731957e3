"""Sharded loading on GPUs (`pytest -m gpu`; across GPUs on a machine with two or more)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from checkpoints import bnb_llama, dense_llama, fp8_llama

import jax_side
import qbridge

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    root = tmp_path_factory.mktemp("sharded_gpu")
    dense_llama(root / "dense")
    bnb_llama(root / "dense", root / "nf4", quant_type="nf4", nested=True)
    fp8_llama(root / "dense", root / "fp8")
    return root


@pytest.fixture(scope="module")
def made(written):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    return written


@pytest.mark.parametrize("name", ["nf4", "fp8", "dense"])
def test_sharded_over_one_gpu_reads_ahead_and_equals_unsharded(written, name, monkeypatch):
    """A mesh of one GPU: every leaf's devices are this process's, so each weight is read once, whole (ahead,
    into pinned staging, where it is large enough), decoded and cut; the arrays equal an unsharded load's bit
    for bit. Its tensors are small: a real-size one-GPU sharded load is `deepseek_v3_scale.py --shard`.
    Once the allocation programs of the shards' shapes are compiled, every shard is written by torch into an
    array XLA allocated (XLA's own copy, the route until then, is made to fail); once the grouped FP8 kernel
    is compiled, every FP8 weight is decoded by its group's launch, none by itself."""
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import torch_side
    from qbridge import _group, _handoff, _place, _sharding

    gpu = jax.local_devices(backend="gpu")[0]
    mesh = Mesh(np.array([gpu]), ("x",))
    rules = [(r"(q_proj|gate_proj)\.kernel$", P(None, "x")), (r"down_proj\.kernel$", P("x", None))]
    whole, report = qbridge.load_checkpoint(written / name, progress=False, return_report=True)
    for _ in range(2):  # a shape's allocation program is compiled in the background from its second use
        qbridge.load_checkpoint(written / name, progress=False, sharding=(mesh, rules))
        _handoff.wait_for_allocators()
        torch_side.wait_for_kernels()

    def xla_copy(*args, **kwargs):
        raise AssertionError("a shard was copied by XLA, not written into an array XLA allocated")

    launches, by_itself = [], []
    group_into, materialize = _group.dequantize_fp8_group_into, _sharding.materialize

    def group_recorded(weights, *args, **kwargs):
        launches.append((len(weights), group_into(weights, *args, **kwargs)))
        return launches[-1][1]

    def materialize_recorded(ckpt, entry, *args, **kwargs):
        by_itself.append(entry.kind)
        return materialize(ckpt, entry, *args, **kwargs)

    monkeypatch.setattr(_place, "jax_owned_copy", xla_copy)
    monkeypatch.setattr(_group, "dequantize_fp8_group_into", group_recorded)
    monkeypatch.setattr(_sharding, "materialize", materialize_recorded)
    sharded, sharded_report = qbridge.load_checkpoint(
        written / name, progress=False, return_report=True, sharding=(mesh, rules)
    )
    monkeypatch.undo()
    assert sharded_report.read_bytes == report.read_bytes == report.stored_bytes
    assert sharded_report.device == str(gpu)
    if name == "fp8":  # 14 FP8 weights (7 projections x 2 layers), each kind in one launch
        assert "fp8" not in by_itself, by_itself
        assert sum(n for n, _ in launches) == 14 and all(ok for _, ok in launches), launches
    flat_w = dict(jax.tree_util.tree_leaves_with_path(whole))
    for path, x in jax.tree_util.tree_leaves_with_path(sharded):
        leaf = jax_side.dotted(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path))
        spec = next((p for pattern, p in rules if re.search(pattern, leaf)), P())
        assert x.sharding == NamedSharding(mesh, spec), leaf
        w = flat_w[path]
        assert x.dtype == w.dtype and x.shape == w.shape, leaf
        assert np.array_equal(np.asarray(x).view(np.uint8), np.asarray(w).view(np.uint8)), leaf


@pytest.mark.parametrize("name", ["nf4", "fp8"])
def test_sharded_over_gpus_equals_unsharded(made, name):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    gpus = jax.local_devices(backend="gpu")
    mesh = Mesh(np.array(gpus), ("x",))
    rules = [
        (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel$", P(None, "x")),
        (r"(o_proj|down_proj)\.kernel$", P("x", None)),
    ]
    config = jax_side.LlamaConfig.from_hf(json.loads((made / "dense" / "config.json").read_text()))
    target = jax_side.abstract_llama(config, param_dtype=jnp.bfloat16)
    whole = qbridge.load_checkpoint(made / name, target=target, device="cpu", progress=False)
    sharded = qbridge.load_checkpoint(made / name, target=target, progress=False, sharding=(mesh, rules))
    flat_w = dict(jax.tree_util.tree_leaves_with_path(whole))
    for path, x in jax.tree_util.tree_leaves_with_path(sharded):
        leaf = jax_side.dotted(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path))
        spec = next((p for pattern, p in rules if re.search(pattern, leaf)), P())
        assert x.sharding == NamedSharding(mesh, spec)
        assert {s.device for s in x.addressable_shards} == set(gpus)
        assert np.array_equal(np.asarray(x).view(np.uint16), np.asarray(flat_w[path]).view(np.uint16)), leaf
