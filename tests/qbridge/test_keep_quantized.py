"""Keeping weights quantized in JAX: load_checkpoint(keep_quantized=True), the quantized nnx and linen
layers, gradients, and the pytrees' round trips (tree_util, device_put, Orbax)."""

from __future__ import annotations

import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from checkpoints import bnb_llama, dense_llama, fp8_llama
from helpers import assert_same_bits, bnb_quantize, bnb_reference, to_numpy

import jax_side
import qbridge
from qbridge.parity import assert_parity

nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")
pytest.importorskip("bitsandbytes")
IDS = np.random.default_rng(2).integers(0, 256, (2, 11))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("kq")
    dense_llama(root / "dense")
    for quant_type, nested in (("nf4", True), ("nf4", False), ("fp4", True)):
        bnb_llama(root / "dense", root / f"{quant_type}-{nested}", quant_type=quant_type, nested=nested)
    fp8_llama(root / "dense", root / "fp8")
    return root


def _config(made):
    return jax_side.LlamaConfig.from_hf(json.loads((made / "dense" / "config.json").read_text()))


def _models(made, name, device=None, param_dtype=jnp.bfloat16):
    config = _config(made)
    target = jax_side.abstract_llama(config, param_dtype=param_dtype)
    kept = qbridge.load_checkpoint(
        made / name, target=target, keep_quantized=True, progress=False, device=device
    )
    dense = qbridge.load_checkpoint(made / name, target=target, progress=False, device=device)
    quant_model = jax_side.llama_for_causal_lm(config, param_dtype=param_dtype)
    swapped = jax_side.load_quantized_into_nnx(quant_model, kept)
    dense_model = jax_side.llama_for_causal_lm(config, param_dtype=param_dtype)
    nnx.update(dense_model, dense)
    return kept, dense, quant_model, dense_model, swapped


def _expand_to_the_dense_load(kept, dense) -> list:
    """Asserts that every kept weight of ``kept`` expands to exactly the dense load's value at its path;
    returns the kept weights."""
    weights = []
    for path, x in jax.tree_util.tree_leaves_with_path(kept, is_leaf=jax_side.is_quantized):
        if jax_side.is_quantized(x):
            node = dense
            for k in path:
                node = node[getattr(k, "key", getattr(k, "idx", None))]
            assert_same_bits(x.dequantize(transpose=True), node)
            weights.append(x)
    return weights


# float32: the checkpoint is bfloat16, so the kept weights round to bfloat16 before widening, as the dense load
@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("name", ["nf4-True", "nf4-False", "fp4-True", "fp8"])
def test_kept_quantized_matches_the_dense_path(made, name, param_dtype):
    kept, dense, quant_model, dense_model, swapped = _models(made, name, param_dtype=param_dtype)
    leaf = kept["model"]["layers"][1]["self_attn"]["o_proj"]["kernel"]
    assert isinstance(leaf, jax_side.FP8Weight if name == "fp8" else jax_side.NF4Weight)
    if name.endswith("True"):  # bitsandbytes' own table of the nested absmax: left out, used by default
        assert leaf.nested_absmax is not None and leaf.nested_code is None
    assert len(swapped) == 14 and "model.layers.0.mlp.down_proj" in swapped
    assert isinstance(quant_model.model.layers[0].mlp.down_proj, jax_side.QuantLinear)
    held, as_dense = jax_side.quantized_nbytes(kept)
    assert held < 0.65 * as_dense  # tiny layers: the norms, embeddings and tables weigh in
    _expand_to_the_dense_load(kept, dense)
    forward = nnx.jit(lambda m, ids: m(ids))
    quant_logits, dense_logits = (
        forward(quant_model, jnp.asarray(IDS)),
        forward(dense_model, jnp.asarray(IDS)),
    )
    assert_parity(dense_logits, quant_logits)
    if name in ("nf4-False", "fp8") and param_dtype == jnp.bfloat16:  # no nested decode: the same bits
        assert_same_bits(quant_logits, dense_logits)
    else:  # float32 dots may sum in another order: within that order's error, far below a skipped rounding's
        err = np.abs(np.asarray(quant_logits, np.float64) - np.asarray(dense_logits, np.float64)).max()
        assert err <= 2e-5 * np.abs(np.asarray(dense_logits, np.float64)).max(), err


