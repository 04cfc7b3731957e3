"""load_checkpoint end to end on checkpoints made by the real producers: the Flax model on the loaded
parameters matches the torch model, and every dequantized weight equals the producer's own dequantization."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from checkpoints import bnb_llama, fp8_llama, torchao_llama
from helpers import assert_same_bits, assert_same_leaves, bnb_reference, fp8_reference_loops, to_numpy

import jax_side
import qbridge
from qbridge.parity import assert_parity

nnx = pytest.importorskip("flax.nnx")
pytest.importorskip("bitsandbytes")

IDS = np.random.default_rng(0).integers(0, 256, (2, 12))


def _flax_model(path):
    config = jax_side.LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
    return config, jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)


def _load_into_flax(path, **kwargs):
    config, model = _flax_model(path if (path / "config.json").exists() else path.parent)
    target = jax_side.abstract_llama(config, param_dtype=jnp.bfloat16)
    params, report = qbridge.load_checkpoint(
        path, target=target, progress=False, return_report=True, **kwargs
    )
    nnx.update(model, params)
    return model, params, report


def _kernel(params, name):
    node = params
    for part in name.rsplit(".", 1)[0].split("."):
        node = node[int(part) if part.isdigit() else part]
    return np.asarray(node["kernel"]).T  # back to torch's [out, in]


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
def test_bitsandbytes_llama(tmp_path, dense_dir, quant_type, nested):
    out = tmp_path / "q"
    model = bnb_llama(
        dense_dir, out, quant_type=quant_type, nested=nested, shard=nested and quant_type == "nf4"
    )
    # every 4-bit weight: bit-identical to bitsandbytes (its reference with the CUDA kernel's semantics),
    # and equal as numbers to what bitsandbytes' own dequantize_4bit returns here
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    flax_model, params, report = _load_into_flax(out)
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            ours = _kernel(params, name + ".weight")
            assert_same_bits(ours, to_numpy(bnb_reference(module.weight.data, module.weight.quant_state)))
            np.testing.assert_array_equal(
                ours.astype(np.float32),
                F.dequantize_4bit(module.weight.data, module.weight.quant_state).float().numpy(),
            )
            checked += 1
    assert checked == 14 and report.format == "bitsandbytes-4bit"
    assert_parity(_torch_logits(model), flax_model(jnp.asarray(IDS)))


def test_sharded_checkpoint_is_read_across_files(tmp_path, dense_dir):
    out = tmp_path / "sharded"
    bnb_llama(dense_dir, out, quant_type="nf4", nested=True, shard=True)  # transformers' own sharding
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("*.safetensors"))) > 2
    summary = qbridge.inspect_checkpoint(out)
    assert summary.files == len(list(out.glob("*.safetensors")))
    _, _, report = _load_into_flax(out)
    assert report.leaves == 21


def test_pieces_of_one_weight_in_different_shards(tmp_path, dense_dir):
    """A weight's packed bytes in one shard, its absmax and quant state in another."""
    from safetensors.torch import load_file, save_file

    single = tmp_path / "single"
    bnb_llama(dense_dir, single, quant_type="fp4", nested=True)
    state = load_file(single / "model.safetensors")
    split = tmp_path / "split"
    split.mkdir()
    main = {k: v for k, v in state.items() if k.endswith(".weight")}
    rest = {k: v for k, v in state.items() if k not in main}
    save_file(main, split / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(rest, split / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = dict.fromkeys(main, "model-00001-of-00002.safetensors") | dict.fromkeys(
        rest, "model-00002-of-00002.safetensors"
    )
    (split / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (split / "config.json").write_text((single / "config.json").read_text())
    _, params_split, _ = _load_into_flax(split)
    _, params_single, _ = _load_into_flax(single)
    name = "model.layers.1.mlp.gate_proj.weight"
    assert_same_bits(_kernel(params_split, name), _kernel(params_single, name))


def test_fp8_llama_with_partial_tiles(tmp_path, dense_dir):
    out = tmp_path / "fp8"
    stored = fp8_llama(dense_dir, out)
    summary = qbridge.inspect_checkpoint(out)
    assert summary.format == "fp8" and summary.kinds["fp8"]["tensors"] == 14
    assert any("partial" in line for line in summary.care)  # 192 rows in 128-row blocks
    flax_model, params, _ = _load_into_flax(out)
    transformers = pytest.importorskip("transformers")
    reference = transformers.LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in stored and stored[name].dtype == torch.float8_e4m3fn:
                want = fp8_reference_loops(
                    stored[name],
                    stored[name.replace(".weight", ".weight_scale_inv")],
                    (128, 128),
                    torch.bfloat16,
                )
                assert_same_bits(_kernel(params, name), to_numpy(want))
                p.copy_(want)  # the torch model on the same dequantized weights
    assert_parity(_torch_logits(reference), flax_model(jnp.asarray(IDS)))


def test_fp8_weight_scale_name(tmp_path, dense_dir):
    out = tmp_path / "fp8s"
    fp8_llama(dense_dir, out, scale_name="weight_scale")
    _, _, report = _load_into_flax(out)
    assert report.format == "fp8"


@pytest.mark.parametrize("layout", ["model.pt", "st/model.safetensors"])
def test_torchao_llama(tmp_path, dense_dir, layout):
    out = tmp_path / "ao"
    model = torchao_llama(dense_dir, out)
    flax_model, params, report = _load_into_flax(out / layout)
    assert report.format == "torchao"
    decoded = set()
    for name, p in model.named_parameters():
        if qbridge.is_quant_tensor_subclass(p):
            assert_same_bits(_kernel(params, name), to_numpy(p.dequantize()))
            decoded.add(str(p.dequantize().dtype).removeprefix("torch."))
    # inspect says what the subclasses decode to, as it does for the other formats
    summary = qbridge.inspect_checkpoint(out / layout)
    assert summary.decoded_to == {"torchao": sorted(decoded)} == {"torchao": ["bfloat16"]}
    assert "decoded to: torchao bfloat16" in str(summary)
    assert_parity(_torch_logits(model), flax_model(jnp.asarray(IDS)))


def test_damaged_torchao_safetensors_name_the_file_and_tensor(tmp_path, dense_dir):
    """torchao's safetensors layout needs its header metadata: edited so torchao's own decode asserts, the
    error names the tensor (it was a bare NotImplementedError); stripped, the pieces are named as
    torchao's, not taken for an FP8 weight's scale (they were: "the scale of a float8 weight")."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "ao"
    torchao_llama(dense_dir, out)
    file = out / "st" / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        meta, data = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = "model.layers.0.self_attn.q_proj.weight"
    doc = json.loads(meta[name])
    doc["_data"]["block_size"] = [91, doc["_data"]["block_size"][1]]  # rows of 91: torchao asserts
    save_file(data, file, metadata={**meta, name: json.dumps(doc)})
    with pytest.raises(qbridge.CheckpointError, match=rf"\[{re.escape(name)}\]: cannot dequantize a torchao"):
        qbridge.load_checkpoint(out / "st", device="cpu", progress=False)
    names = [n for n in json.loads(meta["tensor_names"]) if n != name]  # the metadata leaves one tensor out
    save_file(data, file, metadata={**meta, "tensor_names": json.dumps(names)})
    with pytest.raises(
        qbridge.CheckpointError,
        match=rf"q_proj\._weight_\w+\]: a piece of the torchao tensor {re.escape(name)} in torchao's safetensors "
        rf"layout, but the file's torchao metadata \('tensor_names'\) does not list {re.escape(name)}",
    ):  # it read "the scale of a float8 weight, but its weight ..._weight is missing" of an int8 checkpoint
        qbridge.load_checkpoint(out / "st", device="cpu", progress=False)
    save_file(data, file)  # no metadata
    with pytest.raises(
        qbridge.CheckpointError, match=r"_weight_qdata\]: a piece of a torchao tensor .* no torchao metadata"
    ):
        qbridge.load_checkpoint(out / "st", device="cpu", progress=False)


def test_torchao_pieces_of_a_tensor_whose_name_holds_underscores_are_recognised(tmp_path):
    """torchao's safetensors layout writes module.gate_up_proj as module._gate_up_proj_qdata ...; names with
    underscores were not taken for its pieces, and with the tensor left out of the metadata the raw int8 data
    and scales came back as weights of their own."""
    ao = pytest.importorskip("torchao.quantization")
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    linear = torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    ao.quantize_(linear, ao.Int8WeightOnlyConfig())
    data, meta = flatten_tensor_state_dict(
        {"mlp.experts.gate_up_proj": linear.weight, "mlp.norm.weight": torch.ones(4)}
    )
    assert "mlp.experts._gate_up_proj_qdata" in data
    save_file(data, tmp_path / "model.safetensors", metadata=meta)
    loaded = qbridge.dequantized_state(tmp_path)
    assert sorted(loaded) == ["mlp.experts.gate_up_proj", "mlp.norm.weight"]
    assert torch.equal(loaded["mlp.experts.gate_up_proj"], linear.weight.dequantize())
    meta["tensor_names"] = json.dumps(["mlp.norm.weight"])
    save_file(data, tmp_path / "model.safetensors", metadata=meta)
    with pytest.raises(
        qbridge.CheckpointError,
        match=r"_gate_up_proj_\w+\]: a piece of the torchao tensor mlp\.experts\.gate_up_proj",
    ):
        qbridge.dequantized_state(tmp_path)


def test_torchao_metadata_of_the_wrong_shape_names_its_tensor(tmp_path, dense_dir):
    """One tensor's torchao metadata damaged (not an object, fields of the wrong types, an unknown type): the
    error names that tensor and its file (it had raised AttributeError or TypeError, or named the first
    tensor decoded, whichever was damaged: every tensor was rebuilt from the whole file's metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "ao"
    torchao_llama(dense_dir, out)
    file = out / "st" / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        meta, data = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = "model.layers.1.mlp.down_proj.weight"  # not the first decoded
    doc = json.loads(meta[name])
    for bad in ("null", "[1, 2]", '"Int8Tensor"', json.dumps({**doc, "_data": 5}),
                json.dumps({**doc, "_tensor_data_names": 5})):  # fmt: skip
        save_file(data, file, metadata={**meta, name: bad})
        with pytest.raises(
            qbridge.CheckpointError,
            match=rf"model\.safetensors: torchao metadata for {re.escape(repr(name))} is not",
        ):
            qbridge.load_checkpoint(out / "st", device="cpu", progress=False)
    save_file(data, file, metadata={**meta, name: json.dumps({**doc, "_type": "Int9Tensor"})})
    with pytest.raises(
        qbridge.CheckpointError, match=rf"could not rebuild {re.escape(repr(name))} .*Int9Tensor"
    ):
        qbridge.load_checkpoint(out / "st", device="cpu", progress=False)


def test_tensors_named_like_torchao_pieces_in_other_checkpoints_load_as_they_are(tmp_path, dense_dir):
    """A dense tensor named like a piece of torchao's layout (``._w_qdata``, with or without a ``._w_scale``
    of a floating dtype) is not taken for torchao's (it had been refused as such)."""
    from safetensors.torch import load_file, save_file

    state = load_file(dense_dir / "model.safetensors")
    extra = {"model.extra._w_qdata": torch.rand(4), "model.attn._k_qdata": torch.rand(3).bfloat16(),
             "model.attn._k_scale": torch.rand(1)}  # fmt: skip
    (tmp_path / "d").mkdir()
    save_file({**state, **extra}, tmp_path / "d" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "d" / "config.json").write_text((dense_dir / "config.json").read_text())
    got = qbridge.dequantized_state(tmp_path / "d")
    for key, value in extra.items():
        assert torch.equal(got[key], value)


def test_dense_safetensors_and_torch_files(tmp_path, dense_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16).eval()
    flax_model, _, report = _load_into_flax(dense_dir)
    assert report.format == "safetensors"
    assert_parity(_torch_logits(reference), flax_model(jnp.asarray(IDS)))
    torch.save(reference.state_dict(), tmp_path / "model.bin")
    (tmp_path / "config.json").write_text((dense_dir / "config.json").read_text())
    flax_model, _, report = _load_into_flax(tmp_path / "model.bin")
    assert report.format == "torch"
    assert_parity(_torch_logits(reference), flax_model(jnp.asarray(IDS)))


def test_without_target_flax_names(dense_dir, tmp_path):
    out = tmp_path / "q"
    bnb_llama(dense_dir, out, quant_type="nf4", nested=True)
    variables = qbridge.load_checkpoint(out, progress=False)
    layer = variables["params"]["model"]["layers"]["0"]
    assert layer["self_attn"]["q_proj"]["kernel"].shape == (64, 64)
    assert layer["mlp"]["down_proj"]["kernel"].shape == (192, 64)  # [in, out]
    assert layer["input_layernorm"]["scale"].shape == (64,)
    assert variables["params"]["model"]["embed_tokens"]["embedding"].shape == (256, 64)
    f32 = qbridge.load_checkpoint(out, progress=False, dtype=jnp.float32)
    assert f32["params"]["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.float32


def test_target_dtype_policies(dense_dir):
    config, _ = _flax_model(dense_dir)
    target32 = jax_side.abstract_llama(config, param_dtype=jnp.float32)
    with pytest.raises(jax_side.MatchError, match="leave dtype=None to cast"):
        qbridge.load_checkpoint(dense_dir, target=target32, dtype="checkpoint", progress=False)
    for dtype in (None, "target"):
        params = qbridge.load_checkpoint(dense_dir, target=target32, dtype=dtype, progress=False)
        assert params["model"]["norm"]["scale"].dtype == jnp.float32
    with pytest.raises(ValueError, match="needs a target"):
        qbridge.load_checkpoint(dense_dir, dtype="checkpoint", progress=False)


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_float32_targets_from_a_bf16_nf4_checkpoint(tmp_path, dense_dir, kind):
    """A bf16 NF4 checkpoint into float32 Flax targets with no dtype argument: the targets' dtypes win, the
    report names every cast, and the values are bitsandbytes' bf16 values widened exactly."""
    model = bnb_llama(dense_dir, tmp_path / "nf4", quant_type="nf4", nested=True)
    config, _ = _flax_model(dense_dir)
    abstract = jax_side.abstract_llama(config, param_dtype=jnp.float32)
    if kind == "nnx":
        target = abstract
    else:  # a linen-style params dict of shapes, string keys as linen has them

        def linen(d):
            return {
                str(k): linen(v) if isinstance(v, dict) else jax.ShapeDtypeStruct(v.shape, v.dtype)
                for k, v in d.items()
            }

        target = {"params": linen(nnx.to_pure_dict(nnx.state(abstract)))}
    params, report = qbridge.load_checkpoint(
        tmp_path / "nf4", target=target, progress=False, return_report=True
    )
    tree = params["params"] if kind == "linen" else params
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tree))
    casts = {leaf.removeprefix("params."): (src, dst) for leaf, _, src, dst in report.match.casts}
    assert len(casts) == len(jax.tree.leaves(tree)) and set(casts.values()) == {("bfloat16", "float32")}
    assert "model.layers.1.mlp.down_proj.kernel" in casts
    assert "cast 21 leaves bfloat16 -> float32" in str(report)
    w = model.model.layers[1].mlp.down_proj.weight
    ours = np.asarray(tree["model"]["layers"][1 if kind == "nnx" else "1"]["mlp"]["down_proj"]["kernel"]).T
    assert_same_bits(ours, to_numpy(bnb_reference(w.data, w.quant_state)).astype(np.float32))
    with pytest.raises(jax_side.MatchError, match="leave dtype=None to cast"):  # the opt-in strict mode
        qbridge.load_checkpoint(tmp_path / "nf4", target=target, dtype="checkpoint", progress=False)


def test_non_strict_loads_keep_concrete_values_and_refuse_shapes(tmp_path, dense_dir):
    from safetensors.torch import load_file, save_file

    state = load_file(dense_dir / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((dense_dir / "config.json").read_text())
    config, _ = _flax_model(dense_dir)
    with pytest.raises(jax_side.MatchError, match=r"strict=False, but 1 target leaf is.*model\.norm\.scale"):
        qbridge.load_checkpoint(
            tmp_path,
            target=jax_side.abstract_llama(config, param_dtype=jnp.bfloat16),
            strict=False,
            progress=False,
        )
    model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
    own = np.asarray(model.model.norm.scale[...])
    with pytest.warns(
        UserWarning, match=r"(?s)strict=False: the checkpoint does not fit the target.*model\.norm\.scale"
    ):
        params = qbridge.load_checkpoint(tmp_path, target=model, strict=False, progress=False)
    assert not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    np.testing.assert_array_equal(np.asarray(params["model"]["norm"]["scale"]), own)
    nnx.update(model, params)
    assert model(jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, config.vocab_size)


def test_buffers_are_skipped_and_reported(tmp_path, dense_dir):
    from safetensors.torch import load_file, save_file

    state = load_file(dense_dir / "model.safetensors")
    state["model.embed_tokens.position_ids"] = torch.arange(12)[None]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((dense_dir / "config.json").read_text())
    _, _, report = _load_into_flax(tmp_path)
    assert report.skipped == ["model.embed_tokens.position_ids"]


def test_dequantized_state_matches_the_producer(tmp_path, dense_dir):
    out = tmp_path / "q"
    model = bnb_llama(dense_dir, out, quant_type="fp4", nested=False)
    state = qbridge.dequantized_state(out)
    w = model.model.layers[1].mlp.down_proj.weight
    assert_same_bits(
        to_numpy(state["model.layers.1.mlp.down_proj.weight"]), to_numpy(bnb_reference(w.data, w.quant_state))
    )


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_llama_on_the_gpu(tmp_path, dense_dir, quant_type):
    """Quantized on the GPU by bitsandbytes, loaded onto the GPU through the Triton kernels; bit-identical to
    bitsandbytes' CUDA dequantize_4bit, logits within bf16 tolerance of the CUDA torch model."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import jax
    import transformers

    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(
        dense_dir, quantization_config=config, dtype=torch.bfloat16, device_map="cuda"
    )
    model.save_pretrained(tmp_path / "q")
    flax_model, params, report = _load_into_flax(tmp_path / "q", device="cuda")
    assert report.device.lower().startswith(("cuda", "gpu"))
    leaf = params["model"]["layers"][0]["mlp"]["down_proj"]["kernel"]
    assert leaf.devices() == {jax.local_devices(backend="gpu")[0]}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert_same_bits(
                _kernel(params, name + ".weight"),
                to_numpy(F.dequantize_4bit(module.weight.data, module.weight.quant_state)),
            )
    with torch.no_grad():
        ref = model(torch.from_numpy(IDS).cuda()).logits
    assert_parity(ref, flax_model(jnp.asarray(IDS)))


@pytest.mark.gpu
def test_fp8_llama_on_the_gpu(tmp_path, dense_dir):
    out = tmp_path / "fp8"
    stored = fp8_llama(dense_dir, out)
    _, params, _ = _load_into_flax(out, device="cuda")
    name = "model.layers.0.mlp.gate_proj.weight"
    want = fp8_reference_loops(
        stored[name], stored[name.replace(".weight", ".weight_scale_inv")], (128, 128), torch.bfloat16
    )
    assert_same_bits(_kernel(params, name), to_numpy(want))


def _gpt2(folder, fmt):
    """A random transformers GPT-2 (Conv1D weights stored [in, out]), bfloat16 in safetensors, float32 in a
    torch file: its biases, norms and attention output weights of at most 64 KiB, its other weights larger."""
    import transformers

    dtype = torch.bfloat16 if fmt == "safetensors" else torch.float32
    config = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=128, n_layer=2, n_head=4)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).to(dtype).eval().save_pretrained(
        folder, safe_serialization=fmt == "safetensors"
    )


def _loads_from_host(folder, monkeypatch, device):
    """The load of ``folder`` onto ``device``, its report, and the keys it read for the host route."""
    from qbridge import _loader

    hosted: list[str] = []
    real = _loader.host_bytes

    def spy(ckpt, entry, rule):
        hosted.append(entry.name)
        return real(ckpt, entry, rule)

    monkeypatch.setattr(_loader, "host_bytes", spy)
    loaded, report = qbridge.load_checkpoint(folder, device=device, progress=False, return_report=True)
    return loaded, report, hosted


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_small_unquantized_tensors_go_to_the_gpu_from_the_host_bit_for_bit(tmp_path, fmt, monkeypatch):
    """A GPU load puts its small unquantized tensors (norms, biases, embeddings and transformers ``Conv1D``
    weights stored ``[in, out]``, of at most 64 KiB; bfloat16 and float32) from their host bytes with one
    ``jax.device_put``: each leaf is, bit for bit, the array of a load without that route, on the GPU, and
    every stored byte is counted as read once."""
    from qbridge import _place

    _gpt2(tmp_path / "gpt2", fmt)
    loaded, report, hosted = _loads_from_host(tmp_path / "gpt2", monkeypatch, "cuda")
    assert report.read_bytes == report.stored_bytes
    assert "transformer.h.0.attn.c_proj.weight" in hosted  # a Conv1D weight of 64 KiB or less
    small = {"transformer.ln_f.weight", "transformer.h.1.mlp.c_proj.bias", "transformer.wpe.weight"}
    assert small <= set(hosted) and "transformer.h.0.mlp.c_fc.weight" not in hosted  # 128 KiB or more
    monkeypatch.setattr(_place, "HOST_PUT_BYTES", 0)  # each by itself, as before the route
    hosted.clear()
    before = qbridge.load_checkpoint(tmp_path / "gpt2", device="cuda", progress=False)
    assert not hosted
    assert_same_leaves(loaded, before, jax.local_devices(backend="gpu")[0])


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_the_host_route_taken_on_the_cpu_gives_the_cpu_loads_bits(tmp_path, fmt, monkeypatch):
    """The host route's reading, layout and ``jax.device_put`` (a GPU load's, made to run on the CPU here)
    give the bits of the CPU load's own route, count every byte once, and read in the plan's order: a file
    cut short names its first tensor cut, as the route before did."""
    from qbridge import _loader

    _gpt2(tmp_path / "gpt2", fmt)
    cpu = jax.devices("cpu")[0]
    plain = qbridge.load_checkpoint(tmp_path / "gpt2", device="cpu", progress=False)
    monkeypatch.setattr(_loader, "_grouped", lambda jdev: True)  # the GPU load's routes
    loaded, report, hosted = _loads_from_host(tmp_path / "gpt2", monkeypatch, "cpu")
    assert report.read_bytes == report.stored_bytes
    assert "transformer.h.0.attn.c_proj.weight" in hosted and "transformer.h.0.mlp.c_fc.weight" not in hosted
    assert_same_leaves(loaded, plain, cpu)
    if fmt == "safetensors":
        # the file cut after planning, every tensor with it: the plan's first is named (a small one, read in the
        # plan's order, before the larger ones after it)
        file = tmp_path / "gpt2" / "model.safetensors"
        header = 8 + int.from_bytes(file.read_bytes()[:8], "little")
        plan_load, planned = _loader.plan_load, []

        def cut_after(*args, **kwargs):
            planned.append(plan_load(*args, **kwargs))
            os.truncate(file, header + 2)
            return planned[-1]

        monkeypatch.setattr(_loader, "plan_load", cut_after)
        with pytest.raises(qbridge.CheckpointError) as cut:
            qbridge.load_checkpoint(tmp_path / "gpt2", device="cpu", progress=False)
        first = planned[0][1][0].key
        assert first in hosted and f"reading '{first}' failed" in str(cut.value)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_a_small_tensor_read_twice_is_counted_once(tmp_path, fmt):
    """Scales and tables are read once per shard of a sharded load: ``bytes_read`` counts them once, from
    a safetensors file and from a torch file alike."""
    state = {"big": torch.randn(256, 256), "scale": torch.rand(16, 56)}
    folder = tmp_path / fmt
    folder.mkdir()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, folder / "model.safetensors")
    else:
        torch.save(state, folder / "pytorch_model.bin")
    with qbridge.open_checkpoint(folder) as ckpt:
        for _ in range(3):
            assert torch.equal(ckpt.source.read("scale"), state["scale"])
        assert ckpt.source.bytes_read == 16 * 56 * 4


def test_read_ahead_hands_out_the_stored_bytes_and_counts_them(tmp_path, dense_dir, monkeypatch):
    """``Checkpoint.read_ahead`` (background threads) returns what ``read`` returns, counted once when
    handed out; a file cut short after it was opened fails naming the file and the key."""
    import qbridge._checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "READ_AHEAD_MIN_BYTES", 16 << 10)  # the test model's weights are small
    with qbridge.open_checkpoint(dense_dir) as ckpt:
        big = max(ckpt.entries.values(), key=lambda e: e.stored_bytes).name
        small = min(ckpt.entries.values(), key=lambda e: e.stored_bytes).name
        want = ckpt.read(big).clone()
        before = ckpt.bytes_read
        assert ckpt.read_ahead(big) == want.numel() * want.element_size()
        assert ckpt.read_ahead(big) == 0  # already on its way
        assert ckpt.read_ahead(small) == 0  # small tensors (here: under 16 KiB) are read when asked for
        assert ckpt.bytes_read == before  # nothing handed out yet
        got = ckpt.read(big)
        assert ckpt.bytes_read == before + want.numel() * want.element_size()
        assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))

    cut = tmp_path / "cut"
    cut.mkdir()
    for f in dense_dir.iterdir():
        (cut / f.name).write_bytes(f.read_bytes())
    with qbridge.open_checkpoint(cut) as ckpt:
        file = cut / "model.safetensors"
        size = file.stat().st_size
        ranges = ckpt.source._offsets(file)
        last = next(k for k, (b, e) in sorted(ranges.items(), key=lambda kv: -kv[1][1]) if e - b > 16 << 10)
        file.write_bytes(file.read_bytes()[: min(size // 2, ranges[last][0])])
        assert ckpt.read_ahead(last)
        with pytest.raises(qbridge.CheckpointError, match=f"model.safetensors: reading '{last}' failed"):
            ckpt.read(last)


def test_a_slice_or_window_of_a_file_cut_short_since_it_was_opened_fails_naming_the_key(tmp_path):
    """Sharded loads read slices (through safetensors' map of the file) and windows (a map of the tensor's
    pages); a file cut short in place since it was opened fails naming the file, the key and the bytes it
    still holds. Copying out of the map ended the process instead (SIGBUS): hence a child process here."""
    code = """
import os, sys, torch, qbridge
from safetensors.torch import save_file
d = sys.argv[1]
a = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
save_file({"a": a, "b": torch.ones(256, 64), "z": torch.ones(0, 4)}, d + "/model.safetensors")
with qbridge.open_checkpoint(d) as ckpt:
    begin, end = ckpt.source._offsets(ckpt.source.key_file["b"])["b"]
    assert torch.equal(ckpt.read_slice("a", (slice(3, 9),)), a[3:9])
    # read before the file is cut: memory of their own, which the cut cannot take away
    kept = [ckpt.read_slice("b", (slice(200, 256),)), ckpt.read_window("b", 256, (200, 256), (0, 256))]
    os.truncate(d + "/model.safetensors", begin + 1000)
    assert torch.equal(ckpt.read_slice("a", (slice(3, 9), slice(1, 5))), a[3:9, 1:5])  # still whole
    assert float(kept[0].sum()) == 56 * 64 and int(kept[1].sum()) == 56 * 256 * (0x80 + 0x3F) // 4
    assert ckpt.read_slice("z", (slice(0, 0),)).numel() == 0  # an empty tensor loses nothing
    for read in (
        lambda: ckpt.read_slice("b", (slice(200, 256), slice(0, 8))),
        lambda: ckpt.read_window("b", 256, (200, 256), (0, 8)),
    ):
        try:
            read()
        except qbridge.CheckpointError as e:
            print("ERROR", e)
"""
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    errors = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    want = "model.safetensors: reading 'b' failed: the file ends after 1000 of its 65536 bytes (cut short"
    assert len(errors) == 2 and all(want in line for line in errors), done.stdout


def test_a_window_of_a_file_whose_header_was_cut_before_it_was_read_fails_naming_the_key(tmp_path):
    """A file cut inside its header after it was opened, before the header's byte ranges were needed: a
    window read fails as a CheckpointError naming the file and the key, not with the JSON parser's error."""
    from safetensors.torch import save_file

    save_file({"b": torch.ones(16, 64)}, tmp_path / "model.safetensors")
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        os.truncate(tmp_path / "model.safetensors", 20)
        with pytest.raises(qbridge.CheckpointError, match=r"model.safetensors: reading 'b' failed"):
            ckpt.read_window("b", 256, (0, 2), (0, 8))


def test_a_large_tensor_read_ahead_is_read_in_parts_on_several_threads(tmp_path, monkeypatch):
    """A tensor read ahead that is over twice ``READ_PART_BYTES`` is read in parts, the first by its reading
    thread and the others by the part readers at once: the stored bytes exactly, for sizes around the
    split; a file cut inside such a tensor fails naming the key and how many of its bytes the file holds."""
    import threading

    from safetensors.torch import load_file, save_file

    import qbridge._checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "READ_AHEAD_MIN_BYTES", 0)
    monkeypatch.setattr(checkpoint, "READ_PART_BYTES", 1000)
    g = torch.Generator().manual_seed(21)
    stored = {
        "at_two_parts": torch.randint(0, 256, (2000,), generator=g, dtype=torch.uint8),  # not split
        "one_byte_over": torch.randint(0, 256, (2001,), generator=g, dtype=torch.uint8),
        "odd": torch.randn(333, 7, generator=g).to(torch.bfloat16),  # 4662 bytes: 5 parts
        "rows": torch.randn(517, 3, generator=g),
    }
    file = tmp_path / "model.safetensors"
    save_file(stored, file)
    threads, read_at = collections.Counter(), checkpoint._read_at

    def spy(f, offset, into, lock):
        threads[threading.current_thread().name.rpartition("_")[0]] += 1
        return read_at(f, offset, into, lock)

    monkeypatch.setattr(checkpoint, "_read_at", spy)
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        for key in stored:
            assert ckpt.read_ahead(key)
        for key, want in load_file(file).items():
            got = ckpt.read(key)
            assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), key
    # one read per whole tensor on a reading thread; the parts after the first on the part readers
    assert threads["qbridge-read"] == 4 and threads["qbridge-part"] == 2 + 4 + 6, threads
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        begin = ckpt.source._offsets(file)["odd"][0]
        os.truncate(file, begin + 2500)  # inside its third part
        assert ckpt.read_ahead("odd")
        with pytest.raises(
            qbridge.CheckpointError,
            match=r"model.safetensors: reading 'odd' failed: the file ends after 2500 of its 4662 bytes",
        ):
            ckpt.read("odd")


def test_a_part_read_that_cannot_start_leaves_no_read_writing(tmp_path, monkeypatch):
    """When a part of a large tensor cannot be handed to a part reader (no thread can start, say), the read
    fails only after the parts already handed out have landed: nothing writes into memory that the failed
    read gave back."""
    import threading
    import time

    from safetensors.torch import save_file

    import qbridge._checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "READ_AHEAD_MIN_BYTES", 0)
    monkeypatch.setattr(checkpoint, "READ_PART_BYTES", 1000)
    save_file({"x": torch.ones(5000, dtype=torch.uint8)}, tmp_path / "model.safetensors")
    readers, read_at, landed = checkpoint._readers, checkpoint._read_at, []

    def slow(f, offset, into, lock):
        if threading.current_thread().name.startswith("qbridge-part"):
            time.sleep(0.3)
        got = read_at(f, offset, into, lock)
        landed.append(time.monotonic())
        return got

    class Parts:  # the part readers, refusing the third part
        submitted = 0

        def submit(self, *args):
            self.submitted += 1
            if self.submitted == 3:
                raise RuntimeError("can't start new thread")
            return readers("part").submit(*args)

    parts = Parts()
    monkeypatch.setattr(
        checkpoint, "_readers", lambda name="read": parts if name == "part" else readers(name)
    )
    monkeypatch.setattr(checkpoint, "_read_at", slow)
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        assert ckpt.read_ahead("x")
        with pytest.raises(qbridge.CheckpointError, match=r"reading 'x' failed \(RuntimeError: can't start"):
            ckpt.read("x")
        failed = time.monotonic()
    time.sleep(0.5)
    assert len(landed) == 2 and max(landed) <= failed  # the two parts handed out, both before the error


