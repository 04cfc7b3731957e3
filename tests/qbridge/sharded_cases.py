"""Sharded loading on 8 CPU devices. Run by test_sharded.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (JAX fixes its device count when it starts)."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from checkpoints import bnb_llama, dense_llama, fp8_llama, torchao_llama
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_side
import qbridge
from qbridge.parity import assert_parity

nnx = pytest.importorskip("flax.nnx")
IDS = np.random.default_rng(1).integers(0, 256, (2, 10))

ROWS_AND_COLUMNS = [
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel$", P(None, "x")),  # column-parallel (torch rows)
    (r"(o_proj|down_proj)\.kernel$", P("x", None)),  # row-parallel (torch columns: blocks straddle shards)
    (r"embed_tokens\.embedding$", P("x", None)),
]
TWO_D = [
    (r"proj\.kernel$", P("data", "model")),
    (r"lm_head\.kernel$", P(None, ("data", "model"))),
]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    root = tmp_path_factory.mktemp("sharded")
    dense_llama(root / "dense")
    bnb_llama(root / "dense", root / "nf4", quant_type="nf4", nested=True)
    bnb_llama(root / "dense", root / "fp4", quant_type="fp4", nested=False)
    # FSDP-QLoRA's storage: the packed bytes stored as bfloat16 elements, two bytes each
    bnb_llama(
        root / "dense", root / "nf4-bf16-storage", quant_type="nf4", nested=True, quant_storage=torch.bfloat16
    )
    fp8_llama(root / "dense", root / "fp8")
    torchao_llama(root / "dense", root / "ao")
    return root


def _target(root):
    config = jax_side.LlamaConfig.from_hf(json.loads((root / "dense" / "config.json").read_text()))
    return config, jax_side.abstract_llama(config, param_dtype=jnp.bfloat16)


def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


def _leaves(tree):
    return {jax_side.dotted(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)): v
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}  # fmt: skip


def _same_as_unsharded(sharded, whole, mesh, rules):
    """Every leaf of ``sharded`` equals ``whole``'s bit for bit and has its rule's sharding (replicated where
    none matches); returns ``sharded``'s leaves by dotted path."""
    a, b = _leaves(whole), _leaves(sharded)
    assert a.keys() == b.keys()
    for leaf, x in b.items():
        _same(x, a[leaf])
        spec = next((p for pattern, p in rules if re.search(pattern, leaf)), P())
        assert x.sharding == NamedSharding(mesh, spec), leaf
    return b


def _mesh_1d():
    return Mesh(np.array(jax.devices()), ("x",))


def _mesh_2d():
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


@pytest.mark.parametrize(
    "name", ["nf4", "fp4", "nf4-bf16-storage", "fp8", "ao/model.pt", "ao/st/model.safetensors", "dense"]
)
@pytest.mark.parametrize("layout", ["1d", "2d"])
def test_sharded_equals_unsharded(made, name, layout):
    _, target = _target(made)
    mesh, rules = (_mesh_1d(), ROWS_AND_COLUMNS) if layout == "1d" else (_mesh_2d(), TWO_D)
    whole = qbridge.load_checkpoint(made / name, target=target, progress=False)
    sharded = qbridge.load_checkpoint(made / name, target=target, progress=False, sharding=(mesh, rules))
    for x in _same_as_unsharded(sharded, whole, mesh, rules).values():
        assert len(x.addressable_shards) == 8


def test_a_sharded_torchao_weight_with_a_nan_scale_is_refused(made, tmp_path):
    """Each shard of a torchao weight is sliced by torchao and its own scales checked: a NaN refuses the load
    as the unsharded load refuses it."""
    state = torch.load(made / "ao" / "model.pt", weights_only=True)
    key = "model.layers.1.mlp.up_proj.weight"
    state[key].scale.view(-1)[3] = float("nan")
    torch.save(state, tmp_path / "model.pt")
    (tmp_path / "config.json").write_text((made / "ao" / "config.json").read_text())
    _, target = _target(made)
    for sharding in (None, (_mesh_1d(), ROWS_AND_COLUMNS)):
        with pytest.raises(
            qbridge.CheckpointError, match=rf"\[{key}\]: 1 value\(s\) of its torchao Int8Tensor's scale"
        ):
            qbridge.load_checkpoint(tmp_path, target=target, progress=False, sharding=sharding)