def _one_table_changed(made, tmp_path, change) -> tuple:
    """A copy of the nested NF4 checkpoint with its first nested absmax table replaced by ``change(table)``:
    (its path, the table's key, the new table)."""
    from safetensors.torch import load_file, save_file

    (tmp_path / "q").mkdir()
    for f in (made / "nf4-True").iterdir():
        (tmp_path / "q" / f.name).write_bytes(f.read_bytes())
    (path,) = (tmp_path / "q").glob("*.safetensors")
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("nested_quant_map"))
    tensors[key] = change(tensors[key])
    save_file(tensors, path, metadata={"format": "pt"})
    return tmp_path / "q", key, tensors[key]


def test_a_nested_table_of_its_own_is_kept(made, tmp_path):
    """A checkpoint whose nested absmax tables are not bitsandbytes' standard one keeps them: the kept weights
    hold them and expand to the dense load's bits."""
    path, _, table = _one_table_changed(made, tmp_path, lambda t: t * 0.75)  # the rest standard
    target = jax_side.abstract_llama(_config(made), param_dtype=jnp.bfloat16)
    kept = qbridge.load_checkpoint(path, target=target, keep_quantized=True, progress=False)
    dense = qbridge.load_checkpoint(path, target=target, progress=False)
    held = [w.nested_code for w in _expand_to_the_dense_load(kept, dense) if w.nested_code is not None]
    assert len(held) == 1
    assert_same_bits(held[0], to_numpy(table))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.half(), "must be float32, got torch.float32 and torch.float16"),
        (lambda t: t.double(), "must be float32, got torch.float32 and torch.float64"),  # not rounded for JAX
        (lambda t: t[:255].clone(), "nested_code must have 256 entries, got 255"),
    ],
    ids=["float16", "float64", "255 entries"],
)
def test_a_bad_nested_table_is_refused_at_load_time_by_name(made, tmp_path, change, message):
    """As the dense load refuses it, with its message: not first when the kept weight is used."""
    path, key, _ = _one_table_changed(made, tmp_path, change)
    weight = key.removesuffix(".nested_quant_map")
    target = jax_side.abstract_llama(_config(made), param_dtype=jnp.bfloat16)
    for keep in (True, False):
        with pytest.raises(qbridge.CheckpointError, match=re.escape(weight)) as got:
            qbridge.load_checkpoint(path, target=target, keep_quantized=keep, progress=False)
        assert message in str(got.value), keep


def test_a_dtype_the_kept_weights_cannot_decode_to_is_refused_by_name(made):
    """float64 with JAX's x64 on (without it every load refuses float64 up front): dense leaves could hold
    it, kept weights cannot decode to it."""
    target = jax_side.abstract_llama(_config(made), param_dtype=jnp.float32)
    jax.config.update("jax_enable_x64", True)
    try:
        for name in ("nf4-True", "fp8"):
            with pytest.raises(
                ValueError,
                match=r"model\.layers\.0\..*keep_quantized decodes to float16, bfloat16 or float32.*float64",
            ):
                qbridge.load_checkpoint(
                    made / name, target=target, keep_quantized=True, dtype=jnp.float64, progress=False
                )
    finally:
        jax.config.update("jax_enable_x64", False)


def test_the_torch_model_agrees_too(made, tmp_path):
    model = bnb_llama(made / "dense", tmp_path / "q", quant_type="nf4", nested=True)
    config = _config(made)
    kept = qbridge.load_checkpoint(tmp_path / "q", target=jax_side.abstract_llama(config, param_dtype=jnp.bfloat16),
                                   keep_quantized=True, progress=False)  # fmt: skip
    quant_model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
    jax_side.load_quantized_into_nnx(quant_model, kept)
    with torch.no_grad():
        ref = model(torch.from_numpy(IDS)).logits
    assert_parity(ref, nnx.jit(lambda m, ids: m(ids))(quant_model, jnp.asarray(IDS)))


