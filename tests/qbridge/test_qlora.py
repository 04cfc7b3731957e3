"""QLoRA in JAX on a bitsandbytes checkpoint: adapters as PEFT makes them, trained with optax while the
quantized weights stay frozen, written as a PEFT adapter that torch's PEFT loads onto the 4-bit model, and
PEFT adapters read back exactly."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from checkpoints import LLAMA, bnb_llama, dense_llama
from helpers import assert_same_bits

import jax_side
import qbridge
from qbridge.parity import assert_parity

nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

IDS = np.random.default_rng(1).integers(0, LLAMA["vocab_size"], (2, 12))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    dense_llama(root / "dense")
    bnb_llama(root / "dense", root / "nf4", quant_type="nf4", nested=True)
    return root


def _torch_4bit(made):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                             bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    return transformers.AutoModelForCausalLM.from_pretrained(
        made / "nf4", quantization_config=config, dtype=torch.bfloat16, device_map="cpu"
    ).eval()


def _fresh(made):
    config = jax_side.LlamaConfig.from_hf(json.loads((made / "nf4" / "config.json").read_text()))
    return jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)


def _kept(made):
    config = jax_side.LlamaConfig.from_hf(json.loads((made / "nf4" / "config.json").read_text()))
    model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
    params = qbridge.load_checkpoint(made / "nf4", target=model, keep_quantized=True, progress=False)
    jax_side.load_quantized_into_nnx(model, params)
    return model


def _loss(model, ids):
    logits = model(ids[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def test_targets_are_matched_as_peft_matches_them():
    config = jax_side.LoraConfig(target_modules=["q_proj", "v_proj"])
    assert config.matches("model.layers.0.self_attn.q_proj") and not config.matches(
        "model.layers.0.self_attn.o_proj"
    )
    assert not config.matches("model.layers.0.self_attn.xq_proj")  # a whole name, as PEFT's endswith(".name")
    everything = jax_side.LoraConfig(target_modules="all-linear")
    assert everything.matches("model.layers.1.mlp.down_proj") and not everything.matches("lm_head")
    assert jax_side.LoraConfig(target_modules=r".*\.1\.mlp\..*").matches("model.layers.1.mlp.up_proj")
    assert (
        jax_side.LoraConfig(r=16, lora_alpha=32).scaling == 2.0
        and jax_side.LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling == 8.0
    )
    with pytest.raises(ValueError, match="use_dora=True"):
        jax_side.LoraConfig.from_peft({"peft_type": "LORA", "r": 4, "use_dora": True})


@pytest.mark.parametrize(
    "fields, says",
    [
        (dict(r=True), "r must be a positive integer, got True"),
        (dict(r=0), "r must be a positive integer, got 0"),
        (dict(lora_alpha="16"), "lora_alpha must be a finite number, got '16'"),
        (dict(lora_alpha=float("nan")), "lora_alpha must be a finite number, got nan"),
        (dict(lora_dropout="0.1"), r"lora_dropout must be a number in \[0, 1\), got '0.1'"),
        (dict(lora_dropout=1.0), r"lora_dropout must be a number in \[0, 1\), got 1.0"),
        (dict(use_rslora="yes"), "use_rslora must be True or False, got 'yes'"),
        (dict(target_modules=None), "target_modules must be module names .* got None"),
        (dict(target_modules=["q_proj", 3]), r"target_modules must be module names .* got \['q_proj', 3\]"),
        (
            dict(target_modules="(q_proj"),
            r"target_modules '\(q_proj' is one string, used as a regular expression",
        ),
    ],
)
def test_a_config_these_layers_cannot_use_is_refused_when_made(fields, says):
    """Values that a later step could not use (an r of True saved as true and refused when read back, an
    alpha that fails at the first forward, a regular expression that fails at the first match)."""
    with pytest.raises(ValueError, match=says):
        jax_side.LoraConfig(**fields)


def test_a_config_keeps_python_numbers_and_a_traced_alpha():
    """numpy, JAX and torch scalars are kept as Python numbers (so that save_peft_adapter can write the
    config and hash it); None for use_rslora is False, as in PEFT's files; an alpha traced by JAX (a sweep
    under vmap, a gradient) is kept as it is."""
    for alpha in (16, np.float32(16), np.int64(16), jnp.float32(16), torch.tensor(16.0)):
        config = jax_side.LoraConfig(r=4, lora_alpha=alpha, lora_dropout=np.float32(0.25), use_rslora=None)
        assert (type(config.lora_alpha), type(config.lora_dropout), config.use_rslora) == (
            float,
            float,
            False,
        )
        assert config.scaling == 4.0 and hash(config) == hash(
            jax_side.LoraConfig(r=4, lora_alpha=16.0, lora_dropout=0.25)
        )
        json.dumps(config.to_peft())
    assert jax_side.LoraConfig(target_modules=iter(["v_proj", "q_proj"])).target_modules == (
        "q_proj",
        "v_proj",
    )
    scalings = jax.vmap(lambda a: jax_side.LoraConfig(r=4, lora_alpha=a).scaling)(jnp.array([4.0, 8.0]))
    np.testing.assert_array_equal(np.asarray(scalings), [1.0, 2.0])
    assert jax.grad(lambda a: jax_side.LoraConfig(r=4, lora_alpha=a).scaling)(8.0) == 0.25
    with pytest.raises(ValueError, match="use_rslora must be True or False, got 'false'"):
        jax_side.LoraConfig.from_peft({"peft_type": "LORA", "r": 4, "use_rslora": "false"})
    read = jax_side.LoraConfig.from_peft(
        {"peft_type": "LORA", "r": 4, "lora_alpha": None, "lora_dropout": None}
    )
    assert (read.lora_alpha, read.lora_dropout, read.use_rslora) == (8.0, 0.0, False)


@pytest.mark.parametrize(
    "field, value",
    [("alora_invocation_tokens", [7]), ("arrow_config", {"top_k": 2}), ("use_bdlora", True),
     ("a_field_of_a_later_peft", 3)],
)  # fmt: skip
def test_adapter_features_the_layers_do_not_implement_are_refused_by_name(field, value):
    """An aLoRA adapter applies only after its invocation tokens; loaded as plain LoRA it was applied at
    every position (logits off by up to 6 in a breaker's model). Every field not known to be honoured or
    harmless, set, is refused; PEFT's own saved config, with its defaults, loads."""
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")):
        jax_side.LoraConfig.from_peft({"peft_type": "LORA", "r": 4, field: value})
    peft = pytest.importorskip("peft")
    saved = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM").to_dict()
    assert jax_side.LoraConfig.from_peft(saved).r == 4


def test_adapters_start_as_peft_starts_them(made):
    model = _kept(made)
    before = model(jnp.asarray(IDS))
    names = jax_side.add_lora(model, jax_side.LoraConfig(r=8, target_modules="all-linear"), rngs=nnx.Rngs(3))
    assert (
        len(names) == 14 and "lm_head" not in names
    )  # lm_head is dense here, and all-linear leaves it out anyway
    adapter = jax_side.lora_layers(model)["model.layers.0.mlp.down_proj"]
    a, b = np.asarray(adapter.lora_A[...]), np.asarray(adapter.lora_B[...])
    assert (
        a.shape == (192, 8)
        and a.dtype == np.float32
        and np.abs(a).max() <= 1 / np.sqrt(192)
        and a.std() > 0.5 / np.sqrt(3 * 192)
    )
    assert not b.any()
    np.testing.assert_array_equal(
        np.asarray(model(jnp.asarray(IDS))), np.asarray(before)
    )  # B = 0: the base model
    with pytest.raises(TypeError, match=r"lm_head is a dense nnx.Linear"):
        jax_side.add_lora(model, jax_side.LoraConfig(target_modules=["lm_head"]))
    # PEFT adapts embed_tokens with embedding adapters, which are not made here: refused, nothing added (it
    # had been passed over in silence, and a saved adapter config still named it)
    remove_all = jax_side.remove_lora(model)
    for targets in (["q_proj", "embed_tokens"], r".*(q_proj|embed_tokens)"):
        with pytest.raises(TypeError, match=r"model.embed_tokens is an embedding table.*leave it out"):
            jax_side.add_lora(model, jax_side.LoraConfig(target_modules=targets))
        assert jax_side.lora_layers(model) == {}
    assert len(remove_all) == 14


def test_only_the_adapters_train(made):
    model = _kept(made)
    jax_side.add_lora(
        model, jax_side.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    lora_before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    ids = jnp.asarray(IDS)

    @nnx.jit
    def step(model, optimizer, ids):
        loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, ids)
        optimizer.update(model, grads)
        return loss, grads

    losses = []
    for _ in range(5):
        loss, grads = step(model, optimizer, ids)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    grad_leaves = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
    assert grad_leaves and all(name.endswith(("lora_A", "lora_B")) for name in grad_leaves)
    frozen_after = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    for before, after in zip(
        jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)
    ):  # norms, tables, quantized pieces
        assert np.array_equal(np.atleast_1d(before).view(np.uint8), np.atleast_1d(after).view(np.uint8))
    changed = [
        not np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(lora_before), jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    ]
    assert all(changed)