@pytest.mark.parametrize("layout", ["1d", "2d"])
def test_fp8_groups_place_sharded_weights(made, layout, monkeypatch):
    """On a GPU load, FP8 weights split over devices that are all this process's are decoded with their group
    (one launch per group, on one of the devices; see qbridge._group) and each cut into its shards. Here the
    groups run on the CPU devices, as the loader runs them on GPUs (a group's weights decoded one by one, as a
    GPU does while the grouped kernel compiles): every leaf equals the unsharded load's, every stored byte is
    read once, and each FP8 weight was decoded by its group, not by itself."""
    from qbridge import _group, _loader, _sharding

    _, target = _target(made)
    mesh, rules = (_mesh_1d(), ROWS_AND_COLUMNS) if layout == "1d" else (_mesh_2d(), TWO_D)
    whole, report = qbridge.load_checkpoint(made / "fp8", target=target, progress=False, return_report=True)
    flushed, by_itself = [], []
    flush, materialize = _group.FP8Groups.flush, _sharding.materialize
    monkeypatch.setattr(_loader, "_grouped", lambda jdev: True)

    def flush_recorded(self, kind):
        flushed.append(kind)
        flush(self, kind)

    def materialize_recorded(ckpt, entry, *args, **kwargs):
        by_itself.append(entry.kind)
        return materialize(ckpt, entry, *args, **kwargs)

    monkeypatch.setattr(_group.FP8Groups, "flush", flush_recorded)
    monkeypatch.setattr(_sharding, "materialize", materialize_recorded)
    sharded, sharded_report = qbridge.load_checkpoint(
        made / "fp8", target=target, progress=False, return_report=True, sharding=(mesh, rules)
    )
    monkeypatch.undo()
    assert sharded_report.read_bytes == report.read_bytes == report.stored_bytes
    b = _same_as_unsharded(sharded, whole, mesh, rules)
    assert "fp8" not in by_itself and by_itself  # the other weights (norms, embedding) decoded by themselves
    # one group per kind (the weights are small: each kind's all in one), each kind with its leaves' sharding
    assert len(flushed) == len(set(flushed)) and all(len(kind) == 7 for kind in flushed)
    fp8_leaves = [leaf for leaf in b if ".layers." in f".{leaf}" and "_proj.kernel" in leaf]
    assert {kind[6] for kind in flushed} == {b[leaf].sharding for leaf in fp8_leaves}
    assert len(fp8_leaves) == 14 and len(flushed) < len(fp8_leaves)