def test_gradients_reach_inputs_and_lora_not_the_quantized_pieces():
    _, packed, qs = bnb_quantize((48, 80), nested=True, dtype=torch.float32)
    weight = jax_side.NF4Weight(
        packed=jnp.asarray(to_numpy(packed.reshape(-1))), absmax=jnp.asarray(to_numpy(qs.absmax)),
        nested_absmax=jnp.asarray(to_numpy(qs.state2.absmax)), nested_code=jnp.asarray(to_numpy(qs.state2.code)),
        offset=jnp.asarray(qs.offset.item(), jnp.float32), shape=(48, 80), dtype="float32",
    )  # fmt: skip
    layer = jax_side.QuantLinear(weight, jnp.zeros(48), lora=jax_side.LoraConfig(r=4), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 80)), jnp.float32)
    grad_x = jax.grad(lambda x: layer(x).sum())(x)
    w = to_numpy(bnb_reference(packed, qs))
    np.testing.assert_allclose(np.asarray(grad_x), np.tile(w.sum(0), (3, 1)), rtol=1e-5, atol=1e-5)
    grads = nnx.grad(lambda m, x: (m(x) ** 2).sum())(layer, x)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
    assert names == {
        "bias",
        "lora.lora_A",
        "lora.lora_B",
    }  # only Params: the quantized weight is not differentiated
    assert np.abs(np.asarray(grads["lora"]["lora_B"][...])).sum() > 0


def test_linen_layers():
    _, packed, qs = bnb_quantize((32, 64), nested=False, dtype=torch.bfloat16)
    kernel = jax_side.NF4Weight(packed=jnp.asarray(to_numpy(packed.reshape(-1))), absmax=jnp.asarray(to_numpy(qs.absmax)),
                                shape=(32, 64), dtype="bfloat16")  # fmt: skip
    _, epacked, eqs = bnb_quantize((100, 64), nested=False, dtype=torch.bfloat16, seed=5)
    table = jax_side.NF4Weight(packed=jnp.asarray(to_numpy(epacked.reshape(-1))), absmax=jnp.asarray(to_numpy(eqs.absmax)),
                               shape=(100, 64), dtype="bfloat16")  # fmt: skip

    class Net(linen.Module):
        @linen.compact
        def __call__(self, ids):
            h = jax_side.QuantEmbedLinen(name="embed")(ids)
            return jax_side.QuantDense(32, use_bias=True, name="proj")(h)

    class Dense(linen.Module):
        @linen.compact
        def __call__(self, ids):
            h = linen.Embed(100, 64, name="embed")(ids)
            return linen.Dense(32, name="proj")(h)

    ids = jnp.asarray(np.random.default_rng(1).integers(0, 100, (2, 5)))
    variables = {"params": {"proj": {"bias": jnp.zeros(32, jnp.bfloat16)}},
                 "quantized": {"embed": {"embedding": table}, "proj": {"kernel": kernel}}}  # fmt: skip
    got = jax.jit(Net().apply)(variables, ids)
    dense_vars = {"params": {"embed": {"embedding": table.dequantize()}, "proj": {"kernel": kernel.dequantize(transpose=True),
                                                                                "bias": jnp.zeros(32, jnp.bfloat16)}}}  # fmt: skip
    want = jax.jit(Dense().apply)(dense_vars, ids)
    assert_same_bits(got, want)
    grads = jax.grad(
        lambda p: (
            Net().apply({"params": p, "quantized": variables["quantized"]}, ids).astype(jnp.float32).sum()
        )
    )(variables["params"])
    assert set(grads) == {"proj"}