def test_a_jax_trained_adapter_runs_in_torch_peft(made, tmp_path):
    model = _kept(made)
    jax_side.add_lora(
        model,
        jax_side.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.LoRAParam)
    ids = jnp.asarray(IDS)
    for _ in range(4):
        grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, ids)
        optimizer.update(model, grads)
    out = qbridge.save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(made / "nf4"))
    torch_base = _torch_4bit(made)
    with torch.no_grad():
        base = torch_base(torch.from_numpy(IDS)).logits
    adapted = peft.PeftModel.from_pretrained(torch_base, out).eval()
    assert (
        type(adapted.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    )
    with torch.no_grad():
        torch_logits = adapted(torch.from_numpy(IDS)).logits
    flax_logits = model(ids)
    assert_parity({"logits": torch_logits}, {"logits": flax_logits})  # bf16 tolerances
    assert (torch_logits.float() - base.float()).abs().max() > 10 * (
        torch_logits.float() - torch.from_numpy(np.asarray(flax_logits, np.float32))
    ).abs().max()


def test_a_peft_adapter_reads_into_flax_exactly(made, tmp_path):
    torch.manual_seed(2)
    torch_model = peft.get_peft_model(
        _torch_4bit(made),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "up_proj"]),
    )
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # PEFT starts B at zero: give it values to carry
    torch_model.save_pretrained(tmp_path / "peft")
    model = _kept(made)
    names = qbridge.load_peft_adapter(model, tmp_path / "peft")
    assert names == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.up_proj")
    )
    from safetensors.numpy import load_file

    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    layers = jax_side.lora_layers(model)
    assert layers["model.layers.1.mlp.up_proj"].config == jax_side.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=("q_proj", "up_proj")
    )
    for name, adapter in layers.items():
        assert_same_bits(np.asarray(adapter.lora_A[...]).T, theirs[f"base_model.model.{name}.lora_A.weight"])
        assert_same_bits(np.asarray(adapter.lora_B[...]).T, theirs[f"base_model.model.{name}.lora_B.weight"])
    qbridge.save_peft_adapter(model, tmp_path / "back")
    ours = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert_same_bits(ours[key], theirs[key])
    model.eval()  # dropout off: the Flax model with PEFT's adapter gives the torch PEFT model's logits
    with torch.no_grad():
        torch_logits = torch_model.eval()(torch.from_numpy(IDS)).logits
    assert_parity({"logits": torch_logits}, {"logits": model(jnp.asarray(IDS))})