def test_fp8_weights_with_a_0d_scale_load_by_themselves_on_the_grouped_route(tmp_path, monkeypatch):
    """A per-tensor scale stored 0-d (``torch.tensor(0.01)``) keeps its weight out of the FP8 groups: on the
    route a GPU load takes (forced here on the CPU devices), sharded or not, it loads as the plain load does.
    The groups' stacked scales had no row shape for it: the load failed with a bare unflatten error."""
    from safetensors.torch import save_file

    from qbridge import _loader

    g = torch.Generator().manual_seed(3)
    stored = {}
    for i in range(2):
        stored[f"model.layers.{i}.mlp.up_proj.weight"] = (torch.randn(64, 32, generator=g) * 100).to(
            torch.float8_e4m3fn
        )
        stored[f"model.layers.{i}.mlp.up_proj.weight_scale_inv"] = torch.rand((), generator=g) + 0.01
    save_file(stored, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    mesh = _mesh_1d()
    want = _leaves(qbridge.load_checkpoint(tmp_path, progress=False))
    monkeypatch.setattr(_loader, "_grouped", lambda jdev: True)
    for sharding in (None, (mesh, [(r"up_proj\.kernel$", P(None, "x"))])):
        got = _leaves(qbridge.load_checkpoint(tmp_path, progress=False, sharding=sharding))
        assert got.keys() == want.keys() and len(got) == 2
        for leaf, x in got.items():
            _same(x, want[leaf])


def test_kept_weights_are_replicated_where_no_rule_splits_them(made):
    _, target = _target(made)
    mesh = _mesh_1d()
    rules = [(r"embed_tokens\.embedding$", P(None, "x"))]  # dense in bitsandbytes checkpoints: split
    whole = qbridge.load_checkpoint(made / "nf4", target=target, progress=False, keep_quantized=True)
    placed = qbridge.load_checkpoint(
        made / "nf4", target=target, progress=False, keep_quantized=True, sharding=(mesh, rules)
    )
    kept = placed["model"]["layers"][0]["mlp"]["down_proj"]["kernel"]
    assert isinstance(kept, jax_side.NF4Weight)
    assert all(a.sharding == NamedSharding(mesh, P()) for a in jax.tree.leaves(kept))
    _same(kept.dequantize(), whole["model"]["layers"][0]["mlp"]["down_proj"]["kernel"].dequantize())
    assert placed["model"]["embed_tokens"]["embedding"].sharding == NamedSharding(mesh, P(None, "x"))
    with pytest.raises(ValueError, match=r"down_proj.kernel: keep_quantized does not shard"):
        qbridge.load_checkpoint(made / "nf4", target=target, progress=False, keep_quantized=True,
                                sharding=(mesh, [(r"down_proj\.kernel$", P("x", None))]))  # fmt: skip
    # replicated by a spec with an entry per axis (as an nnx model made under an Explicit mesh carries): the
    # pieces, of other ranks than the kernel, are replicated (the kernel's P(None, None) cannot place them)
    entries = qbridge.load_checkpoint(made / "nf4", target=target, progress=False, keep_quantized=True,
                                      sharding=(mesh, [(r"down_proj\.kernel$", P(None, None))]))  # fmt: skip
    kept = entries["model"]["layers"][0]["mlp"]["down_proj"]["kernel"]
    assert all(a.sharding == NamedSharding(mesh, P()) for a in jax.tree.leaves(kept))
    _same(kept.dequantize(), whole["model"]["layers"][0]["mlp"]["down_proj"]["kernel"].dequantize())


def test_shards_hold_only_their_slice(made):
    _, target = _target(made)
    mesh = _mesh_1d()
    params = qbridge.load_checkpoint(
        made / "nf4", target=target, progress=False, sharding=(mesh, ROWS_AND_COLUMNS)
    )
    down = params["model"]["layers"][1]["mlp"]["down_proj"]["kernel"]  # [192, 64], split over rows
    assert [s.data.shape for s in down.addressable_shards] == [(24, 64)] * 8
    replicated = params["model"]["norm"]["scale"]
    assert all(s.data.shape == (64,) for s in replicated.addressable_shards)


def test_callable_sharding_and_default_device(made):
    _, target = _target(made)
    mesh = _mesh_1d()

    def sharding(name, shape):
        return NamedSharding(mesh, P("x")) if name.endswith("up_proj.kernel") else None

    params = qbridge.load_checkpoint(made / "fp8", target=target, progress=False, sharding=sharding)
    up = params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert up.sharding == NamedSharding(mesh, P("x"))
    assert params["model"]["norm"]["scale"].devices() == {jax.devices()[0]}


def test_target_shardings_are_honoured(made):
    _, target = _target(made)
    mesh = _mesh_2d()
    first = qbridge.load_checkpoint(made / "nf4", target=target, progress=False, sharding=(mesh, TWO_D))
    again, report = qbridge.load_checkpoint(made / "fp4", target=first, progress=False, return_report=True)
    for leaf, x in _leaves(again).items():
        assert x.sharding == _leaves(first)[leaf].sharding, leaf
    assert report.device == "8 devices: cpu:0-7"  # placed by the target's shardings, not by sharding=


def test_flax_model_under_jit_with_shardings(made):
    config, target = _target(made)
    mesh = _mesh_2d()
    whole = qbridge.load_checkpoint(made / "nf4", target=target, progress=False)
    sharded = qbridge.load_checkpoint(made / "nf4", target=target, progress=False, sharding=(mesh, TWO_D))
    outputs = []
    for params in (whole, sharded):
        model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
        nnx.update(model, params)
        outputs.append(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(IDS)))
    assert outputs[1].sharding is not None
    assert_parity(outputs[0], outputs[1])