def test_pytrees_round_trip(made, tmp_path):
    kept, *_ = _models(made, "nf4-True")
    leaves, treedef = jax.tree_util.tree_flatten(kept)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    w = again["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert isinstance(w, jax_side.NF4Weight) and w.shape == (192, 64)
    moved = jax.device_put(kept, jax.devices()[0])
    assert_same_bits(moved["model"]["layers"][0]["mlp"]["up_proj"]["kernel"].dequantize(), w.dequantize())
    ocp = pytest.importorskip("orbax.checkpoint")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "kept", kept)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(
        tmp_path / "kept", jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, kept)
    )
    r = restored["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert isinstance(r, jax_side.NF4Weight)
    assert_same_bits(r.dequantize(), w.dequantize())


def test_swap_errors_and_replicated_kept_weights(made):
    config = _config(made)
    kept, *_ = _models(made, "fp8")
    model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
    bad = {"model": {"norm": {"scale": kept["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]}}}
    with pytest.raises(TypeError, match=r"needs an nnx.Linear kernel or nnx.Embed table"):
        jax_side.load_quantized_into_nnx(model, bad)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    placed = qbridge.load_checkpoint(  # replicated kept weights are placed (splitting them: sharded_cases.py)
        made / "fp8",
        keep_quantized=True,
        progress=False,
        sharding=(mesh, [(r"kernel", jax.sharding.PartitionSpec())]),
    )
    weight = placed["params"]["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(weight, jax_side.FP8Weight)
    assert weight.weight.sharding == jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def test_a_tree_loaded_without_the_model_is_refused_and_changes_nothing(made):
    """A targetless load keys layers by strings under "params": refused, naming the first key the model
    lacks, before any module is swapped or any value written."""
    config = _config(made)
    targetless = qbridge.load_checkpoint(made / "nf4-True", keep_quantized=True, progress=False)
    for tree, missing in (
        (targetless, "'params' (str) under its root"),
        (targetless["params"], "'0' (str) under model.layers"),
    ):
        model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
        before = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
        with pytest.raises(
            ValueError, match=re.escape(f"the model has no key {missing}") + r".*target=model"
        ):
            jax_side.load_quantized_into_nnx(model, tree)
        assert isinstance(model.model.layers[0].mlp.down_proj, nnx.Linear)
        after = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
        jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)


def test_values_that_do_not_fit_the_model_change_nothing(made):
    """A number where the model holds an array, integers where it holds floats, an array where it holds a
    module, a bias for a kept-quantized Linear built without one: refused by name before anything changes. Loading again into a kept-quantized model says to use
    a fresh one."""
    config = _config(made)
    kept, *_ = _models(made, "nf4-True")
    bad = {
        "number": (("model", "norm", "scale"), 1.0, r"model\.norm\.scale: shape \(\) where"),
        "integers": (("model", "norm", "scale"), jnp.ones((config.hidden_size,), jnp.int32), r"int32 values where"),
        "module": (("model", "norm"), jnp.ones((config.hidden_size,)), r"model\.norm: a value where the model holds a module"),
        "bias": (("model", "layers", 0, "mlp", "down_proj", "bias"), jnp.full((config.hidden_size,), 5.0),
                 r"down_proj\.bias: a bias for a Linear built without one \(use_bias=False\)"),
    }  # fmt: skip
    for path, value, says in bad.values():
        params = jax.tree_util.tree_map(lambda x: x, kept, is_leaf=jax_side.is_quantized)
        node = params
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
        before = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
        with pytest.raises(ValueError, match=says):
            jax_side.load_quantized_into_nnx(model, params)
        assert isinstance(model.model.layers[0].mlp.down_proj, nnx.Linear)
        after = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
        jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)
    model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
    jax_side.load_quantized_into_nnx(model, kept)
    with pytest.raises(TypeError, match=r"kept quantized already.*fresh model"):
        jax_side.load_quantized_into_nnx(model, kept)


def test_dense_parameters_warn_and_adapters_say_why_they_cannot_attach(made):
    """Parameters loaded without keep_quantized=True hold no quantized weight: load_quantized_into_nnx warns
    that the model was updated dense (from the caller's line), and adapters then say the model holds no
    kept-quantized layer and how to get one, for any target_modules."""
    config = _config(made)
    dense = qbridge.load_checkpoint(
        made / "nf4-True", target=jax_side.abstract_llama(config, param_dtype=jnp.bfloat16), progress=False
    )
    model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
    with pytest.warns(UserWarning, match=r"hold no kept-quantized weight.*keep_quantized=True") as caught:
        assert jax_side.load_quantized_into_nnx(model, dense) == []
    assert caught[0].filename == __file__
    for targets in ("all-linear", "q_proj"):
        with pytest.raises(ValueError, match=r"the model holds none.*keep_quantized=True"):
            jax_side.add_lora(model, jax_side.LoraConfig(target_modules=targets))


def test_empty_batches_and_sequences_give_empty_logits(made):
    """ids of shape (0, 5) or (2, 0): logits of shape (0, 5, vocab) and (2, 0, vocab), dense and kept."""
    _, _, quant_model, dense_model, _ = _models(made, "nf4-True")
    vocab = _config(made).vocab_size
    for model in (dense_model, quant_model):
        for shape in ((0, 5), (2, 0)):
            assert model(jnp.zeros(shape, jnp.int32)).shape == (*shape, vocab)


@pytest.mark.parametrize("name", ["nf4-True", "fp8"])
def test_parameters_of_another_model_are_refused_and_change_nothing(made, name):
    """Kept parameters loaded for this checkpoint's model, put into a model of other widths: refused with
    the first leaf whose shape differs, before any module is swapped or any value written. A narrower
    model (fewer heads, narrower MLP) and a different vocabulary both show: a quantized Linear, a plain
    leaf."""
    config = _config(made)
    kept, *_ = _models(made, name)
    for other, where in (
        (
            {"intermediate_size": config.intermediate_size // 2},
            r"model\.layers\.0\.mlp\.down_proj\.kernel: shape",
        ),
        (
            {"vocab_size": config.vocab_size * 2},
            r"lm_head\.kernel: shape|model\.embed_tokens\.embedding: shape",
        ),
    ):
        model = jax_side.llama_for_causal_lm(
            jax_side.LlamaConfig(**{**config.__dict__, **other}), param_dtype=jnp.bfloat16
        )
        before = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
        with pytest.raises(ValueError, match=where + r".*loaded for another model"):
            jax_side.load_quantized_into_nnx(model, kept)
        assert isinstance(model.model.layers[0].mlp.down_proj, nnx.Linear)
        after = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
        jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)


def test_parameters_of_a_model_with_fewer_layers_are_named_where_they_leave_the_model_as_it_was(made):
    """Kept parameters put into a model with one layer more: the extra layer kept its random initial values
    silently; now a warning names them (a LoRA factor added later is no parameter the checkpoint holds)."""
    config = _config(made)
    kept, *_ = _models(made, "nf4-True")
    layers = config.num_hidden_layers
    model = jax_side.llama_for_causal_lm(
        jax_side.LlamaConfig(**{**config.__dict__, "num_hidden_layers": layers + 1}), param_dtype=jnp.bfloat16
    )
    with pytest.warns(
        UserWarning, match=rf"leave 9 of the model's parameters as they were \(model\.layers\.{layers}\."
    ) as caught:
        jax_side.load_quantized_into_nnx(model, kept)
    assert caught[0].filename == __file__
    same = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax_side.load_quantized_into_nnx(same, kept)


@pytest.mark.parametrize("name", ["nf4-True", "fp8", "dense", "dense-torch-file"])
def test_a_cpu_load_holds_nothing_of_the_file(made, tmp_path, name, monkeypatch):
    """On the CPU, kept pieces and dense leaves are the load's own memory, not views of the safetensors
    file's mapping (which safetensors hands out, large tensors included): overwriting the file in place
    afterwards changes none of them; and a small tensor read twice comes back unchanged after the first
    read's result was written to."""
    import shutil

    import qbridge._checkpoint

    monkeypatch.setattr(qbridge._checkpoint, "SMALL_TENSOR_BYTES", 0)  # every read as a large one's
    ckpt = tmp_path / name
    source = made / name.removesuffix("-torch-file")
    shutil.copytree(source, ckpt)
    if name.endswith("torch-file"):  # the same weights in a torch file, which torch.load maps
        from safetensors.torch import load_file

        for file in ckpt.glob("*.safetensors"):
            torch.save(load_file(file), ckpt / "pytorch_model.bin")
            file.unlink()
    params = qbridge.load_checkpoint(
        ckpt, device="cpu", keep_quantized=not name.startswith("dense"), progress=False
    )
    before = [np.array(a) for a in jax.tree_util.tree_leaves(params)]
    for file in [*ckpt.glob("*.safetensors"), *ckpt.glob("*.bin")]:  # saved again in place, every byte new
        size = file.stat().st_size
        header = 8 + int.from_bytes(file.read_bytes()[:8], "little") if file.suffix == ".safetensors" else 0
        with open(file, "r+b") as f:
            f.seek(header)
            f.write(b"\x5a" * (size - header))
    after = [np.array(a) for a in jax.tree_util.tree_leaves(params)]
    assert all(
        np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))
        for x, y in zip(before, after, strict=True)
    )
    monkeypatch.undo()
    with qbridge.open_checkpoint(source) as c:
        key = min(c.source.shapes, key=lambda k: _nbytes(c.source.shapes[k]))
        first = c.read(key)
        pristine = first.clone()
        first.view(torch.uint8).fill_(0)
        assert torch.equal(c.read(key).view(torch.uint8), pristine.view(torch.uint8))


def _nbytes(shape_dtype):
    shape, dtype = shape_dtype
    return int(np.prod(shape)) * dtype.itemsize


@pytest.mark.gpu
def test_kept_quantized_on_the_gpu(made):
    kept, _, quant_model, dense_model, _ = _models(made, "nf4-True", device="cuda")
    assert kept["model"]["layers"][0]["mlp"]["up_proj"]["kernel"].packed.devices() == {
        jax.local_devices(backend="gpu")[0]
    }
    forward = nnx.jit(lambda m, ids: m(ids))
    assert_parity(forward(dense_model, jnp.asarray(IDS)), forward(quant_model, jnp.asarray(IDS)))


@pytest.mark.parametrize("name", ["nf4-True", "fp8"])
def test_linen_dense_on_the_llama_weights(made, name):
    """linen's QuantDense under jit, on every kept weight of the transformers-made Llama, equals linen.Dense on
    the dense load of the same checkpoint."""
    kept, dense, *_ = _models(made, name)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 192)), jnp.bfloat16)
    checked = 0
    for path, w in jax.tree_util.tree_leaves_with_path(kept, is_leaf=jax_side.is_quantized):
        if not jax_side.is_quantized(w):
            continue
        node = dense
        for k in path:
            node = node[getattr(k, "key", getattr(k, "idx", None))]
        out_features, in_features = w.shape
        inputs = x[..., :in_features]
        quant = jax.jit(jax_side.QuantDense(out_features).apply)({"quantized": {"kernel": w}}, inputs)
        want = jax.jit(linen.Dense(out_features, use_bias=False).apply)({"params": {"kernel": node}}, inputs)
        assert_same_bits(quant, want)
        checked += 1
    assert checked == 14