def test_half_precision_adapter_files_are_widened_as_peft_loads_them(made, tmp_path):
    """A bfloat16 adapter file: float32 adapters holding the same values (PEFT's autocast_adapter_dtype,
    on by default), or bfloat16 ones with autocast_adapter_dtype=False."""
    from safetensors.numpy import load_file, save_file

    torch_model = peft.get_peft_model(_torch_4bit(made), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    torch_model.save_pretrained(tmp_path / "peft")
    file = tmp_path / "peft" / "adapter_model.safetensors"
    rng = np.random.default_rng(4)
    half = {
        k: np.asarray(jnp.asarray(rng.standard_normal(v.shape), jnp.bfloat16))
        for k, v in load_file(file).items()
    }
    save_file(half, file)
    for autocast, dtype in ((True, jnp.float32), (False, jnp.bfloat16)):
        model = _kept(made)
        qbridge.load_peft_adapter(model, tmp_path / "peft", autocast_adapter_dtype=autocast)
        adapter = jax_side.lora_layers(model)["model.layers.0.self_attn.q_proj"]
        assert adapter.lora_A[...].dtype == dtype
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        np.testing.assert_array_equal(
            np.asarray(adapter.lora_A[...], np.float32).T, half[key].astype(np.float32)
        )


def test_targets_that_match_nothing_and_two_configs_say_what_to_do(made, tmp_path):
    """A lone string is a regular expression over the whole path: the message says so and names the layers;
    adapters of two configs cannot go in one PEFT file: the message names them and says how to start over."""
    model = _kept(made)
    with pytest.raises(
        ValueError,
        match=r"target_modules='q_proj' \(one string is a regular expression over the whole dotted path, such as "
        r"'model.layers.0.*pass a list: \['q_proj'\]\); the model's kept-quantized Linear layers are \[",
    ):
        jax_side.add_lora(model, jax_side.LoraConfig(target_modules="q_proj"))
    jax_side.add_lora(model, jax_side.LoraConfig(r=8, target_modules="all-linear"))
    jax_side.add_lora(model, jax_side.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(
        ValueError, match=r"2 different LoraConfigs \(LoraConfig\(r=.*jax_side.remove_lora\(model\)"
    ):
        qbridge.save_peft_adapter(model, tmp_path / "two")
    jax_side.remove_lora(model)
    jax_side.add_lora(model, jax_side.LoraConfig(r=4, target_modules=["q_proj"]))
    qbridge.save_peft_adapter(model, tmp_path / "one")


def test_a_file_of_mixed_dtypes_keeps_each_adapters_values(made, tmp_path):
    """One float16 tensor among float32 ones: each adapter in its own dtype, bit for bit (with
    autocast_adapter_dtype=False the float32 ones were rounded to the first tensor's float16); the model
    runs."""
    from safetensors.numpy import load_file, save_file

    torch_model = peft.get_peft_model(
        _torch_4bit(made), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    torch_model.save_pretrained(tmp_path / "peft")
    file = tmp_path / "peft" / "adapter_model.safetensors"
    rng = np.random.default_rng(7)
    stored = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in load_file(file).items()}
    first = sorted(stored)[0]
    stored[first] = stored[first].astype(np.float16)
    save_file(stored, file)
    for autocast in (False, True):
        model = _kept(made)
        qbridge.load_peft_adapter(model, tmp_path / "peft", autocast_adapter_dtype=autocast)
        layers = jax_side.lora_layers(model)
        for key, value in stored.items():
            name, attr = key.removeprefix("base_model.model.").split(".lora_")
            got = np.asarray(getattr(layers[name], "lora_" + attr.removesuffix(".weight"))[...])
            assert got.dtype == (np.float32 if autocast else value.dtype), (key, got.dtype)
            np.testing.assert_array_equal(got.T.astype(np.float32), value.astype(np.float32))
        assert np.isfinite(np.asarray(model(jnp.asarray(IDS)), np.float32)).all()


def test_peft_files_that_do_not_fit_are_refused(made, tmp_path):
    torch_model = peft.get_peft_model(_torch_4bit(made), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    torch_model.save_pretrained(tmp_path / "peft")
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = np.zeros((4, 64), np.float32)
    save_file(tensors, tmp_path / "peft" / "adapter_model.safetensors")
    with pytest.raises(
        qbridge.CheckpointError,
        match=r"adapters for layers the model lacks: \['base_model.model.model.layers.9",
    ):
        qbridge.load_peft_adapter(_kept(made), tmp_path / "peft")
    del tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"]
    # keys without PEFT's prefix (renamed by hand), all or some: said so, not blamed on target_modules; one
    # adapter under both spellings, PEFT's file one and its in-memory ".default." one, with different values:
    # refused, not one of them picked
    b = next(k for k in sorted(tensors) if "lora_B" in k)
    for edited, says in (
        ({k.removeprefix("base_model.model."): v for k, v in tensors.items()},
         r"no key starts with 'base_model.model.' \(model.layers.0.self_attn.q_proj.lora_A.weight, .*prefix them"),
        ({(k.removeprefix("base_model.model.") if ".layers.0." in k else k): v for k, v in tensors.items()},
         rf"2 of {len(tensors)} keys do not start with 'base_model.model.' \(model.layers.0.self_attn.q_proj.lora_A"),
        ({**tensors, b.replace(".weight", ".default.weight"): tensors[b] - 5},
         rf"holds {re.escape(repr(b.replace('.weight', '.default.weight')))} and {re.escape(repr(b))}, two spellings"),
    ):  # fmt: skip
        save_file(edited, tmp_path / "peft" / "adapter_model.safetensors")
        model = _kept(made)
        with pytest.raises(qbridge.CheckpointError, match=says):
            qbridge.load_peft_adapter(model, tmp_path / "peft")
        assert jax_side.lora_layers(model) == {}
    # the same values under both spellings: one adapter, loaded as from the plain file
    save_file(tensors, tmp_path / "peft" / "adapter_model.safetensors")
    qbridge.load_peft_adapter(plain := _kept(made), tmp_path / "peft")
    save_file(
        {**tensors, b.replace(".weight", ".default.weight"): tensors[b]},
        tmp_path / "peft" / "adapter_model.safetensors",
    )
    qbridge.load_peft_adapter(doubled := _kept(made), tmp_path / "peft")
    (want, got) = (nnx.state(m, nnx.LoRAParam) for m in (plain, doubled))
    assert jax.tree.structure(want) == jax.tree.structure(got) and len(jax.tree.leaves(want)) > 0
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    save_file(tensors, tmp_path / "peft" / "adapter_model.safetensors")
    doc = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for targets, says in (
        (["foo_proj"], r"adapter_config.json: no kept-quantized Linear matches target_modules=\('foo_proj',\)"),
        (None, r"adapter_config.json: no kept-quantized Linear matches"),
        (["lm_head"], r"adapter_config.json: lm_head is a dense nnx.Linear.*bitsandbytes leaves lm_head dense"),
        (["q_proj", "embed_tokens"], r"adapter_config.json: model.embed_tokens is an embedding table"),
        (["v_proj"], r"adapters for layers adapter_config.json's target_modules=\('v_proj',\) does not name: "
                     r"\['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'"),
        ("(q_proj", r"adapter_config.json: target_modules '\(q_proj' is one string, used as a regular expression"
                    r".*not a valid one \(missing \)"),
    ):  # fmt: skip
        (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**doc, "target_modules": targets}))
        model = _kept(made)
        with pytest.raises(qbridge.CheckpointError, match=says):
            qbridge.load_peft_adapter(model, tmp_path / "peft")
        assert jax_side.lora_layers(model) == {}  # nothing changed
    (tmp_path / "peft" / "adapter_config.json").unlink()
    with pytest.raises(qbridge.CheckpointError, match=r"adapter_config.json: missing"):
        qbridge.load_peft_adapter(_kept(made), tmp_path / "peft")


def test_an_adapter_on_an_embedding_is_refused_as_not_linear(made, tmp_path):
    """PEFT's LoRA on embed_tokens (lora_embedding_A/B): the error says the layer is an embedding table (its
    config names it) or not linear (its weights alone hold it), where it said the model lacked a layer it has."""
    torch_model = peft.get_peft_model(
        _torch_4bit(made), peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"])
    )
    torch_model.save_pretrained(tmp_path / "peft")
    config = tmp_path / "peft" / "adapter_config.json"
    for targets, says in (
        (None, r"adapter_config.json: model.embed_tokens is an embedding table"),
        (["q_proj"], r"not linear: \['model.embed_tokens \(Embed\)'\]"),
    ):
        if targets is not None:
            config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": targets}))
        model = _kept(made)
        with pytest.raises(qbridge.CheckpointError, match=says) as e:
            qbridge.load_peft_adapter(model, tmp_path / "peft")
        assert "lacks" not in str(e.value)
        assert jax_side.lora_layers(model) == {}


def test_dropout_is_on_while_training_only(made):
    model = _kept(made)
    jax_side.add_lora(
        model, jax_side.LoraConfig(r=4, lora_dropout=0.5, target_modules=["v_proj"]), rngs=nnx.Rngs(0)
    )
    for adapter in jax_side.lora_layers(model).values():
        adapter.lora_B[...] = jnp.ones_like(adapter.lora_B[...])
    ids = jnp.asarray(IDS)
    model.train()
    assert not np.array_equal(np.asarray(model(ids)), np.asarray(model(ids)))  # a fresh mask each call
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(model(ids)))


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_adapter_term_is_pefts_bit_for_bit(made, adapter_dtype):
    """The LoRA term as PEFT's ``Linear4bit.forward`` computes it (product times ``scaling`` in the adapters'
    dtype, as torch multiplies by a Python number: in float32, rounded once; then cast to the base output's
    bfloat16), for the nnx adapter (``lora_delta``, which linen's ``QuantDense`` adds too), with float32
    and bfloat16 adapters. The base layer is made to return zeros, so that PEFT's layer returns its LoRA
    term alone. Values are small integers in eighths: every product and sum is exact in float32, so only
    the roundings decide the bits (scaling 4/3 is 1.3359375 in bfloat16)."""
    from jax_side._lora import lora_adapter_class

    rng = np.random.default_rng(3)
    hidden = LLAMA["hidden_size"]
    torch_model = peft.get_peft_model(
        _torch_4bit(made),
        peft.LoraConfig(r=12, lora_alpha=16, target_modules=["q_proj"]),
        autocast_adapter_dtype=False,
    )
    layer = torch_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and layer.scaling["default"] == 16 / 12
    a = rng.integers(-8, 9, (hidden, 12)).astype(np.float32) / 8  # [in, r]
    b = rng.integers(-8, 9, (12, layer.out_features)).astype(np.float32) / 8  # [r, out]
    x = rng.integers(-4, 5, (2, 5, hidden)).astype(np.float32)
    layer.lora_A["default"].to(adapter_dtype)
    layer.lora_B["default"].to(adapter_dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.from_numpy(a.T))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(b.T))
    assert layer.lora_A["default"].weight.dtype == adapter_dtype
    base = layer.base_layer
    base.forward = lambda t, *args, **kwargs: torch.zeros(
        (*t.shape[:-1], layer.out_features), dtype=torch.bfloat16
    )
    with torch.no_grad():
        theirs = layer(torch.from_numpy(x).to(torch.bfloat16))
    assert theirs.dtype == torch.bfloat16 and theirs.abs().max() > 0
    want = theirs.float().numpy()
    jdtype = jnp.float32 if adapter_dtype == torch.float32 else jnp.bfloat16
    adapter = lora_adapter_class()(hidden, layer.out_features, jax_side.LoraConfig(r=12, lora_alpha=16),
                                   rngs=nnx.Rngs(0), dtype=jdtype)  # fmt: skip
    adapter.lora_A[...], adapter.lora_B[...] = jnp.asarray(a, jdtype), jnp.asarray(b, jdtype)
    np.testing.assert_array_equal(
        np.asarray(adapter(jnp.asarray(x, jnp.bfloat16), jnp.bfloat16), np.float32), want
    )