EXPLICIT_LAYOUTS = {  # name: (rules on the model's state, the ids' spec)
    "column": ([(r"proj'\]\['kernel", P(None, "model"))], P()),
    "Megatron (column, then row), batch on data": (
        [
            (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)'\]\['kernel", P(None, "model")),
            (r"(o_proj|down_proj)'\]\['kernel", P("model", None)),
            (r"embed_tokens'\]\['embedding", P(None, "model")),
        ],
        P("data"),
    ),
    "key/value heads split over more devices than heads": (
        [(r"(k_proj|v_proj)'\]\['kernel", P(None, ("data", "model")))],
        P(None, "model"),
    ),
    "2-D": (
        [(r"proj'\]\['kernel", P("data", "model")), (r"lm_head'\]\['kernel", P(None, ("data", "model")))],
        P("data"),
    ),
}


def test_the_model_runs_on_a_mesh_with_explicit_axes(made):
    """The built-in Llama (grouped key/value heads) under a mesh whose axes are Explicit (JAX's sharding in
    types, ``jax.make_mesh``'s default): each common layout of the dense weights, and kept ones with a sharded
    LoRA B, give the unsharded model's logits, sharded as the ids; LoRA gradients match too. Repeating the
    key/value heads, row-parallel projections, key/value heads split past their count and ids sharded on the
    batch had each failed inside the model (JAX asked for ``out_sharding``)."""
    import re

    config, _ = _target(made)
    assert config.num_attention_heads > config.kv_heads
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    ids = jnp.asarray(np.concatenate([IDS, IDS[::-1]]))  # a batch of 4: splits over "data"
    rng = np.random.default_rng(0)
    cases = [("dense", name) for name in EXPLICIT_LAYOUTS] + [("kept + LoRA", None)]
    for case, layout in cases:
        model = jax_side.llama_for_causal_lm(config)
        if case == "dense":
            nnx.update(model, qbridge.load_checkpoint(made / "nf4", target=model, progress=False))
            rules, ids_spec = EXPLICIT_LAYOUTS[layout]
        else:
            kept = qbridge.load_checkpoint(made / "nf4", target=model, keep_quantized=True, progress=False)
            jax_side.load_quantized_into_nnx(model, kept)
            jax_side.add_lora(
                model, jax_side.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"])
            )
            rules, ids_spec = [(r"lora_B", P(None, "model"))], P("data")
        graph, state = nnx.split(model)

        def place(path, x, rules=rules):
            name = jax.tree_util.keystr(path)
            if "lora_B" in name:  # PEFT starts B at zero: random values, so that the adapter counts
                x = jnp.asarray(rng.standard_normal(x.shape) * 0.1, x.dtype)
            spec = next((spec for pattern, spec in rules if re.search(pattern, name)), P())
            return x, jax.device_put(x, NamedSharding(mesh, spec))

        pairs = jax.tree_util.tree_map_with_path(place, state)
        whole = jax.tree.map(lambda p: p[0], pairs, is_leaf=lambda p: isinstance(p, tuple))
        placed = jax.tree.map(lambda p: p[1], pairs, is_leaf=lambda p: isinstance(p, tuple))
        want = np.asarray(nnx.merge(graph, whole)(ids))
        with jax.set_mesh(mesh):
            run = jax.jit(lambda s, x, graph=graph: nnx.merge(graph, s)(x), static_argnames="graph")
            got = run(placed, jax.device_put(ids, NamedSharding(mesh, ids_spec)))
        what = f"{case} {layout or ''}"
        assert len(got.sharding.device_set) == 8, what
        assert got.sharding.spec == P(*ids_spec, *(None,) * (3 - len(ids_spec))), (what, got.sharding.spec)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=what)
        if case == "dense":
            continue

        # gradients of the LoRA factors, sharded, against those computed whole
        def loss(lora, rest, x, graph=graph):
            return jnp.mean(nnx.merge(graph, lora, rest)(x).astype(jnp.float32) ** 2)

        graph_l, lora_whole, rest_whole = nnx.split(nnx.merge(graph, whole), nnx.LoRAParam, ...)
        _, lora_placed, rest_placed = nnx.split(nnx.merge(graph, placed), nnx.LoRAParam, ...)
        want_grads = jax.grad(loss)(lora_whole, rest_whole, ids, graph=graph_l)
        with jax.set_mesh(mesh):
            got_grads = jax.jit(jax.grad(loss), static_argnames="graph")(
                lora_placed, rest_placed, jax.device_put(ids, NamedSharding(mesh, ids_spec)), graph=graph_l
            )
        for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
        assert len(jax.tree.leaves(want_grads)) == 2 * 2 * config.num_hidden_layers
        assert all(np.abs(np.asarray(w)).max() > 0 for w in jax.tree.leaves(want_grads))