@pytest.mark.parametrize(
    "bias, error, says",
    [
        ([0.0] * 7, TypeError, r"l1\.bias: the bias must be an array, got list"),
        (np.zeros(31, np.float32), ValueError, r"l1\.bias: shape \(31,\)"),
        (
            np.zeros(32, np.int32),
            ValueError,
            r"l1\.bias: int32 values where the model holds float32: these parameters were not loaded",
        ),
    ],
    ids=["list", "wrong-length", "integers"],
)
def test_a_kept_linears_bias_is_checked_as_the_models_other_parameters_are(bias, error, says):
    """A list of the wrong length was accepted as a kept Linear's bias (the model failed at its first call)."""
    rng = np.random.default_rng(0)
    weight = jax_side.NF4Weight(
        packed=jnp.asarray(rng.integers(0, 256, 32 * 64 // 2, dtype=np.uint8)),
        absmax=jnp.ones(32 * 64 // 64, jnp.float32), shape=(32, 64), dtype="float32",
    )  # fmt: skip

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(64, 32, rngs=rngs)

    model = Model(nnx.Rngs(0))
    with pytest.raises(error, match=says):
        jax_side.load_quantized_into_nnx(model, {"l1": {"kernel": weight, "bias": bias}})
    assert isinstance(model.l1, nnx.Linear)
    jax_side.load_quantized_into_nnx(model, {"l1": {"kernel": weight, "bias": np.ones(32, np.float32)}})
    assert np.array_equal(np.asarray(model.l1(jnp.zeros((1, 64)))), np.ones((1, 32), np.float32))


def test_an_unnamed_linen_layer_names_its_class_in_errors():
    """A QuantDense applied on its own (no parent: no name) began its error with "None: ..."."""
    rng = np.random.default_rng(0)
    weight = jax_side.NF4Weight(
        packed=jnp.asarray(rng.integers(0, 256, 32 * 64 // 2, dtype=np.uint8)),
        absmax=jnp.ones(32 * 64 // 64, jnp.float32), shape=(32, 64), dtype="float32",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"^QuantDense: features=16 but the weight has 32 outputs"):
        jax_side.QuantDense(16).apply({"quantized": {"kernel": weight}}, jnp.ones((1, 64)))