def test_lora_delta_scales_as_torch_multiplies():
    """The other orders give other bits on these values: casting to the output before scaling, and (for
    bfloat16 adapters) scaling by 16/12 rounded to bfloat16."""
    from jax_side._lora import lora_delta

    rng = np.random.default_rng(3)
    x, a, b = (jnp.asarray(rng.integers(-8, 9, s) / 8, jnp.bfloat16) for s in ((4, 64), (64, 12), (12, 48)))
    got = np.asarray(lora_delta(x, a, b, 16 / 12, jnp.bfloat16), np.float32)
    product = np.asarray((x @ a) @ b, np.float32)  # the bfloat16 product lora_delta forms
    want = np.asarray(
        jnp.asarray(product * np.float32(16 / 12), jnp.float32).astype(jnp.bfloat16), np.float32
    )
    np.testing.assert_array_equal(got, want)
    in_bf16 = np.asarray((x @ a) @ b * jnp.bfloat16(16 / 12), np.float32)
    assert (in_bf16 != want).sum() > want.size // 10


def test_linen_quant_dense_with_lora():
    from helpers import bnb_quantize, to_numpy

    _, packed, qs = bnb_quantize((32, 64), nested=False, dtype=torch.float32)
    kernel = jax_side.NF4Weight(packed=jnp.asarray(to_numpy(packed.reshape(-1))), absmax=jnp.asarray(to_numpy(qs.absmax)),
                                shape=(32, 64), dtype="float32")  # fmt: skip
    layer = jax_side.QuantDense(32, lora=jax_side.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64)), jnp.float32)
    _, made = layer.apply(
        {"quantized": {"kernel": kernel}}, x, mutable=["params", "lora"], rngs={"params": jax.random.key(0)}
    )
    variables = {**made, "quantized": {"kernel": kernel}}
    assert variables["lora"]["lora_A"].shape == (64, 4) and not variables["lora"]["lora_B"].any()
    base = layer.apply(variables, x)

    def loss(lora, rng):
        y = layer.apply({**variables, "lora": lora}, x, deterministic=False, rngs={"dropout": rng})
        return ((y - 1.0) ** 2).sum()

    grads = jax.grad(loss)(variables["lora"], jax.random.key(1))
    assert set(grads) == {"lora_A", "lora_B"} and np.abs(np.asarray(grads["lora_B"])).sum() > 0
    np.testing.assert_array_equal(np.asarray(layer.apply(variables, x)), np.asarray(base))
    # adapters of another rank, or in PEFT's [r, in] / [out, r] layout: refused by shape, not scaled wrongly
    a, b = variables["lora"]["lora_A"], variables["lora"]["lora_B"]
    for lora in ({"lora_A": a[:, :2], "lora_B": b[:2]}, {"lora_A": a.T, "lora_B": b.T}):
        with pytest.raises(ValueError, match=r"LoraConfig\(r=4\) .* need lora_A \(64, 4\) \(\[in, r\]\)"):
            layer.apply({**variables, "lora": lora}, x)