def test_the_model_on_explicit_axes_keeps_what_a_call_changes_and_is_the_model_called(made):
    """On a mesh with Explicit axes the forward runs on the model itself: LoRA dropout's random counters
    advance call by call as without a mesh (a copy had run, so every step drew the same mask), per-layer
    tracing sees every layer (it had seen none), a model captured by a plain jax.jit runs, and ids and weights
    on two meshes are refused (a bare KeyError had come)."""
    import torch
    import transformers

    from qbridge.parity import trace

    config, _ = _target(made)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    ids = jnp.asarray(np.concatenate([IDS, IDS[::-1]]))

    def kept_with_dropout(on_mesh):
        model = jax_side.llama_for_causal_lm(config)
        kept = qbridge.load_checkpoint(made / "nf4", target=model, keep_quantized=True, progress=False)
        jax_side.load_quantized_into_nnx(model, kept)
        jax_side.add_lora(
            model,
            jax_side.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]),
        )
        nnx.update(model, jax.tree.map(lambda x: jnp.full_like(x, 0.1), nnx.state(model, nnx.LoRAParam)))
        model.train()
        if on_mesh:
            graph, state = nnx.split(model)
            model = nnx.merge(graph, jax.device_put(state, NamedSharding(mesh, P())))
        return model

    def counts(model):
        return [int(v[...]) for _, v in nnx.to_flat_state(nnx.state(model, nnx.RngCount))]

    plain, placed = kept_with_dropout(False), kept_with_dropout(True)
    want = [np.asarray(plain(ids)) for _ in range(2)]
    with jax.set_mesh(mesh):
        x = jax.device_put(ids, NamedSharding(mesh, P("data")))
        got = [np.asarray(placed(x)) for _ in range(2)]
    assert not np.array_equal(want[0], want[1])  # two masks
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert counts(placed) == counts(plain) and min(counts(plain)) == 2

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        made / "dense", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model = jax_side.llama_for_causal_lm(config)
    nnx.update(model, qbridge.load_checkpoint(made / "dense", target=model, progress=False))
    whole = trace(torch_model, model, IDS)
    graph, state = nnx.split(model)
    model = nnx.merge(graph, jax.device_put(state, NamedSharding(mesh, P())))
    split = trace(
        torch_model, model, IDS, flax_inputs=(jax.device_put(jnp.asarray(IDS), NamedSharding(mesh, P())),)
    )
    assert len(split.pairs) == len(whole.pairs) > 10 and split.first_divergence == whole.first_divergence

    x = jax.device_put(ids, NamedSharding(mesh, P("data")))
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda ids: model(ids))(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5
    )
    other = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with pytest.raises(ValueError, match="lie on different meshes"):
        model(jax.device_put(ids, NamedSharding(other, P("a"))))