def test_read_ahead_reads_the_file_as_opened(tmp_path, dense_dir, monkeypatch):
    """A file replaced on disk after the checkpoint was opened (an atomic re-save) is not mixed in: reading
    ahead maps the file that was opened. A key read twice is counted once; after close nothing is read."""
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    import qbridge._checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "READ_AHEAD_MIN_BYTES", 0)
    ckdir = tmp_path / "ck"
    shutil.copytree(dense_dir, ckdir)
    file = ckdir / "model.safetensors"
    old = load_file(file)
    with qbridge.open_checkpoint(ckdir) as ckpt:
        save_file({k: v + 1 for k, v in old.items()}, tmp_path / "new.safetensors", metadata={"format": "pt"})
        os.replace(tmp_path / "new.safetensors", file)
        for key in old:
            assert ckpt.read_ahead(key)
        for key, want in old.items():
            got = ckpt.read(key)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), key
        counted = ckpt.bytes_read
        assert counted == sum(v.numel() * v.element_size() for v in old.values())
        key = next(iter(old))  # every tensor of the test model is small (under 64 KiB)
        ckpt.read(key)  # a small tensor read again comes from memory and is counted once
        assert ckpt.bytes_read == counted
    assert ckpt.read_ahead(key) == 0  # closed: no reader threads start