def test_a_loaded_adapter_is_deterministic_and_replaces_what_was_there(made, tmp_path):
    torch.manual_seed(3)
    config = peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True, target_modules={"q_proj", "down_proj"}
    )
    torch_model = peft.get_peft_model(_torch_4bit(made), config)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    torch_model.save_pretrained(tmp_path / "peft")
    model = _kept(made)
    jax_side.add_lora(
        model, jax_side.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"])
    )  # other settings
    qbridge.load_peft_adapter(model, tmp_path / "peft")
    ids = jnp.asarray(IDS)
    first, second = model(ids), model(ids)
    np.testing.assert_array_equal(
        np.asarray(first), np.asarray(second)
    )  # dropout off, as PEFT hands adapters out
    with torch.no_grad():
        want = torch_model.eval()(torch.from_numpy(IDS)).logits
    assert_parity({"logits": want}, {"logits": first})  # rsLoRA's scaling came with the file
    assert jax_side.lora_layers(model)["model.layers.0.self_attn.q_proj"].config.use_rslora
    qbridge.save_peft_adapter(model, tmp_path / "back")  # a set of target modules, as PEFT keeps it
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["use_rslora"] is True


def test_a_broken_adapter_leaves_the_model_as_it_was(made, tmp_path):
    torch_model = peft.get_peft_model(_torch_4bit(made), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    torch_model.save_pretrained(tmp_path / "peft")
    doc = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    model = _kept(made)
    for bad, message in (
        ({**doc, "r": 8.7}, "r must be a positive integer"),
        ([doc], "a JSON object"),
        ({**doc, "r": 8}, "the layer needs"),
    ):
        (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(bad))
        with pytest.raises(qbridge.CheckpointError, match=message):
            qbridge.load_peft_adapter(model, tmp_path / "peft")
        assert jax_side.lora_layers(model) == {}


def test_a_model_with_kept_layers_as_target_is_refused_naming_a_layer(made, tmp_path):
    """A model that load_quantized_into_nnx filled, given again as ``target=``: the error names a kept layer and
    says to pass a fresh model (a MatchError had listed every weight as unused); its nnx.State likewise."""
    model = _kept(made)
    says = r"target: model.layers.0.mlp.down_proj \(QuantLinear\) and 13 more are kept quantized.*pass a model built afresh"
    for call in (
        lambda: qbridge.load_checkpoint(made / "nf4", target=model, keep_quantized=True, progress=False),
        lambda: qbridge.load_checkpoint(made / "nf4", target=model, strict=False, progress=False),
        lambda: qbridge.convert_checkpoint(made / "nf4", tmp_path / "out", target=model, progress=False),
    ):
        with pytest.raises(TypeError, match=says):
            call()
    with pytest.raises(
        TypeError, match=r"target: model.layers.0.mlp.down_proj.weight \(QuantizedVariable\) and "
    ):
        qbridge.load_checkpoint(made / "nf4", target=nnx.state(model), progress=False)
    # the pure dict of that state, and the tree keep_quantized=True gives, as nnx and linen targets
    kept = qbridge.load_checkpoint(made / "nf4", target=_fresh(made), keep_quantized=True, progress=False)
    for tree, where in (
        (nnx.state(model).to_pure_dict(), "model.layers.0.mlp.down_proj.weight"),
        (kept, "model.layers.0.mlp.down_proj.kernel"),
        ({"params": kept}, "params.model.layers.0.mlp.down_proj.kernel"),
    ):
        with pytest.raises(
            TypeError, match=rf"target: {re.escape(where)} \(NF4Weight\) and 13 more are kept"
        ):
            qbridge.load_checkpoint(made / "nf4", target=tree, progress=False)
    assert not (tmp_path / "out").exists()
    # restoring a dense conversion onto it: the same cause named (a list of missing keys had been all)
    qbridge.convert_checkpoint(made / "nf4", tmp_path / "dense.orbax", target=_fresh(made), progress=False)
    for target, where in (
        (model, r"down_proj \(QuantLinear\)"),
        (nnx.state(model), r"down_proj.weight \(Quant"),
    ):
        with pytest.raises(
            qbridge.CheckpointError,
            match=rf"dense.orbax: the target's model.layers.0.mlp.{where}.* and 13 more are kept quantized",
        ):
            qbridge.restore_converted(tmp_path / "dense.orbax", target)
    nnx.update(fresh := _fresh(made), qbridge.restore_converted(tmp_path / "dense.orbax", _fresh(made)))
    assert np.isfinite(np.asarray(fresh(jnp.asarray(IDS)), np.float32)).all()