def test_bad_sharding_spec(made):
    with pytest.raises(TypeError, match="sharding must be a callable"):
        qbridge.load_checkpoint(made / "nf4", progress=False, sharding=["x"])
    # an axis the mesh lacks, and a spec of more entries than the leaf has axes: the rule and leaf named
    # (JAX's bare error, and "list index out of range", had been all)
    with pytest.raises(
        ValueError, match=r"rule 'q_proj': P\(None, 'tp'\) names 'tp', which the mesh lacks \(its axes: 'x'\)"
    ):
        qbridge.load_checkpoint(
            made / "nf4", progress=False, sharding=(_mesh_1d(), [("q_proj", P(None, "tp"))])
        )
    # entries that are no axis of the mesh, and specs of partial sums: the rule named (JAX's errors did not)
    for spec, words in [
        (P(1, None), r"names 1, which the mesh lacks"),
        (P(("x", None), None), r"names None, which the mesh lacks"),
        (P(None, None, unreduced={"x"}), r"has reduced or unreduced axes"),
    ]:
        with pytest.raises(ValueError, match=rf"^sharding rule 'q_proj': .*{words}"):
            qbridge.load_checkpoint(made / "nf4", progress=False, sharding=(_mesh_1d(), [("q_proj", spec)]))
    # memory other than the devices': refused while planning, the leaf named (JAX's error came after the reads)
    host = NamedSharding(_mesh_1d(), P(), memory_kind="pinned_host")
    with pytest.raises(ValueError, match=r"q_proj\.kernel: its sharding puts it in 'pinned_host' memory"):
        qbridge.load_checkpoint(
            made / "nf4", progress=False, sharding=lambda n, s: host if "q_proj" in n else None
        )
    # a newcomer's slips: one spec for rules, the pair swapped, a callable of another signature
    with pytest.raises(
        TypeError, match=r"give the rules as a list of \(regex, PartitionSpec\) pairs, such as"
    ):
        qbridge.load_checkpoint(made / "nf4", progress=False, sharding=(_mesh_1d(), P(None, "x")))
    with pytest.raises(
        TypeError, match=r"first element is a list, not a jax.sharding.Mesh \(the pair's order"
    ):
        qbridge.load_checkpoint(made / "nf4", progress=False, sharding=([("q_proj", P())], _mesh_1d()))
    with pytest.raises(TypeError, match=r"called as f\(name, shape\) .*, and <lambda> cannot be"):
        qbridge.load_checkpoint(made / "nf4", progress=False, sharding=lambda name: None)
    # the keep_quantized refusal names the rule that splits the leaf
    with pytest.raises(
        ValueError, match=r"keep_quantized does not shard, .*\(by the sharding rule 'down_proj'\)"
    ):
        qbridge.load_checkpoint(made / "nf4", progress=False, keep_quantized=True,
                                sharding=(_mesh_1d(), [("down_proj", P("x", None))]))  # fmt: skip
    # an axis named twice (JAX's DuplicateSpecError named no rule nor leaf), also inside a tuple of axes
    for twice in (P("x", "x"), P(("x",), "x")):
        with pytest.raises(ValueError, match=r"rule 'q_proj': P\(.*\) names 'x' more than once; a mesh axis"):
            qbridge.load_checkpoint(made / "nf4", progress=False, sharding=(_mesh_1d(), [("q_proj", twice)]))
    with pytest.raises(
        ValueError,
        match=r"input_layernorm.scale: the sharding rule 'norm' gives it P\('x', None\), 2 entries for 1",
    ):
        _, target = _target(made)
        qbridge.load_checkpoint(
            made / "nf4", target=target, progress=False, sharding=(_mesh_1d(), [("norm", P("x", None))])
        )
    # a callable that returns a device (or anything else) instead of a Sharding: the leaf named
    for wrong, shown in [
        (jax.devices()[1], r"CpuDevice\(id=1\) \(\w*Device\)"),
        ("cpu:1", r"'cpu:1' \(str\)"),
    ]:
        with pytest.raises(
            TypeError, match=r"\.kernel: the sharding= callable returned " + shown + r", not a jax"
        ):
            qbridge.load_checkpoint(made / "nf4", progress=False, sharding=lambda name, shape, w=wrong: w)
    # a mesh without its rules (a Mesh is callable, a context decorator): told to pair it with rules
    with pytest.raises(TypeError, match=r"sharding=mesh: give the mesh with its rules, sharding=\(mesh, \["):
        qbridge.load_checkpoint(made / "nf4", progress=False, sharding=_mesh_1d())
    # a split the dimension does not divide into: refused while planning (the Flax leaf named, where the
    # shard's own making named the torch key), before any weight is read
    three = Mesh(np.array(jax.devices()[:3]), ("x",))
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.up_proj\.kernel: .*partitioned 3 times"):
        qbridge.load_checkpoint(
            made / "dense", progress=False, sharding=(three, [(r"up_proj\.kernel$", P("x"))])
        )
    unconstrained = (_mesh_1d(), [("q_proj", P(None, P.UNCONSTRAINED))])
    assert qbridge._sharding.check_spec(unconstrained)[1] == tuple(unconstrained[1])
    with pytest.warns(
        UserWarning,
        match=r"the sharding rule 'nowhere' matched no leaf; .* dotted Flax path, such as 'model\.",
    ) as seen:
        qbridge.load_checkpoint(made / "dense", progress=False, sharding=(_mesh_1d(), [("nowhere", P("x"))]))
    assert seen[0].filename == __file__