def test_loads_are_the_same_with_any_read_ahead_window(tmp_path, dense_dir, monkeypatch):
    """Reading ahead changes when bytes are read, never what is loaded: no reading ahead, a window of one
    weight at a time and a window holding the whole checkpoint give the same parameters and bytes read."""
    import qbridge._checkpoint as checkpoint
    import qbridge._loader as loader

    results = []
    for smallest, window in ((1 << 40, 0), (0, 0), (0, 1 << 40)):
        monkeypatch.setattr(checkpoint, "READ_AHEAD_MIN_BYTES", smallest)
        monkeypatch.setattr(loader, "READ_AHEAD_BYTES", window)
        params, report = qbridge.load_checkpoint(dense_dir, progress=False, return_report=True)
        results.append((jax.tree.map(np.asarray, params), report.read_bytes))
    (plain, read), *others = results
    for params, read_ahead in others:
        assert read_ahead == read > 0
        jax.tree.map(
            lambda x, y: np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8)), plain, params
        )


@pytest.mark.parametrize("nested", [True, False])
def test_a_4bit_weights_absmax_is_read_ahead_and_still_checked(tmp_path, dense_dir, monkeypatch, nested):
    """The loader reads a 4-bit weight's absmax ahead with its packed bytes (on a GPU its copy then runs from
    pinned memory): the same parameters and bytes read as without reading ahead, and a damaged (NaN)
    absmax read ahead still fails, naming its key."""
    from safetensors.torch import load_file, save_file

    import qbridge._checkpoint as checkpoint

    bnb_llama(dense_dir, tmp_path / "q", quant_type="nf4", nested=nested)
    asked = []
    read_ahead = checkpoint._Source.read_ahead

    def spy(self, key, *, pin):
        asked.append(key)
        return read_ahead(self, key, pin=pin)

    monkeypatch.setattr(checkpoint._Source, "read_ahead", spy)
    results = []
    for smallest in (1 << 40, 0):
        monkeypatch.setattr(checkpoint, "READ_AHEAD_MIN_BYTES", smallest)
        params, report = qbridge.load_checkpoint(
            tmp_path / "q", device="cpu", progress=False, return_report=True
        )
        results.append((jax.tree.map(np.asarray, params), report.read_bytes))
    assert sum(key.endswith(".weight.absmax") for key in asked) == 2 * 14  # every 4-bit weight's, each load
    (plain, read), (ahead, read_ahead_bytes) = results
    assert read_ahead_bytes == read > 0
    jax.tree.map(lambda x, y: assert_same_bits(x, y), plain, ahead)
    if nested:  # a nested absmax is uint8 codes: its float32 scales (small, read when asked for) are checked
        return
    (tmp_path / "bad").mkdir()
    for f in (tmp_path / "q").iterdir():
        (tmp_path / "bad" / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight.absmax"
    tensors[key][7] = float("nan")
    save_file(tensors, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    asked.clear()
    with pytest.raises(qbridge.CheckpointError, match=rf"{key}.*1 scale\(s\) are NaN or Inf"):
        qbridge.load_checkpoint(tmp_path / "bad", device="cpu", progress=False)
    assert key in asked


def test_small_tensors_are_read_into_torchs_own_memory(tmp_path):
    """A small tensor (64 KiB at most) is read into torch's own, resizable memory, which a CPU load's array
    shares (memory of a fixed size is copied: it may be the file's); reading it from a closed checkpoint, or
    from a file whose header was cut short since it was opened, fails naming the file and the key."""
    import os

    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(4)
    stored = {
        "norm": torch.randn(64, generator=g).to(torch.bfloat16),
        "bias": torch.randn(16384, generator=g),
    }
    file = tmp_path / "model.safetensors"
    save_file(stored, file)
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        for key, want in load_file(file).items():
            got = ckpt.read(key)
            assert got.untyped_storage().resizable(), key
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), key
    with pytest.raises(qbridge.CheckpointError, match=r"reading 'norm' failed: the checkpoint is closed"):
        ckpt.read("norm")
    ckpt = qbridge.open_checkpoint(tmp_path)
    try:
        os.truncate(file, 5)  # into the header, before any tensor was read
        with pytest.raises(qbridge.CheckpointError, match=r"model.safetensors: reading 'norm' failed"):
            ckpt.read("norm")
    finally:
        ckpt.close()


def test_a_missing_key_is_named_with_the_closest_one_held(tmp_path):
    """A key the checkpoint lacks fails when it is read or read ahead (read ahead used to return 0 for it),
    naming the closest key the checkpoint holds."""
    from safetensors.torch import save_file

    save_file({"model.layers.0.mlp.down_proj.weight": torch.ones(300, 257)}, tmp_path / "model.safetensors")
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        for call in (ckpt.read, lambda key: ckpt.read_ahead(key, pin=False)):
            with pytest.raises(
                qbridge.CheckpointError,
                match=r"no tensor 'model.layers.0.mlp.down_proj.weights'; did you mean "
                r"'model.layers.0.mlp.down_proj.weight'\?",
            ):
                call("model.layers.0.mlp.down_proj.weights")
            with pytest.raises(qbridge.CheckpointError, match=r"no tensor 'lm_head.weight'$"):
                call("lm_head.weight")


def test_the_first_damaged_piece_named_is_as_before(tmp_path, dense_dir):
    """With several damaged pieces, the error names the first in the order absmax, nested_absmax,
    quant_map, nested_quant_map, whatever order the checkpoint stores them in."""
    from safetensors.torch import load_file, save_file

    bnb_llama(dense_dir, tmp_path / "q", quant_type="nf4", nested=True)
    (tmp_path / "bad").mkdir()
    for f in (tmp_path / "q").iterdir():
        (tmp_path / "bad" / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    weight = "model.layers.1.mlp.up_proj.weight"
    tensors[f"{weight}.quant_map"][3] = float("nan")
    tensors[f"{weight}.nested_absmax"][0] = float("inf")
    save_file(tensors, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    for keep in (False, True):
        with pytest.raises(qbridge.CheckpointError, match=rf"{weight}.nested_absmax\].*NaN or Inf"):
            qbridge.load_checkpoint(tmp_path / "bad", device="cpu", keep_quantized=keep, progress=False)


def test_reading_threads_are_started_once_per_process(dense_dir, monkeypatch):
    """The reading threads serve every load of the process: starting them per load cost about a tenth of a
    small checkpoint's load on a GPU host."""
    import threading

    import qbridge._checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "READ_AHEAD_MIN_BYTES", 0)

    def readers():
        return {t.ident for t in threading.enumerate() if t.name.startswith("qbridge-read")}

    qbridge.load_checkpoint(dense_dir, device="cpu", progress=False)
    pool, first = checkpoint._pools["read"], readers()
    assert 0 < len(first) <= checkpoint.READ_THREADS
    for _ in range(2):
        qbridge.load_checkpoint(dense_dir, device="cpu", progress=False)
        # the same pool, its threads still there; it may add one up to READ_THREADS when all of its
        # threads are busy at a submit (ThreadPoolExecutor starts its threads as work comes)
        later = readers()
        assert checkpoint._pools["read"] is pool
        assert first <= later and len(later) <= checkpoint.READ_THREADS


class _Terminal:
    """A stand-in for a terminal's stderr: says it is one and keeps what is written."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_the_progress_bar_draws_on_terminals_only_and_at_its_own_pace(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(4, 8) for i in range(300)}
    save_file(tensors, tmp_path / "model.safetensors")
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    params = qbridge.load_checkpoint(tmp_path, device="cpu")
    assert len(jax.tree.leaves(params)) == 300
    drawn = "".join(terminal.writes)
    assert "qbridge:" in drawn  # a bar was drawn on the terminal
    assert drawn.count("\r") < 60, drawn.count("\r")  # redrawn at tqdm's pace, not once per tensor
    piped = _Terminal()
    piped.isatty = lambda: False  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stderr", piped)
    qbridge.load_checkpoint(tmp_path, device="cpu")
    assert piped.writes == []  # a log file or a pipe gets no bar


def test_rename_without_a_target_names_the_paths_and_rules_that_match_nothing_warn_at_the_caller(tmp_path):
    from safetensors.torch import save_file

    w = torch.randn(4, 3)
    save_file(
        {"base.model.l1.weight": w, "base.model.norm.weight": torch.ones(3)}, tmp_path / "model.safetensors"
    )
    params = qbridge.load_checkpoint(tmp_path, device="cpu", progress=False, rename={r"^base\.model\.": ""})
    assert set(params["params"]) == {"l1", "norm"}
    np.testing.assert_array_equal(np.asarray(params["params"]["l1"]["kernel"]), w.numpy().T)
    with pytest.warns(UserWarning, match=r"the rename rule '\^nowhere' matched no checkpoint key") as seen:
        qbridge.load_checkpoint(tmp_path, device="cpu", progress=False, rename={"^nowhere": ""})
    assert seen[0].filename == __file__  # it points at the caller's line, not inside qbridge
    # a rename of the tensor's own name reaches only the module path: the layout stays the weight's
    with pytest.warns(UserWarning, match=r"renaming reaches the module path only"):
        renamed = qbridge.load_checkpoint(
            tmp_path, device="cpu", progress=False, rename={r"\.weight$": ".kernel"}
        )
    np.testing.assert_array_equal(np.asarray(renamed["params"]["base"]["model"]["l1"]["kernel"]), w.numpy().T)
    assert set(renamed["params"]["base"]["model"]["norm"]) == {"scale"}
    target = {"params": {"proj": {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32)}}}
    save_file({"a.l1.weight": w, "b.l1.weight": w.clone()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"rename makes 'a.l1.weight' and 'b.l1.weight' both 'proj.weight'"):
        qbridge.load_checkpoint(tmp_path, target=target, device="cpu", progress=False, strict=False,
                                rename={r"^(a|b)\.l1": "proj"})  # fmt: skip


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_4bit_quant_map_bitsandbytes_does_not_read(tmp_path, dense_dir, quant_type):
    """bitsandbytes' dequantize_4bit takes the table of quant_type and never reads a weight's quant_map:
    an edited one (here doubled) decodes as the unedited checkpoint does, dense and kept quantized, and
    is warned about by name."""
    from safetensors.torch import load_file, save_file

    bnb_llama(dense_dir, tmp_path / "q", quant_type=quant_type, nested=True)
    (tmp_path / "edited").mkdir()
    for f in (tmp_path / "q").iterdir():
        (tmp_path / "edited" / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight.quant_map"
    tensors[key] = tensors[key] * 2
    save_file(tensors, tmp_path / "edited" / "model.safetensors", metadata={"format": "pt"})
    for keep in (False, True):
        want = qbridge.load_checkpoint(tmp_path / "q", device="cpu", keep_quantized=keep, progress=False)
        with pytest.warns(UserWarning, match=rf"{key}.*differs from bitsandbytes' {quant_type} table"):
            got = qbridge.load_checkpoint(
                tmp_path / "edited", device="cpu", keep_quantized=keep, progress=False
            )
        kernel = got["params"]["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]
        if keep:
            kernel = kernel.dequantize()
            want_kernel = want["params"]["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"].dequantize()
        else:
            want_kernel = want["params"]["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]
        assert_same_bits(np.asarray(kernel), np.asarray(want_kernel))
    # the standard table stored in a narrower dtype (a converter that casts every float tensor): its values
    # rounded, no news, no warning; the same values
    tensors[key] = load_file(tmp_path / "q" / "model.safetensors")[key].to(torch.bfloat16)
    save_file(tensors, tmp_path / "edited" / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = qbridge.load_checkpoint(tmp_path / "edited", device="cpu", progress=False)
    want = qbridge.load_checkpoint(tmp_path / "q", device="cpu", progress=False)
    path = ("params", "model", "layers", "0", "mlp", "down_proj", "kernel")
    assert_same_bits(np.asarray(_at(got, path)), np.asarray(_at(want, path)))


def _at(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def test_materialize_writes_a_4bit_weight_into_out_and_refuses_what_it_cannot_write(tmp_path):
    """``materialize(out=)`` (the loader's route into XLA's arrays, there on GPUs) gives the bits of a call
    without it, in ``out`` itself; a weight whose layout needs work after the kernel, or an ``out`` of another
    shape, dtype or device or not contiguous, is refused with ValueError before anything is decoded."""
    from helpers import bnb_quantize
    from safetensors.torch import save_file

    from qbridge._checkpoint import open_checkpoint
    from qbridge._decode import materialize, written_by_kernel
    from qbridge._loader import plan_load

    stored = {}
    for i, shape in enumerate([(130, 4095), (64, 96)]):
        _, packed, qs = bnb_quantize(shape, quant_type="nf4" if i else "fp4", nested=bool(i), seed=i)
        stored[f"m{i}.weight"] = packed
        stored.update({f"m{i}.weight.{k}": v for k, v in qs.as_dict(packed=True).items()})
    stored["norm.weight"] = torch.randn(96).bfloat16()
    save_file(stored, tmp_path / "model.safetensors")
    cpu = torch.device("cpu")
    with open_checkpoint(tmp_path) as ckpt:
        _, plan, _, _ = plan_load(ckpt, None)
        by_key = {p.key: p for p in plan}
        for key in ("m0.weight", "m1.weight"):
            p, entry = by_key[key], ckpt.entries[key]
            shape = written_by_kernel(entry, p.rule)
            assert shape == (entry.shape[1], entry.shape[0])  # a Linear kernel: transposed by the kernel
            want = materialize(ckpt, entry, cpu, p.rule)
            out = torch.full(shape, float("nan"), dtype=entry.dtype)
            got = materialize(ckpt, entry, cpu, p.rule, out=out)
            assert got is out
            assert_same_bits(to_numpy(got), to_numpy(want))
            for bad in (
                torch.empty(entry.shape, dtype=entry.dtype),  # not transposed
                torch.empty(shape, dtype=torch.float32),
                torch.empty((shape[1], shape[0]), dtype=entry.dtype).t(),  # the shape, not contiguous
            ):
                with pytest.raises(ValueError, match=rf"materialize\(out=\) for {key} takes a contiguous"):
                    materialize(ckpt, entry, cpu, p.rule, out=bad)
        p, entry = by_key["norm.weight"], ckpt.entries["norm.weight"]
        assert written_by_kernel(entry, p.rule) is None
        with pytest.raises(ValueError, match="writes 4-bit weights that need no copy"):
            materialize(ckpt, entry, cpu, p.rule, out=torch.empty(96, dtype=torch.bfloat16))