@pytest.mark.parametrize("name", ["nf4", "fp8", "ao/model.pt", "dense"])
def test_read_bytes_whole_and_sharded(made, name):
    """A whole load reads every stored byte once, and so does a load sharded over 8 devices in one process
    (all devices are this process's: each weight is read whole once and cut, not read again per shard)."""
    _, report = qbridge.load_checkpoint(made / name, progress=False, return_report=True)
    assert report.read_bytes == report.stored_bytes
    _, sharded = qbridge.load_checkpoint(
        made / name, progress=False, return_report=True, sharding=(_mesh_1d(), ROWS_AND_COLUMNS)
    )
    assert sharded.read_bytes == report.stored_bytes, (sharded, report)
    # the report says where the arrays live: every device of the mesh, not the default device
    assert report.device == str(jax.devices()[0])
    assert sharded.device == "8 devices: cpu:0-7" and " on 8 devices: cpu:0-7 in " in str(sharded), sharded


def test_read_window_equals_the_slice(made):
    """Checkpoint.read_window (a window of a 4-bit weight's bytes seen as a matrix) from safetensors and
    from a torch file equals slicing the whole tensor."""
    import torch

    from qbridge import open_checkpoint

    with open_checkpoint(made / "nf4") as ckpt:
        entry = ckpt.entries["model.layers.0.mlp.down_proj.weight"]  # [64, 192]: rows of 96 bytes
        whole = ckpt.read(entry.keys["weight"]).reshape(-1).view(-1, 96)
        before = ckpt.bytes_read
        window = ckpt.read_window(entry.keys["weight"], 96, (5, 17), (32, 64))
        assert torch.equal(window, whole[5:17, 32:64]) and ckpt.bytes_read - before == 12 * 32
        with pytest.raises(qbridge.CheckpointError, match="reading"):
            ckpt.read_window(entry.keys["weight"], 97, (0, 1), (0, 1))
        # a window past the rows or columns, reversed, or of rows of no bytes: refused, not cut to fit
        for row_bytes, rows, cols in [(96, (0, 2), (0, 100)), (96, (4, 2), (0, 8)), (96, (-2, 2), (0, 8)),
                                      (96, (60, 65), (0, 8)), (96, (0, 2), (8, 4)), (0, (0, 1), (0, 1))]:  # fmt: skip
            with pytest.raises(qbridge.CheckpointError, match="do not hold rows"):
                ckpt.read_window(entry.keys["weight"], row_bytes, rows, cols)
    torch.save({"w": whole.clone()}, made / "window.pt")
    with open_checkpoint(made / "window.pt") as ckpt:
        assert torch.equal(ckpt.read_window("w", 96, (5, 17), (32, 64)), whole[5:17, 32:64])


def test_rules_given_as_an_iterator_are_applied(made):
    _, target = _target(made)
    rules = ((pattern, spec) for pattern, spec in ROWS_AND_COLUMNS)  # read once only
    params = qbridge.load_checkpoint(
        made / "nf4", target=target, progress=False, sharding=(_mesh_1d(), rules)
    )
    down = params["model"]["layers"][1]["mlp"]["down_proj"]["kernel"]
    assert down.sharding == NamedSharding(_mesh_1d(), P("x", None))
    # and as a {regex: PartitionSpec} dict, in its order
    params = qbridge.load_checkpoint(
        made / "nf4", target=target, progress=False, sharding=(_mesh_1d(), dict(ROWS_AND_COLUMNS))
    )
    down = params["model"]["layers"][1]["mlp"]["down_proj"]["kernel"]
    assert down.sharding == NamedSharding(_mesh_1d(), P("x", None))


def test_a_rule_that_is_no_regex(made):
    with pytest.raises(ValueError, match=r"sharding rule 'kernel\[' is no regular expression"):
        qbridge.load_checkpoint(made / "nf4", progress=False, sharding=(_mesh_1d(), [("kernel[", P())]))


def test_to_torch_of_an_array_on_many_devices_says_how_to_take_one():
    mesh = jax.make_mesh((8,), ("x",))
    x = jnp.arange(16.0)
    whole = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    with pytest.raises(
        TypeError, match=r"spans 8 devices, each holding all of it: .*addressable_shards\[0\]\.data"
    ):
        qbridge.to_torch(whole)
    assert np.array_equal(qbridge.to_torch(whole.addressable_shards[0].data).numpy(), np.asarray(x))
    split = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
    with pytest.raises(TypeError, match=r"spans 8 devices: gather it onto one device first"):
        qbridge.to_torch(split)


def test_an_edited_quant_map_is_warned_about_once_per_weight_and_decoded_as_bitsandbytes_does(made, tmp_path):
    import shutil
    import warnings

    from safetensors.torch import load_file, save_file

    shutil.copytree(made / "nf4", tmp_path / "nf4")
    tensors = load_file(tmp_path / "nf4" / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight.quant_map"
    tensors[key] = tensors[key] * 2
    save_file(tensors, tmp_path / "nf4" / "model.safetensors", metadata={"format": "pt"})
    rules = (_mesh_1d(), [(r"down_proj\.kernel$", P("x", None))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = qbridge.load_checkpoint(tmp_path / "nf4", sharding=rules, progress=False)
    told = [w for w in caught if key in str(w.message)]
    assert len(told) == 1, [str(w.message) for w in caught]
    want = qbridge.load_checkpoint(made / "nf4", sharding=rules, progress=False)
    name = "model.layers.0.mlp.down_proj.kernel"
    _same(_leaves(got)[f"params.{name}"], _leaves(want)[f"params.{name}"])
