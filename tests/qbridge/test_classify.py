"""Checkpoints as they come: every tensor classified by rule (parameter or not, which module kind owns it,
which stored layout), every decode exactly the producer's, every shared dtype crossing. Fixtures are made by
the real producers (transformers + bitsandbytes, torch.save, safetensors) and checked against the producers'
own decoders or plain numpy, never against qbridge."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import traceback
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from checkpoints import LLAMA, fp8_quantize
from helpers import assert_same_bits, to_numpy
from safetensors import safe_open

import jax_side
import qbridge
import torch_side
from qbridge import CheckpointError
from qbridge.parity import assert_parity

transformers = pytest.importorskip("transformers")
nnx = pytest.importorskip("flax.nnx")
bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")
st = pytest.importorskip("safetensors.torch")
transformers.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()

GPT2 = dict(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)


def _llama(path: pathlib.Path, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    model = (
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides}))
        .to(torch.bfloat16)
        .eval()
    )
    model.save_pretrained(path)
    return model


def _bin(model: torch.nn.Module, path: pathlib.Path, state: dict | None = None) -> None:
    """A ``.bin`` checkpoint as transformers 4 wrote them: ``torch.save`` of the state dict (tied tensors kept)."""
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state if state is not None else model.state_dict(), path / "pytorch_model.bin")
    model.config.save_pretrained(path)


def _target(path: pathlib.Path, dtype=jnp.bfloat16):
    config = jax_side.LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
    return config, jax_side.abstract_llama(config, param_dtype=dtype)


# --- kind 1: leftover tensors that are legitimately no parameters ------------------------------------


def test_a_tied_copy_in_a_bin_is_skipped_by_rule(tmp_path):
    model = _llama(tmp_path / "st", tie_word_embeddings=True)
    _bin(model, tmp_path / "bin")
    assert "lm_head.weight" in torch.load(tmp_path / "bin" / "pytorch_model.bin", weights_only=True)
    config, target = _target(tmp_path / "bin")
    params, report = qbridge.load_checkpoint(
        tmp_path / "bin", target=target, progress=False, return_report=True
    )
    assert report.skipped == ["lm_head.weight"]
    assert report.skip_reasons["lm_head.weight"].startswith("tied to model.embed_tokens.weight")
    assert "lm_head.weight (tied to model.embed_tokens.weight" in str(report)
    flax_model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
    nnx.update(flax_model, params)
    ids = np.random.default_rng(0).integers(0, LLAMA["vocab_size"], (2, 9))
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits
    assert_parity({"logits": want}, {"logits": flax_model(jnp.asarray(ids))})
    by_name, report = qbridge.load_checkpoint(tmp_path / "bin", progress=False, return_report=True)
    assert "lm_head" not in by_name["params"] and report.skip_reasons.keys() == {"lm_head.weight"}


def test_a_tied_name_that_holds_other_values_stays_a_parameter(tmp_path):
    model = _llama(tmp_path / "st", tie_word_embeddings=True)
    state = dict(model.state_dict())
    state["lm_head.weight"] = (
        state["lm_head.weight"].clone() + 1
    )  # the config says tied; the file says otherwise
    _bin(model, tmp_path / "bin", state)
    _, target = _target(tmp_path / "bin")
    with pytest.raises(jax_side.MatchError, match=r"unused: checkpoint tensor 'lm_head.weight'") as e:
        qbridge.load_checkpoint(tmp_path / "bin", target=target, progress=False)
    assert "'lm_head.weight' is kept as a parameter of its own: " in str(e.value)
    assert "ties it to 'model.embed_tokens.weight', but the checkpoint holds different values" in str(e.value)
    # one traceback block, the note in it: not the plain refusal first and the note in a chained one
    assert e.value.__suppress_context__ and e.value.__cause__ is None
    printed = "".join(traceback.format_exception(e.value))
    assert (
        printed.count("Traceback (most recent call last)") == 1
        and "kept as a parameter of its own" in printed
    )
    assert "plan_for_target" in printed  # where the refusal was raised is still shown


def test_a_tied_output_layer_stored_quantized_apart_from_the_embedding_is_named_as_the_cause(tmp_path):
    """torchao's ``quantize_`` of a tied Llama quantizes ``lm_head`` and leaves the embedding dense, while
    config.json still ties them: the tied target has no leaf for it, and the refusal says why."""
    ao = pytest.importorskip("torchao.quantization")
    model = _llama(tmp_path / "st", tie_word_embeddings=True)
    ao.quantize_(model, ao.Int8WeightOnlyConfig())
    assert torch_side.is_quant_tensor_subclass(model.lm_head.weight)
    assert not torch_side.is_quant_tensor_subclass(model.model.embed_tokens.weight)
    _bin(model, tmp_path / "bin")
    _, target = _target(tmp_path / "bin")
    with pytest.raises(jax_side.MatchError) as e:
        qbridge.load_checkpoint(tmp_path / "bin", target=target, progress=False)
    message = str(e.value)
    assert "unused: checkpoint tensor 'lm_head.weight' fills no target leaf" in message
    assert (
        "ties it to 'model.embed_tokens.weight', but the checkpoint stores 'lm_head.weight' quantized and the "
        "other not; load it into a target with an output layer of its own, e.g. jax_side's Llama built from "
        "LlamaConfig.from_hf({**config_json, 'tie_word_embeddings': False})" in message
    )


def test_fp8_activation_kv_and_probability_scales_are_skipped(tmp_path):
    _llama(tmp_path / "dense")
    state = st.load_file(tmp_path / "dense" / "model.safetensors")
    flat = {}
    for key, value in state.items():
        if key.endswith("_proj.weight"):
            q, s = fp8_quantize(value)
            flat[key], flat[key.replace(".weight", ".weight_scale_inv")] = q, s
            flat[key.replace(".weight", ".input_scale")] = torch.tensor(0.5)
        else:
            flat[key] = value
    for i in range(LLAMA["num_hidden_layers"]):
        for name in ("k_scale", "v_scale", "q_scale", "prob_scale"):
            flat[f"model.layers.{i}.self_attn.{name}"] = torch.tensor(1.0)
    (tmp_path / "fp8").mkdir()
    st.save_file(flat, tmp_path / "fp8" / "model.safetensors")
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    (tmp_path / "fp8" / "config.json").write_text(
        json.dumps({**cfg, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    )
    _, target = _target(tmp_path / "dense")
    _, report = qbridge.load_checkpoint(tmp_path / "fp8", target=target, progress=False, return_report=True)
    assert len(report.skipped) == 2 * 7 + 2 * 4
    assert report.skip_reasons["model.layers.1.self_attn.prob_scale"] == "FP8 attention-probability scale"
    assert report.skip_reasons["model.layers.0.mlp.up_proj.input_scale"] == "FP8 static activation scale"
    by_name = qbridge.load_checkpoint(tmp_path / "fp8", progress=False)["params"]
    assert "k_scale" not in by_name["model"]["layers"]["0"]["self_attn"]
    assert "input_scale" not in by_name["model"]["layers"]["0"]["mlp"]["up_proj"]
    # in a plain checkpoint the same name is no documented scale: a parameter like any other
    plain = {**state, "model.layers.0.self_attn.k_scale": torch.ones(4)}
    (tmp_path / "plain").mkdir()
    st.save_file(plain, tmp_path / "plain" / "model.safetensors")
    (tmp_path / "plain" / "config.json").write_text(json.dumps(cfg))
    assert (
        "k_scale"
        in qbridge.load_checkpoint(tmp_path / "plain", progress=False)["params"]["model"]["layers"]["0"][
            "self_attn"
        ]
    )


def test_buffers_and_caches_are_skipped_with_their_reasons(tmp_path):
    model = _llama(tmp_path / "st")
    state = dict(model.state_dict())
    state["model.rotary_emb.inv_freq"] = (
        model.model.rotary_emb.inv_freq
    )  # a non-persistent buffer, saved by old code
    state["model.embed_tokens.position_ids"] = torch.arange(16)[None]
    _bin(model, tmp_path / "bin", state)
    _, target = _target(tmp_path / "st")
    _, report = qbridge.load_checkpoint(tmp_path / "bin", target=target, progress=False, return_report=True)
    assert report.skip_reasons == {
        "model.rotary_emb.inv_freq": "rotary-embedding cache",
        "model.embed_tokens.position_ids": "position-id buffer",
    }
    summary = qbridge.inspect_checkpoint(tmp_path / "bin")
    assert "no parameters" in str(summary) and summary.skip_reasons["model.rotary_emb.inv_freq"]


def test_gpt2s_legacy_attention_buffers_are_no_parameters(tmp_path):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).eval()
    state = dict(model.state_dict())
    n = GPT2["n_positions"]
    for i in range(GPT2["n_layer"]):  # what transformers 4.x saved for GPT-2: a causal mask and a constant
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    _bin(model, tmp_path / "bin", state)
    params, report = qbridge.load_checkpoint(tmp_path / "bin", progress=False, return_report=True)
    assert report.skip_reasons["transformer.h.0.attn.bias"] == "causal-mask buffer"
    assert report.skip_reasons["transformer.h.1.attn.masked_bias"] == "attention-mask constant"
    assert "lm_head.weight" in report.skipped  # tied to transformer.wte.weight
    assert set(params["params"]["transformer"]["h"]["0"]["attn"]) == {"c_attn", "c_proj"}


# --- kind 2: every decode in the producer's order of operations ---------------------------------------


def test_int8_decode_is_bitsandbytes_bit_for_bit():
    cb = torch.tensor([[92]], dtype=torch.int8)
    scb = torch.tensor([0x3ED3F275], dtype=torch.int32).view(torch.float32)
    want = F.int8_vectorwise_dequant(cb, scb)
    assert_same_bits(to_numpy(torch_side.dequantize_int8(cb, scb)), to_numpy(want))
    assert float(want) == pytest.approx(0.299875944852829, abs=0)  # the issue's value, not 0.2998759150505066
    gen = torch.Generator().manual_seed(0)
    cb = torch.randint(-127, 128, (768, 768), dtype=torch.int8, generator=gen)
    scb = torch.rand(768, generator=gen) * 3
    assert_same_bits(
        to_numpy(torch_side.dequantize_int8(cb, scb)), to_numpy(F.int8_vectorwise_dequant(cb, scb))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_checkpoint_and_int8params_agree_with_bitsandbytes(tmp_path, dtype):
    model = _llama(tmp_path / "dense")
    if dtype == torch.float32:
        model.float().save_pretrained(tmp_path / "dense")
    q = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense",
        quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True),
        dtype=dtype,
        device_map="cpu",
    )
    q.save_pretrained(tmp_path / "int8")
    state = qbridge.dequantized_state(tmp_path / "int8")
    assert not [k for k in state if k.endswith("weight_format")]  # the int8 layout tags: not the model's
    for name, module in q.named_modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            want = F.int8_vectorwise_dequant(module.weight.data, module.weight.SCB).to(dtype)
            assert_same_bits(to_numpy(state[f"{name}.weight"]), to_numpy(want))
            assert_same_bits(to_numpy(torch_side.dequantize_weight(module.weight).to(dtype)), to_numpy(want))


def _int8_checkpoint(tmp_path: pathlib.Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """transformers' 8-bit model of a small Llama saved to ``tmp_path / "int8"``, and the tensors it wrote."""
    _llama(tmp_path / "dense")
    q = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense",
        quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True),
        device_map="cpu",
    )
    q.save_pretrained(tmp_path / "int8")
    return q, st.load_file(tmp_path / "int8" / "model.safetensors")


def test_an_int8_weight_without_its_scb_is_refused_by_name(tmp_path):
    """An 8-bit checkpoint missing one weight's SCB had loaded that weight's int8 values as its kernel (and
    inspect counted it dense); it is refused, by name, whether its weight_format tag or the config says
    8-bit."""
    from safetensors.torch import save_file

    _, tensors = _int8_checkpoint(tmp_path)
    base = "model.layers.0.self_attn.q_proj"
    del tensors[f"{base}.SCB"]
    for drop_tag in (False, True):  # known by its weight_format tag, or by the config alone
        if drop_tag:
            del tensors[f"{base}.weight_format"]
        save_file(tensors, tmp_path / "int8" / "model.safetensors", metadata={"format": "pt"})
        for call in (qbridge.load_checkpoint, qbridge.inspect_checkpoint, qbridge.dequantized_state):
            with pytest.raises(
                qbridge.CheckpointError, match=rf"{base}\.weight.*without its row scales {base}\.SCB"
            ):
                call(tmp_path / "int8")


def test_an_8bit_weight_in_a_layout_other_than_row_or_not_int8_is_refused_by_name(tmp_path):
    """bitsandbytes loads only row-layout 8-bit weights (its load hook refuses any other weight_format tag);
    such a weight had been decoded as if its bytes were rows, silently. Each tag value is checked as
    bitsandbytes checks it, against bitsandbytes' own hook."""
    from bitsandbytes.nn.modules import maybe_rearrange_weight
    from safetensors.torch import save_file

    q, tensors = _int8_checkpoint(tmp_path)
    base = "model.layers.0.mlp.down_proj"
    assert tensors[f"{base}.weight_format"].item() == 0  # what bitsandbytes writes
    for tag, words in [(2, "'col_turing' layout (2)"), (1, "'col32' layout (1)"), (7, "unknown layout 7")]:
        tensors[f"{base}.weight_format"] = torch.tensor(tag, dtype=torch.uint8)
        with pytest.raises(ValueError):  # bitsandbytes refuses it too
            maybe_rearrange_weight(dict(tensors), f"{base}.", None, True, [], [], [])
        save_file(tensors, tmp_path / "int8" / "model.safetensors", metadata={"format": "pt"})
        for call in (qbridge.load_checkpoint, qbridge.dequantized_state):
            with pytest.raises(
                qbridge.CheckpointError, match=rf"{base}\.weight_format.*{re.escape(words)}, not 'row'"
            ):
                call(tmp_path / "int8")
    stored = tensors[f"{base}.weight"]
    tensors[f"{base}.weight"] = stored.view(torch.uint8)  # the int8 bytes under another dtype
    save_file(tensors, tmp_path / "int8" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        qbridge.CheckpointError, match=rf"{base}\.SCB\]: the row scales .* stored as torch\.uint8, not int8"
    ):
        qbridge.load_checkpoint(tmp_path / "int8")
    tensors[f"{base}.weight"] = stored
    tensors[f"{base}.weight_format"] = torch.tensor([0.0, 0.0])
    save_file(tensors, tmp_path / "int8" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        qbridge.CheckpointError, match=r"weight-layout tag must be one integer, got torch\.float32"
    ):
        qbridge.load_checkpoint(tmp_path / "int8")
    tensors[f"{base}.weight_format"] = torch.tensor(False)  # bitsandbytes takes False for 0, row: so do we
    save_file(tensors, tmp_path / "int8" / "model.safetensors", metadata={"format": "pt"})
    maybe_rearrange_weight(dict(tensors), f"{base}.", None, True, [], [], [])
    qbridge.load_checkpoint(tmp_path / "int8")
    tensors[f"{base}.weight_format"] = torch.tensor(0, dtype=torch.uint8)  # row again: loads, as before
    save_file(tensors, tmp_path / "int8" / "model.safetensors", metadata={"format": "pt"})
    state = qbridge.dequantized_state(tmp_path / "int8")
    module = q.model.layers[0].mlp.down_proj
    want = F.int8_vectorwise_dequant(module.weight.data, module.weight.SCB).to(state[f"{base}.weight"].dtype)
    assert_same_bits(to_numpy(state[f"{base}.weight"]), to_numpy(want))


def test_an_8bit_config_that_kept_floating_weights_loads_them(tmp_path):
    """With llm_int8_has_fp16_weight, bitsandbytes' 8-bit layers keep their floating weights, and
    save_pretrained writes them unquantized: they load as they are (they had been refused)."""
    _llama(tmp_path / "dense")
    q = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense",
        quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True),
        device_map="cpu",
    )
    assert isinstance(q.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    q.save_pretrained(tmp_path / "q")
    state = qbridge.dequantized_state(tmp_path / "q")
    for name, p in q.state_dict().items():
        if name in state:
            assert_same_bits(to_numpy(state[name]), to_numpy(p))
    assert {f"{n}.weight" for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)} <= set(state)
    params = qbridge.load_checkpoint(tmp_path / "q", device="cpu")
    kernel = params["params"]["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]
    assert_same_bits(np.asarray(kernel).T, to_numpy(q.model.layers[0].mlp.down_proj.weight))


# --- kind 3: every dtype torch, safetensors and JAX share crosses -------------------------------------


def test_every_shared_dtype_crosses_both_ways():
    from qbridge._dtypes import TORCH_TO_JAX

    assert {torch.float8_e8m0fnu, torch.float8_e4m3fn, torch.uint16, torch.complex64} <= set(TORCH_TO_JAX)
    wide = (torch.int64, torch.uint64, torch.float64, torch.complex128)  # JAX narrows these with x64 off
    for tdtype in TORCH_TO_JAX:
        if tdtype in wide:
            continue
        raw = torch.arange(1, 7, dtype=torch.uint8).repeat_interleave(tdtype.itemsize).view(tdtype)
        if tdtype == torch.bool:
            raw = torch.tensor([True, False, True])
        x = qbridge.to_jax(raw)
        assert np.dtype(x.dtype) == TORCH_TO_JAX[tdtype]
        back = qbridge.to_torch(jnp.copy(x))  # an array XLA made, back to torch
        assert back.dtype == tdtype and torch.equal(back.view(torch.uint8), raw.view(torch.uint8)), tdtype
    with pytest.raises(TypeError, match="JAX has no complex32"):
        qbridge.to_jax(torch.zeros(2, dtype=torch.complex32))
    with pytest.raises(TypeError, match=r"torch .* has no float4_e2m1fn"):
        qbridge.to_torch(jnp.zeros(2, jnp.float4_e2m1fn))


def _e8m0_fp8_checkpoint(path: pathlib.Path, shape=(200, 300)) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(shape, generator=gen) * 20).to(torch.float8_e4m3fn)
    exponents = torch.randint(
        120, 134, (-(-shape[0] // 128), -(-shape[1] // 128)), generator=gen, dtype=torch.uint8
    )
    path.mkdir()
    st.save_file(
        {"layer.weight": w, "layer.weight_scale_inv": exponents.view(torch.float8_e8m0fnu)},
        path / "model.safetensors",
    )
    (path / "config.json").write_text(
        json.dumps(
            {
                "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
                "torch_dtype": "float32",
            }
        )
    )
    return w.view(torch.uint8).numpy(), exponents.numpy()


def test_fp8_checkpoints_with_power_of_two_e8m0_scales(tmp_path):
    w_bytes, exponents = _e8m0_fp8_checkpoint(tmp_path / "e8m0")
    import ml_dtypes

    scale = np.exp2(exponents.astype(np.float64) - 127).astype(np.float32)  # F8_E8M0: 2 ** (byte - 127)
    expanded = np.repeat(np.repeat(scale, 128, 0), 128, 1)[: w_bytes.shape[0], : w_bytes.shape[1]]
    want = w_bytes.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * expanded
    params, report = qbridge.load_checkpoint(tmp_path / "e8m0", progress=False, return_report=True)
    assert report.format == "fp8"
    assert_same_bits(np.asarray(params["params"]["layer"]["kernel"]).T, want)
    jax_w = jax_side.dequantize_fp8(
        w_bytes.view(ml_dtypes.float8_e4m3fn), exponents.view(ml_dtypes.float8_e8m0fnu), dtype=jnp.float32
    )
    assert_same_bits(np.asarray(jax_w), want)


# --- kind 4: scale layouts agree with each other and with their messages --------------------------------


@pytest.mark.parametrize(
    ("weight", "scale", "block", "kind"),
    [((300, 300), (), (128, 128), "tensor"), ((300, 300), (1, 1), (128, 128), "tensor"), ((300, 300), (1,), None, "tensor"),
     ((300, 300), (300, 1), (128, 128), "row"), ((300, 300), (300,), None, "row"), ((300, 300), (3, 3), (128, 128), "block"),
     ((576, 7168), (5, 56), None, "block"), ((4, 300, 200), (4, 3, 2), (128, 128), "block"), ((4, 300, 200), (4,), None, "tensor")],
)  # fmt: skip
def test_scale_layout_rules_agree_on_both_sides(weight, scale, block, kind):
    ours = torch_side.fp8_scale_layout(weight, scale, block)
    assert ours.kind == kind
    assert tuple(jax_side.fp8_scale_layout(weight, scale, block)) == tuple(ours)


def test_a_rejected_scale_is_told_what_fits():
    for side in (torch_side, jax_side):
        with pytest.raises(ValueError) as info:
            side.fp8_scale_layout((300, 300), (2, 2), (128, 128))
        message = str(info.value)
        assert (
            "takes a per-tensor scale (one element, any shape), per-row scales [300, 1] or block scales (3, 3)"
            in message
        )
        side.fp8_scale_layout((300, 300), (1, 1, 1), (128, 128))  # one element is accepted whatever its shape


# --- kind 5: stacked experts ---------------------------------------------------------------------------


def test_stacked_fp8_experts_decode_per_expert_and_lay_out_for_flax(tmp_path):
    experts, rows, cols = 3, 200, 300  # partial tiles in both directions
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(experts, rows, cols, generator=gen) * 30).to(torch.float8_e4m3fn)
    scale = (
        torch.rand(experts, 2, 3, generator=gen) * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]
    )  # far apart per expert
    (tmp_path / "moe").mkdir()
    st.save_file(
        {"model.layers.0.mlp.experts.weight": w, "model.layers.0.mlp.experts.weight_scale_inv": scale},
        tmp_path / "moe" / "model.safetensors",
    )
    (tmp_path / "moe" / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    )
    import ml_dtypes

    wf = w.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    want = np.stack(
        [wf[e] * np.repeat(np.repeat(scale[e].numpy(), 128, 0), 128, 1)[:rows, :cols] for e in range(experts)]
    )
    want = want.astype(ml_dtypes.bfloat16)
    params = qbridge.load_checkpoint(tmp_path / "moe", progress=False, kinds={"experts": "stacked_linear"})[
        "params"
    ]
    kernel = np.asarray(params["model"]["layers"]["0"]["mlp"]["experts"]["kernel"])
    assert kernel.shape == (experts, cols, rows)  # [E, in, out]
    assert_same_bits(kernel, want.transpose(0, 2, 1))


# --- kinds 6 and 7: layouts from the producer and the owning module, not from names or shapes ----------


def _flax_gpt2_target():
    """The parameter structure of transformers' FlaxGPT2LMHeadModel (FlaxConv1D kernels are [out, in])."""
    e = GPT2["n_embd"]
    layer = {"ln_1": {"scale": (e,), "bias": (e,)}, "ln_2": {"scale": (e,), "bias": (e,)},
             "attn": {"c_attn": {"kernel": (3 * e, e), "bias": (3 * e,)}, "c_proj": {"kernel": (e, e), "bias": (e,)}},
             "mlp": {"c_fc": {"kernel": (4 * e, e), "bias": (4 * e,)}, "c_proj": {"kernel": (e, 4 * e), "bias": (e,)}}}  # fmt: skip
    tree = {"transformer": {"wte": {"embedding": (GPT2["vocab_size"], e)}, "wpe": {"embedding": (GPT2["n_positions"], e)},
                            "ln_f": {"scale": (e,), "bias": (e,)}, "h": {str(i): layer for i in range(GPT2["n_layer"])}}}  # fmt: skip
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32), tree, is_leaf=lambda x: isinstance(x, tuple)
    )


class _Attn(nnx.Module):
    def __init__(self, e, rngs):
        self.c_attn, self.c_proj = nnx.Linear(e, 3 * e, rngs=rngs), nnx.Linear(e, e, rngs=rngs)


class _Mlp(nnx.Module):
    def __init__(self, e, rngs):
        self.c_fc, self.c_proj = nnx.Linear(e, 4 * e, rngs=rngs), nnx.Linear(4 * e, e, rngs=rngs)


class _Block(nnx.Module):
    def __init__(self, e, rngs):
        self.ln_1, self.ln_2 = nnx.LayerNorm(e, rngs=rngs), nnx.LayerNorm(e, rngs=rngs)
        self.attn, self.mlp = _Attn(e, rngs), _Mlp(e, rngs)


class _Body(nnx.Module):
    def __init__(self, rngs):
        e = GPT2["n_embd"]
        self.wte = nnx.Embed(GPT2["vocab_size"], e, rngs=rngs)
        self.wpe = nnx.Embed(GPT2["n_positions"], e, rngs=rngs)
        self.h = nnx.List([_Block(e, rngs) for _ in range(GPT2["n_layer"])])
        self.ln_f = nnx.LayerNorm(e, rngs=rngs)


class _NnxGpt2(nnx.Module):
    """A GPT-2 port that uses nnx.Linear (kernel [in, out]) where transformers has Conv1D."""

    def __init__(self, rngs):
        self.transformer = _Body(rngs)


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).save_pretrained(root / "plain")
    for bits in (4, 8):
        config = transformers.BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
        q = transformers.AutoModelForCausalLM.from_pretrained(root / "plain", quantization_config=config, device_map="cpu",
                                                              dtype=torch.float32)  # transformers 4 would pick float16  # fmt: skip
        q.save_pretrained(root / f"int{bits}")
    return root


def _gpt2_weight(root, name, which):
    """``transformer.h.0.attn.c_proj``'s weight as the producer decodes it, in the producer's stored order."""
    if which == "plain":
        model = transformers.GPT2LMHeadModel.from_pretrained(root / "plain")
        return model.get_submodule(name).weight.detach().numpy()  # Conv1D: [in, out]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        root / which, device_map="cpu", dtype=torch.float32
    )
    w = model.get_submodule(name).weight  # bitsandbytes lays Conv1D out as a Linear: [out, in]
    return to_numpy(
        F.dequantize_4bit(w.data, w.quant_state)
        if which == "int4"
        else F.int8_vectorwise_dequant(w.data, w.SCB)
    )


@pytest.mark.parametrize("which", ["plain", "int4", "int8"])
def test_gpt2_conv1d_into_the_flax_gpt2_layout(gpt2_dirs, which):
    params, report = qbridge.load_checkpoint(
        gpt2_dirs / which, target=_flax_gpt2_target(), progress=False, return_report=True
    )
    assert "GPT2LMHeadModel" in report.classified_by
    for name in ("transformer.h.0.attn.c_proj", "transformer.h.1.mlp.c_fc", "transformer.h.1.attn.c_attn"):
        node = params
        for part in name.split("."):
            node = node[part]
        stored = _gpt2_weight(gpt2_dirs, name, which)
        want = stored.T if which == "plain" else stored  # FlaxConv1D holds [out, in]
        assert_same_bits(np.asarray(node["kernel"]), want)


@pytest.mark.parametrize("which", ["plain", "int4", "int8"])
def test_gpt2_checkpoints_are_checked_against_their_models_sizes_without_a_target(gpt2_dirs, which, tmp_path):
    """Conv1D weights are stored [in, out] plain and [out, in] quantized: both agree with the config's model
    (strict loads raise on any difference), and a config of another n_inner names the Conv1D weights."""
    qbridge.load_checkpoint(gpt2_dirs / which, progress=False, device="cpu")
    other = tmp_path / which
    shutil.copytree(gpt2_dirs / which, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "n_inner": 128}))
    with pytest.raises(CheckpointError) as info:
        qbridge.load_checkpoint(other, progress=False, device="cpu")
    text = str(info.value)
    assert "GPT2LMHeadModel" in text and "6 tensors of other sizes" in text  # c_fc weights and biases, c_proj
    assert "transformer.h.1.mlp.c_fc.weight: the model's [128, 64], the checkpoint's [256, 64]" in text
    assert "transformer.h.1.mlp.c_proj.weight: the model's [64, 128], the checkpoint's [64, 256]" in text


def test_missing_tensors_are_not_claimed_where_the_checkpoint_names_tensors_otherwise(tmp_path):
    """transformers 5 holds Mixtral's experts fused (mlp.experts.gate_up_proj) and converts the stored
    per-expert weights (block_sparse_moe.experts.0.w1) when it loads: the fused names are not missing, even
    where most of the checkpoint's names are the model's. Sizes of the names both share are still checked."""
    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)  # fmt: skip
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**sizes)).save_pretrained(tmp_path / "mixtral")
    with safe_open(tmp_path / "mixtral" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    named = [k for k in keys if ".self_attn." in k or "norm" in k or "embed" in k or "lm_head" in k]
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in keys and 2 * len(named) > len(keys)
    params = qbridge.load_checkpoint(tmp_path / "mixtral", progress=False, device="cpu")["params"]
    assert "block_sparse_moe" in params["model"]["layers"]["1"]
    config = json.loads((tmp_path / "mixtral" / "config.json").read_text())
    (tmp_path / "mixtral" / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    with pytest.raises(CheckpointError) as info:
        qbridge.load_checkpoint(tmp_path / "mixtral", progress=False, device="cpu")
    text = str(info.value)
    assert "4 tensors of other sizes" in text and "of the model missing" not in text
    assert "model.layers.0.self_attn.k_proj.weight: the model's [32, 32], the checkpoint's [16, 32]" in text


def test_tensors_of_layers_or_experts_the_config_does_not_have_are_refused(tmp_path, capsys):
    """A config with fewer layers than the checkpoint (named as the model names its tensors, with numbers
    the model does not have): a load without a target is refused naming them, strict=False loads them with a
    warning, and `qbridge inspect` lists them and exits 1 (the load returned the extra layer without a word
    and inspect exited 0). What the model lets a checkpoint hold (_keys_to_ignore_on_load_unexpected) and
    tensors named otherwise are not counted."""
    from qbridge._cli import main

    layers = LLAMA["num_hidden_layers"]
    _llama(tmp_path / "more")
    config = json.loads((tmp_path / "more" / "config.json").read_text())
    (tmp_path / "more" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers - 1}))
    last = f"model.layers.{layers - 1}"
    with pytest.raises(CheckpointError) as info:
        qbridge.load_checkpoint(tmp_path / "more", progress=False, device="cpu")
    text = str(info.value)
    assert "does not fit its config.json's model" in text and "9 tensors the model does not have" in text
    assert f"not in the model: {last}.mlp.down_proj.weight" in text
    assert "config.json counts fewer layers or experts (num_hidden_layers ...) than the files hold" in text
    with pytest.warns(UserWarning, match="9 tensors the model does not have"):
        params = qbridge.load_checkpoint(tmp_path / "more", progress=False, device="cpu", strict=False)
    assert str(layers - 1) in params["params"]["model"]["layers"]
    summary = qbridge.inspect_checkpoint(tmp_path / "more")
    assert len(summary.config_mismatches) == 9
    assert f"not in the model: {last}.input_layernorm.weight" in summary.config_mismatches
    assert main(["inspect", str(tmp_path / "more")]) == 1
    assert "not in the model" in capsys.readouterr().out
    # the checks themselves: numbered like the model's names, not excused by the model's patterns
    from qbridge._classify import Classification, ModuleInfo, config_mismatches

    model = {f"model.layers.{i}.mlp.experts.{e}.w.weight": (4, 4) for i in range(2) for e in range(3)}
    info = ModuleInfo("M", {}, {}, set(), {}, model, may_have=[r"model\.layers\.61\."])
    stored = {**model, "model.layers.1.mlp.experts.3.w.weight": (4, 4), "model.layers.61.mlp.experts.0.w.weight": (4, 4),
              "model.layers.2.other.weight": (4,), "mtp.layers.0.mlp.experts.0.w.weight": (4, 4)}  # fmt: skip
    unfit = config_mismatches(stored, Classification(), info)
    assert unfit is not None and unfit.unexpected == ["model.layers.1.mlp.experts.3.w.weight"]
    assert unfit.missing == {} and unfit.shapes == []
    info.may_have = []
    assert config_mismatches(stored, Classification(), info).unexpected == [
        "model.layers.1.mlp.experts.3.w.weight", "model.layers.61.mlp.experts.0.w.weight"
    ]  # fmt: skip
    # transformers' own patterns are taken from the model (DeepSeek-V3's multi-token-prediction layer)
    from qbridge._classify import _may_have

    with torch.device("meta"):
        ds = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
            vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8))  # fmt: skip
    assert any(re.search(p, "model.layers.61.eh_proj.weight") for p in _may_have(ds))


def test_tensors_transformers_lets_a_checkpoint_hold_are_not_refused(tmp_path):
    """Gemma-3n as Google publishes it stores keys and values for its KV-shared layers, which transformers
    drops without a word (patterns its text model sets per instance); DeepSeek-V3 stores its
    multi-token-prediction layers after num_hidden_layers (num_nextn_predict_layers; transformers' own
    pattern names only the full model's layer 61). Both load without a target (both were refused as tensors
    the model does not have); without num_nextn_predict_layers DeepSeek-V3's extra layer is refused."""
    kw = dict(vocab_size=128, vocab_size_per_layer_input=128, hidden_size=64, intermediate_size=128,
              num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
              hidden_size_per_layer_input=8, laurel_rank=4, altup_num_inputs=2,
              layer_types=["sliding_attention", "full_attention"] * 3, sliding_window=16,
              activation_sparsity_pattern=[0.0] * 6)  # fmt: skip
    torch.manual_seed(0)
    transformers.Gemma3nForCausalLM(
        transformers.Gemma3nTextConfig(num_kv_shared_layers=0, **kw)
    ).save_pretrained(tmp_path / "gemma3n")
    config = transformers.Gemma3nTextConfig(num_kv_shared_layers=2, **kw)
    config.architectures = ["Gemma3nForCausalLM"]
    config.save_pretrained(tmp_path / "gemma3n")
    _, info = transformers.Gemma3nForCausalLM.from_pretrained(tmp_path / "gemma3n", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]  # transformers loads it without a word
    with safe_open(tmp_path / "gemma3n" / "model.safetensors", "pt") as f:
        assert "model.layers.5.self_attn.k_proj.weight" in f.keys()
    assert qbridge.inspect_checkpoint(tmp_path / "gemma3n").config_mismatches == []
    qbridge.load_checkpoint(tmp_path / "gemma3n", progress=False, device="cpu")

    sizes = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                 first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                 v_head_dim=8, n_group=1, topk_group=1, n_shared_experts=1)  # fmt: skip
    path = tmp_path / "deepseek"
    transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**sizes)).save_pretrained(path)
    state = st.load_file(path / "model.safetensors")
    h, v = sizes["hidden_size"], sizes["vocab_size"]
    state |= {"model.layers.2.eh_proj.weight": torch.randn(h, 2 * h), "model.layers.2.enorm.weight": torch.ones(h),
              "model.layers.2.hnorm.weight": torch.ones(h), "model.layers.2.shared_head.head.weight": torch.randn(v, h),
              "model.layers.2.input_layernorm.weight": torch.ones(h)}  # fmt: skip
    st.save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    assert qbridge.inspect_checkpoint(path).config_mismatches == []
    assert "2" in qbridge.load_checkpoint(path, progress=False, device="cpu")["params"]["model"]["layers"]
    (path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.raises(CheckpointError, match=r"not in the model: model\.layers\.2\.input_layernorm\.weight"):
        qbridge.load_checkpoint(path, progress=False, device="cpu")


def test_a_tied_output_layer_that_is_not_stored_is_not_missing(tmp_path):
    _llama(tmp_path / "tied", tie_word_embeddings=True)
    with safe_open(tmp_path / "tied" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    params = qbridge.load_checkpoint(tmp_path / "tied", progress=False, device="cpu")["params"]
    assert "lm_head" not in params


@pytest.mark.parametrize("which", ["plain", "int4", "int8"])
def test_gpt2_conv1d_into_an_nnx_linear_port(gpt2_dirs, which):
    model = _NnxGpt2(nnx.Rngs(0))
    params = qbridge.load_checkpoint(gpt2_dirs / which, target=model, progress=False)
    stored = _gpt2_weight(gpt2_dirs, "transformer.h.0.attn.c_proj", which)
    want = stored if which == "plain" else stored.T  # nnx.Linear holds [in, out]
    assert_same_bits(np.asarray(params["transformer"]["h"][0]["attn"]["c_proj"]["kernel"]), want)
    if (
        which == "int4"
    ):  # kept quantized where the layer is a Linear: the quantized [out, in] is its kernel's transpose
        kept = qbridge.load_checkpoint(gpt2_dirs / which, target=model, progress=False, keep_quantized=True)
        assert isinstance(kept["transformer"]["h"][0]["attn"]["c_proj"]["kernel"], jax_side.NF4Weight)
        kept_flax = qbridge.load_checkpoint(
            gpt2_dirs / which, target=_flax_gpt2_target(), progress=False, keep_quantized=True
        )
        assert isinstance(
            kept_flax["transformer"]["h"]["0"]["attn"]["c_proj"]["kernel"], jax.Array
        )  # FlaxConv1D: dense


def test_tables_are_embeddings_by_their_module_type_without_a_target(tmp_path):
    config = transformers.BartConfig(vocab_size=64, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(config)
    model.save_pretrained(tmp_path / "bart")
    params, report = qbridge.load_checkpoint(tmp_path / "bart", progress=False, return_report=True)
    positions = params["params"]["model"]["encoder"]["embed_positions"]
    assert list(positions) == ["embedding"] and positions["embedding"].shape == (
        66,
        64,
    )  # BartLearnedPositionalEmbedding
    np.testing.assert_array_equal(
        np.asarray(positions["embedding"]), model.model.encoder.embed_positions.weight.detach().numpy()
    )
    assert (
        "BartForConditionalGeneration built on the meta device" in report.classified_by and not report.guessed
    )
    # without an architecture the module types are unknown: name rules decide, and the report says so
    cfg = json.loads((tmp_path / "bart" / "config.json").read_text())
    cfg.pop("architectures")
    (tmp_path / "bart" / "config.json").write_text(json.dumps(cfg))
    _, report = qbridge.load_checkpoint(tmp_path / "bart", progress=False, return_report=True)
    assert "model.encoder.embed_positions.weight" in report.guessed and "name rules" in report.classified_by
    assert "module kinds guessed from names" in str(qbridge.inspect_checkpoint(tmp_path / "bart"))


def test_the_model_is_built_once_and_remembered(tmp_path, monkeypatch):
    """The torch model asked about a checkpoint's tensors is built once; later loads of the same model read
    the answer from qbridge's cache directory. Another config is built anew; a damaged file is rebuilt."""
    from qbridge._classify import module_info

    monkeypatch.setenv("QBRIDGE_CACHE_DIR", str(tmp_path / "cache"))
    config = {**transformers.GPT2Config(**GPT2).to_dict(), "architectures": ["GPT2LMHeadModel"]}
    first, note = module_info(config)
    assert (
        first is not None and "remembered" not in note and "transformer.h.0.attn.c_attn.weight" in first.kinds
    )
    (saved,) = (tmp_path / "cache" / "modules").glob("*.json")
    build = transformers.GPT2LMHeadModel._from_config

    def no_building(*args, **kwargs):
        raise RuntimeError("built again")

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "_from_config", no_building)
    second, note = module_info(config)
    assert second == first and "remembered" in note
    _, note = module_info({**config, "n_layer": 3})  # another model: asked again
    assert "built again" in note
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "_from_config", build)
    saved.write_text('{"architecture": "GPT2LMHeadModel", "kinds": ')
    third, note = module_info(config)
    assert (
        third == first and "remembered" not in note and json.loads(saved.read_text())["kinds"] == first.kinds
    )
    assert first.shapes["transformer.h.0.attn.c_attn.weight"] == (64, 192)  # Conv1D: [in, out] in torch
    for damage in ({"shapes": {}}, {"may_lack": ["("]}, {"converted": "x"}):  # the size check's inputs
        saved.write_text(json.dumps({**json.loads(saved.read_text()), **damage}))
        fourth, note = module_info(config)
        assert fourth == first and "remembered" not in note, damage
    monkeypatch.setenv("QBRIDGE_CACHE_DIR", "off")
    saved.unlink()
    assert module_info(config)[0] == first and not saved.exists()


def test_a_cache_directory_that_cannot_be_read_is_passed_over(tmp_path, monkeypatch):
    """A remembered answer that cannot even be looked for (a name longer than the file system allows; a
    directory this user may not search fails the same way) is not there: the model is built."""
    from qbridge._classify import module_info

    monkeypatch.setenv("QBRIDGE_CACHE_DIR", str(tmp_path / ("a" * 300)))
    config = {**transformers.GPT2Config(**GPT2).to_dict(), "architectures": ["GPT2LMHeadModel"]}
    info, note = module_info(config)
    assert (
        info is not None and "transformer.h.0.attn.c_attn.weight" in info.kinds and "remembered" not in note
    )


@pytest.mark.parametrize(
    "layers",
    [{"num_layers": 1, "num_decoder_layers": 3000}, {"text_config": {"num_hidden_layers": 3000}, "num_layers": 1},
     {"encoder": {"layers": [{"n_layers": 3000}]}, "num_hidden_layers": 1}],
    ids=["T5's num_decoder_layers", "a sub-config", "nested in a list"],
)  # fmt: skip
def test_a_config_naming_more_layers_than_tensors_is_not_built(layers, monkeypatch):
    """Building on the meta device takes time in proportion to the layers: a config.json naming thousands of
    layers beside a one-tensor checkpoint is not built, wherever in the config the count stands."""
    from qbridge._classify import module_info

    def no_building(*args, **kwargs):
        raise AssertionError("built")

    monkeypatch.setattr(transformers.T5ForConditionalGeneration, "_from_config", no_building)
    config = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": 64, **layers}
    info, note = module_info(config, tensors=1)
    assert info is None and "3001 layers for 1 tensors; the model was not built" in note


def test_a_later_process_loads_without_importing_transformers(tmp_path):
    _llama(tmp_path / "llama")
    script = (
        "import sys, qbridge; qbridge.load_checkpoint(sys.argv[1], progress=False); "
        "print('TRANSFORMERS', 'transformers' in sys.modules)"
    )
    env = {**os.environ, "QBRIDGE_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    seen = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "llama")], env=env, capture_output=True, text=True,
            timeout=600, cwd=pathlib.Path(__file__).resolve().parents[2],
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        seen.append(done.stdout.split("TRANSFORMERS")[-1].strip())
    assert seen == ["True", "False"]


# --- kind 9: messages that point the right way ------------------------------------------------------------


def test_a_truncated_bin_is_called_damaged(tmp_path):
    model = _llama(tmp_path / "st")
    _bin(model, tmp_path / "bin")
    f = tmp_path / "bin" / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:-4000])
    with pytest.raises(
        CheckpointError, match=r"pytorch_model.bin: the file is damaged \(truncated or corrupt"
    ):
        qbridge.load_checkpoint(tmp_path / "bin", progress=False)


def test_inspect_checks_the_scales(tmp_path):
    _e8m0_fp8_checkpoint(tmp_path / "e8m0")
    data = st.load_file(tmp_path / "e8m0" / "model.safetensors")
    data["layer.weight_scale_inv"] = torch.full((2, 3), float("nan"))
    st.save_file(data, tmp_path / "e8m0" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layer.weight_scale_inv\]: 6 scale\(s\) are NaN or Inf"):
        qbridge.inspect_checkpoint(tmp_path / "e8m0")


# --- kind 10: a checkpoint is untrusted input ---------------------------------------------------------------


def _sharded(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "ck"
    path.mkdir()
    st.save_file({"a.weight": torch.ones(2, 2)}, path / "part-1.safetensors")
    st.save_file({"b.weight": torch.ones(2, 2)}, path / "part-2.safetensors")
    return path


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors"])
def test_an_index_cannot_point_outside_the_checkpoint(tmp_path, name):
    path = _sharded(tmp_path)
    st.save_file({"b.weight": torch.ones(2, 2)}, tmp_path / "outside.safetensors")
    index = {"weight_map": {"a.weight": "part-1.safetensors", "b.weight": name}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors.index.json \[b.weight\]: refers to .* outside the checkpoint directory",
    ):
        qbridge.load_checkpoint(path, progress=False)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a\0.safetensors", r"\[b.weight\]: 'a\\x00.safetensors' is not a file name"),
        (".", r"\[b.weight\]: '.' is not a file name"),
        ("", r"\[b.weight\]: '' is not a file name"),
        ("loop1", r"\[b.weight\]: .*loop1 cannot be followed"),
    ],
)
def test_an_index_entry_that_names_no_file_is_refused(tmp_path, name, message):
    path = _sharded(tmp_path)
    (path / "loop1").symlink_to(path / "loop2")
    (path / "loop2").symlink_to(path / "loop1")
    index = {"weight_map": {"a.weight": "part-1.safetensors", "b.weight": name}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message):
        qbridge.inspect_checkpoint(path)


def test_an_index_is_read_as_written(tmp_path, monkeypatch):
    """An index given as the path is the one read (not the directory's); an empty one is refused; each file
    is checked once, however many keys it holds."""
    path = _sharded(tmp_path)
    st.save_file({"c.weight": torch.ones(2, 2)}, path / "unrelated.safetensors")
    custom = path / "custom.safetensors.index.json"
    custom.write_text(json.dumps({"weight_map": {"a.weight": "part-1.safetensors"}}))
    assert set(qbridge.load_checkpoint(custom, device="cpu", progress=False)["params"]) == {"a"}
    custom.write_text(
        json.dumps({"weight_map": {"a.weight": "part-1.safetensors", "b.weight": "gone.safetensors"}})
    )
    with pytest.raises(CheckpointError, match=r"gone.safetensors: file missing"):
        qbridge.inspect_checkpoint(custom)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match="weight_map lists no tensors"):
        qbridge.inspect_checkpoint(path)
    keys = {f"t{i}.weight": torch.ones(2) for i in range(40)}
    st.save_file(dict(list(keys.items())[:20]), path / "part-1.safetensors")
    st.save_file(dict(list(keys.items())[20:]), path / "part-2.safetensors")
    weight_map = {k: f"part-{1 + i // 20}.safetensors" for i, k in enumerate(keys)}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    from qbridge import _checkpoint

    checked = []
    real = _checkpoint.inside
    monkeypatch.setattr(
        _checkpoint, "inside", lambda root, file, what: checked.append(file) or real(root, file, what)
    )
    qbridge.inspect_checkpoint(path)
    assert sum(f.name.startswith("part-") for f in checked) == 2  # once per file, not once per key


def test_a_torch_index_selects_keys_as_a_safetensors_index_does(tmp_path):
    path = tmp_path / "bins"
    path.mkdir()
    torch.save({"a.weight": torch.ones(2, 2), "extra.weight": torch.ones(3, 3)}, path / "pytorch_model-1.bin")
    torch.save({"b.weight": torch.ones(2, 2)}, path / "pytorch_model-2.bin")
    index = path / "pytorch_model.bin.index.json"
    index.write_text(
        json.dumps({"weight_map": {"a.weight": "pytorch_model-1.bin", "b.weight": "pytorch_model-2.bin"}})
    )
    for where in (path, index):  # the directory's index, or the index as the path
        with pytest.warns(
            UserWarning, match=r"does not list 1 tensor.*extra\.weight in pytorch_model-1\.bin"
        ):
            loaded = qbridge.load_checkpoint(where, device="cpu", progress=False)["params"]
        assert set(loaded) == {"a", "b", "extra"}  # as transformers loads a listed file: whole
    torch.save({"b.weight": torch.ones(2, 2), "step": 7}, path / "pytorch_model-2.bin")  # unlisted, no tensor
    with pytest.warns(UserWarning, match="does not list 1 tensor"):  # extra.weight, not step
        assert set(qbridge.load_checkpoint(index, device="cpu", progress=False)["params"]) == {
            "a",
            "b",
            "extra",
        }
    torch.save({"step": 7}, path / "pytorch_model-3.bin")
    with pytest.raises(
        CheckpointError, match=r"pytorch_model-3.bin: expected a state dict of tensors; 'step' holds"
    ):
        qbridge.inspect_checkpoint(path / "pytorch_model-3.bin")
    index.write_text(
        json.dumps({"weight_map": {"a.weight": "pytorch_model-1.bin", "gone.weight": "pytorch_model-2.bin"}})
    )
    with pytest.raises(
        CheckpointError,
        match=r"pytorch_model-2.bin: the index lists 'gone.weight', which this file does not hold, nor does any",
    ):
        qbridge.inspect_checkpoint(path)
    # listed in the wrong file: loaded from the file that holds it, as transformers does
    a = torch.randn(2, 3)
    torch.save({"a.weight": a, "extra.weight": torch.ones(3, 3)}, path / "pytorch_model-1.bin")
    index.write_text(
        json.dumps({"weight_map": {"a.weight": "pytorch_model-2.bin", "b.weight": "pytorch_model-1.bin"}})
    )  # swapped
    with pytest.warns(
        UserWarning,
        match=r"lists 2 tensor.*b\.weight in pytorch_model-1\.bin, held by pytorch_model-2\.bin, a\.weight in "
        r"pytorch_model-2\.bin, held by pytorch_model-1\.bin",
    ):
        loaded = qbridge.load_checkpoint(index, device="cpu", progress=False)["params"]
    assert set(loaded) == {"a", "b", "extra"}
    assert np.array_equal(np.asarray(loaded["a"]["kernel"]), a.T.numpy())


def test_a_link_out_of_the_checkpoint_is_refused(tmp_path):
    path = _sharded(tmp_path)
    st.save_file({"c.weight": torch.ones(2, 2)}, tmp_path / "elsewhere.safetensors")
    (path / "part-3.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(
        CheckpointError, match=r"part-3.safetensors is a link to .*elsewhere.safetensors, outside"
    ):
        qbridge.inspect_checkpoint(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("blocksize", 0, "blocksize and nested_blocksize must be positive"), ("blocksize", "64", "must be positive"),
     ("shape", [10**12, 10**12], "packed bytes, but the quant state's shape"), ("shape", "big", "shape must be a list"),
     ("nested_offset", float("inf"), "nested_offset must be a finite number"), ("shape", [-4, 8], "non-negative")],
)  # fmt: skip
def test_quant_state_fields_are_checked_before_use(tmp_path, field, value, message):
    _, packed, qs = (None, *F.quantize_4bit(torch.randn(8, 8), quant_type="nf4")[:2])
    doc = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [8, 8], field: value}
    state = {"w.weight": packed, "w.weight.absmax": qs.absmax,
             "w.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(doc).encode()), dtype=torch.uint8)}  # fmt: skip
    (tmp_path / "q").mkdir()
    st.save_file(state, tmp_path / "q" / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        qbridge.load_checkpoint(tmp_path / "q", progress=False)


def test_config_fields_are_checked(tmp_path):
    path = _sharded(tmp_path)
    for config, message in (([1, 2], "a config is a JSON object"), ({"quantization_config": "fp8"}, "must be an object"),
                            ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 128]}}, "two positive integers"),
                            ({"architectures": "GPT2LMHeadModel"}, "a list of class names")):  # fmt: skip
        (path / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=message):
            qbridge.inspect_checkpoint(path)


def test_a_safetensors_header_that_claims_more_than_the_file_holds(tmp_path):
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}}
    ).encode()
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        qbridge.load_checkpoint(tmp_path / "h", progress=False)


# --- what an adversarial trial found ----------------------------------------------------------------------


def test_cpu_arrays_from_a_bin_do_not_share_the_file(tmp_path):
    (tmp_path / "ck").mkdir()
    torch.save(
        {"norm.weight": torch.ones(100_000), "layer.weight": torch.ones(8, 4)},
        tmp_path / "ck" / "pytorch_model.bin",
    )
    params = qbridge.load_checkpoint(tmp_path / "ck", progress=False, device="cpu")["params"]
    torch.save(
        {"x": torch.zeros(1)}, tmp_path / "ck" / "pytorch_model.bin"
    )  # the file is replaced under the arrays
    assert (
        float(params["norm"]["scale"].sum()) == 100_000.0 and float(params["layer"]["kernel"].sum()) == 32.0
    )


def test_files_beside_the_model_and_keys_in_two_files(tmp_path):
    (tmp_path / "ck").mkdir()
    st.save_file({"w.weight": torch.ones(4, 4)}, tmp_path / "ck" / "model.safetensors")
    st.save_file(
        {"base_model.model.w.lora_A.weight": torch.ones(2, 4)}, tmp_path / "ck" / "adapter_model.safetensors"
    )
    params = qbridge.load_checkpoint(tmp_path / "ck", progress=False)["params"]
    assert list(params) == ["w"]  # the PEFT adapter beside the model is not the model
    (tmp_path / "two").mkdir()
    st.save_file({"w.weight": torch.ones(4, 4)}, tmp_path / "two" / "part-a.safetensors")
    st.save_file({"w.weight": torch.zeros(4, 4)}, tmp_path / "two" / "part-b.safetensors")
    with pytest.raises(
        CheckpointError, match=r"part-b.safetensors: holds 'w.weight', which .*part-a.safetensors holds too"
    ):
        qbridge.load_checkpoint(tmp_path / "two", progress=False)


def test_stacked_experts_named_by_their_projection(tmp_path):
    w = torch.randn(3, 10, 6)
    (tmp_path / "moe").mkdir()
    st.save_file({"model.mlp.experts.gate_up_proj": w}, tmp_path / "moe" / "model.safetensors")
    params = qbridge.load_checkpoint(tmp_path / "moe", progress=False, kinds={"experts": "stacked_linear"})[
        "params"
    ]
    np.testing.assert_array_equal(
        np.asarray(params["model"]["mlp"]["experts"]["gate_up_proj"]), w.numpy().transpose(0, 2, 1)
    )


def test_hostile_configs_are_refused_or_bounded(tmp_path):
    import time

    model = _llama(tmp_path / "st")
    cfg = json.loads((tmp_path / "st" / "config.json").read_text())
    (tmp_path / "st" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": "no"}))
    with pytest.raises(CheckpointError, match="tie_word_embeddings must be true or false"):
        qbridge.inspect_checkpoint(tmp_path / "st")
    (tmp_path / "st" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 20000}))
    start = time.perf_counter()
    summary = qbridge.inspect_checkpoint(tmp_path / "st")
    assert time.perf_counter() - start < 10 and "names 20000 layers" in summary.classified_by
    (tmp_path / "elsewhere.json").write_text(json.dumps(cfg))
    (tmp_path / "st" / "config.json").unlink()
    (tmp_path / "st" / "config.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(CheckpointError, match=r"config.json is a link to .*elsewhere.json, outside"):
        qbridge.load_checkpoint(tmp_path / "st", progress=False)
    del model


def test_a_non_floating_dtype_is_refused(tmp_path):
    _llama(tmp_path / "st")
    with pytest.raises(ValueError, match="only to a floating dtype"):
        qbridge.load_checkpoint(tmp_path / "st", dtype=np.int8, progress=False)


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("bf16", " \\(did you mean 'bfloat16'\\?\\)"),
        ("float33", " \\(did you mean 'float32'\\?\\)"),
        ("xyz", ""),
    ],
)
def test_a_dtype_name_nothing_knows_is_named_with_the_closest_one(name, hint):
    """A misspelt dtype name is refused before anything is read, as a name nothing knows (not as a
    non-floating dtype), with the closest floating dtype's name."""
    with pytest.raises(ValueError, match=f"dtype='{name}' is not a dtype name{hint}: give a floating dtype"):
        qbridge.load_checkpoint("/nonexistent", dtype=name, progress=False)


@pytest.mark.parametrize(("field", "value", "message"), [("nested_offset", 1e308, "does not fit float32"),
                                                         ("code", float("inf"), "NaN or Inf")])  # fmt: skip
def test_quant_tables_and_offsets_that_would_make_nan_weights(tmp_path, field, value, message):
    packed, qs = F.quantize_4bit(torch.randn(8, 64), quant_type="nf4", compress_statistics=True)
    state = {"w.weight": packed, **{f"w.weight.{k}": v for k, v in qs.as_dict(packed=True).items()}}
    key = "w.weight.quant_state.bitsandbytes__nf4"
    doc = json.loads(bytes(state[key].tolist()))
    if field == "nested_offset":
        doc["nested_offset"] = value
        state[key] = torch.tensor(list(json.dumps(doc).encode()), dtype=torch.uint8)
    else:
        state["w.weight.nested_quant_map"] = state["w.weight.nested_quant_map"].clone()
        state["w.weight.nested_quant_map"][3] = value
    (tmp_path / "q").mkdir()
    st.save_file(state, tmp_path / "q" / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        qbridge.load_checkpoint(tmp_path / "q", progress=False)


def test_uint64_to_jax_with_x64_off():
    x = qbridge.to_jax(torch.tensor([5, 7], dtype=torch.uint64))
    assert x.dtype == jnp.uint32 and np.asarray(x).tolist() == [5, 7]
    with pytest.raises(ValueError, match=r"outside torch.uint32"):
        qbridge.to_jax(torch.tensor([2**40], dtype=torch.uint64))


def test_the_cli_reports_bad_patterns_cleanly(tmp_path, capsys):
    from qbridge._cli import main

    _llama(tmp_path / "st")
    assert main(["convert", str(tmp_path / "st"), str(tmp_path / "o"), "--kind", "[=linear", "--quiet"]) == 2
    assert "qbridge convert:" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "st"), str(tmp_path / "o"), "--dtype", "bogus", "--quiet"]) == 2


def test_with_a_target_the_report_lists_only_guesses_that_decided_a_layout(tmp_path):
    """An nnx target's module types lay every leaf out, so no name-rule guess decided anything and the
    report lists none (it said "name rules" and listed every tensor); a dict target has no module types,
    so the guesses it used are listed, except where ``kinds`` named the leaf."""
    _llama(tmp_path / "llama")
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    cfg.pop("architectures")  # no torch model to ask: name rules classify, with a target or without
    (tmp_path / "llama" / "config.json").write_text(json.dumps(cfg))
    _, target = _target(tmp_path / "llama")
    _, plain = qbridge.load_checkpoint(tmp_path / "llama", progress=False, return_report=True)
    assert plain.guessed and "name rules" in plain.classified_by
    _, report = qbridge.load_checkpoint(tmp_path / "llama", target=target, progress=False, return_report=True)
    assert report.guessed == []
    assert (
        f"the target's module types laid out {report.leaves} of {report.leaves} leaves"
        in report.classified_by
    )
    as_dict = {"params": qbridge.load_checkpoint(tmp_path / "llama", progress=False)["params"]}
    _, by_dict = qbridge.load_checkpoint(
        tmp_path / "llama", target=as_dict, progress=False, return_report=True
    )
    assert by_dict.guessed and set(by_dict.guessed) <= set(plain.guessed)
    assert "module types laid out" not in by_dict.classified_by
    _, overridden = qbridge.load_checkpoint(tmp_path / "llama", target=as_dict, progress=False, return_report=True,
                                            kinds={r"mlp\.": "linear"})  # fmt: skip
    assert set(overridden.guessed) == {k for k in by_dict.guessed if ".mlp." not in k}
    assert len(overridden.guessed) < len(by_dict.guessed)


def _moe(name, tmp_path, **sizes):
    """A tiny transformers MoE model of ``name`` with random weights, saved; its first layer's experts."""
    transformers = pytest.importorskip("transformers")
    config_name = "Llama4TextConfig" if name == "Llama4" else f"{name}Config"
    config_cls, model_cls = (
        getattr(transformers, config_name, None),
        getattr(transformers, f"{name}ForCausalLM", None),
    )
    if config_cls is None or model_cls is None:
        pytest.skip(f"this transformers has no {name}")
    torch.manual_seed(0)
    model = model_cls(config_cls(**sizes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / name)
    return model, model.model.layers[0].feed_forward.experts if name == "Llama4" else model.model.layers[
        0
    ].mlp.experts


MOES = {  # stored [experts, in, out], multiplied as x @ W[e]; GPT-OSS's down_proj is square
    "GptOss": dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                   layer_types=["full_attention"]),
    "Llama4": dict(vocab_size=64, hidden_size=32, intermediate_size=48, intermediate_size_mlp=48,
                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                   num_local_experts=2, interleave_moe_layer_step=1),
}  # fmt: skip


@pytest.mark.parametrize("name", MOES)
def test_experts_stored_in_out_come_out_as_x_times_kernel(tmp_path, name):
    """A breaker found GPT-OSS's and Llama 4's experts (stored [experts, in, out]) transposed as if stored
    [experts, out, in], so x @ kernel[e] was wrong (by 4.6 in a tiny model; square weights pass any shape
    check). Each expert's kernel must give the torch module's own product."""
    _, experts = _moe(name, tmp_path, **MOES[name])
    params = qbridge.load_checkpoint(tmp_path / name, progress=False, device="cpu")["params"]
    layer = params["model"]["layers"]["0"]
    got = (layer["feed_forward"] if name == "Llama4" else layer["mlp"])["experts"]
    for leaf in ("gate_up_proj", "down_proj"):
        stored = getattr(experts, leaf).detach()
        h = torch.randn(5, stored.shape[1])
        np.testing.assert_allclose(h.numpy() @ np.asarray(got[leaf])[1], (h @ stored[1]).numpy(), rtol=1e-5,
                                   atol=1e-5, err_msg=leaf)  # fmt: skip


def test_experts_stored_out_in_are_told_apart_from_in_out():
    """Mixtral's fused experts (in memory [experts, out, in], used with F.linear) keep stacked_linear's
    transpose; GPT-OSS's are seen as [experts, in, out], even where only one matrix tells (a square one)."""
    transformers = pytest.importorskip("transformers")
    from qbridge._classify import experts_stored_in_out

    mixtral = transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**MOES["GptOss"] | {"intermediate_size": 48})
    )
    assert experts_stored_in_out(mixtral.model.layers[0].mlp.experts, {32}) is False
    oss = transformers.GptOssForCausalLM(transformers.GptOssConfig(**MOES["GptOss"]))
    assert experts_stored_in_out(oss.model.layers[0].mlp.experts, {32}) is True


def test_a_router_of_its_own_class_keeps_torchs_layout_unless_kinds_names_it(tmp_path):
    """Qwen3-MoE's router (transformers 5) is a module of its own class holding a [experts, hidden] weight:
    without a target it keeps torch's name and layout (its kind is not known), and kinds= makes it a Dense
    kernel, as the README says."""
    config = transformers.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=100, head_dim=16,
    )  # fmt: skip
    model = transformers.Qwen3MoeForCausalLM(config)
    assert not isinstance(model.model.layers[0].mlp.gate, torch.nn.Linear)
    model.save_pretrained(tmp_path)
    want = model.model.layers[0].mlp.gate.weight.detach().numpy()
    gate = qbridge.load_checkpoint(tmp_path, device="cpu")["params"]["model"]["layers"]["0"]["mlp"]["gate"]
    assert set(gate) == {"weight"}
    np.testing.assert_array_equal(np.asarray(gate["weight"]), want)
    rule = {r"mlp\.gate(\.|$)": "linear"}  # the README's
    params = qbridge.load_checkpoint(tmp_path, device="cpu", kinds=rule)
    gate = params["params"]["model"]["layers"]["0"]["mlp"]["gate"]
    np.testing.assert_array_equal(np.asarray(gate["kernel"]), want.T)
    # the same rule with a params-dict target: it matches the leaf's path too (no "matched no name" warning)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = qbridge.load_checkpoint(tmp_path, target=target, device="cpu", kinds=rule)
    np.testing.assert_array_equal(
        np.asarray(again["params"]["model"]["layers"]["0"]["mlp"]["gate"]["kernel"]), want.T
    )


def test_keep_quantized_names_the_weights_that_load_dense(tmp_path):
    """keep_quantized=True on a bitsandbytes 8-bit checkpoint: its weights load dense, as documented, and
    the load now says so (then load_quantized_into_nnx's warning said 'loaded without keep_quantized=True')."""
    model = _llama(tmp_path / "dense")
    q = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True),
        dtype=torch.bfloat16, device_map="cpu",
    )  # fmt: skip
    q.save_pretrained(tmp_path / "int8")
    with pytest.warns(
        UserWarning,
        match=r"keep_quantized=True: \d+ bitsandbytes 8-bit weight\(s\) of this checkpoint load dense",
    ) as caught:
        params = qbridge.load_checkpoint(tmp_path / "int8", keep_quantized=True, progress=False)
    assert caught[0].filename == __file__
    assert not any(
        jax_side.is_quantized(leaf)
        for leaf in jax.tree_util.tree_leaves(params, is_leaf=jax_side.is_quantized)
    )
    del model


def test_a_folder_without_config_says_so_in_how_it_was_classified(tmp_path):
    """inspect of a folder without config.json said 'config.json names no architecture'."""
    from safetensors.torch import save_file

    save_file({"a.weight": torch.ones(2, 2)}, tmp_path / "model.safetensors")
    assert (
        qbridge.inspect_checkpoint(tmp_path).classified_by
        == "name rules (no config.json to name an architecture)"
    )


def test_a_target_with_fewer_layers_than_the_checkpoint_is_named_as_the_cause(tmp_path):
    """A transformers Llama of two layers loaded into a one-layer target: the refusal says the target has
    fewer layers and to build it from the checkpoint's config.json."""
    _llama(tmp_path / "st")
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    target = jax_side.abstract_llama(
        jax_side.LlamaConfig.from_hf({**config, "num_hidden_layers": 1}), param_dtype=jnp.bfloat16
    )
    with pytest.raises(jax_side.MatchError) as e:
        qbridge.load_checkpoint(tmp_path / "st", target=target, progress=False)
    assert "the checkpoint has blocks numbered up to 1 and the target up to 0" in str(e.value)
    assert "build it from the checkpoint's own config.json" in str(e.value)


SWEEP = {  # one of each kind of layout and naming the check against the config's model meets
    "GPT2": dict(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4),  # Conv1D
    "T5": dict(vocab_size=128, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4),  # shared embeddings
    "Bert": dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "Whisper": dict(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                    decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                    max_source_positions=32, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0),
    "Mixtral": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1),  # converted experts
    "DeepseekV3": dict(vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                       num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, num_attention_heads=4,
                       num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                       qk_nope_head_dim=8, v_head_dim=8),  # MLA, a dense layer and an MoE one
    "Gemma2": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8),  # tied output layer
}  # fmt: skip
HEADS = {"Bert": "BertForMaskedLM", "T5": "T5ForConditionalGeneration", "Whisper": "WhisperForConditionalGeneration",
         "GPT2": "GPT2LMHeadModel"}  # fmt: skip


@pytest.mark.parametrize("name", SWEEP)
def test_checkpoints_transformers_makes_fit_their_configs_models(name, tmp_path):
    """Plain and bitsandbytes NF4 checkpoints of each layout load strictly without a target: the check
    against the config's model refuses none of them (their tensors are what the model holds, or named
    otherwise, as transformers converts them)."""
    cls = getattr(transformers, HEADS.get(name, f"{name}ForCausalLM"))
    torch.manual_seed(0)
    cls(getattr(transformers, f"{name}Config")(**SWEEP[name])).save_pretrained(tmp_path / "plain")
    nf4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    cls.from_pretrained(tmp_path / "plain", quantization_config=nf4, device_map="cpu").save_pretrained(
        tmp_path / "nf4"
    )
    for which in ("plain", "nf4"):
        _, report = qbridge.load_checkpoint(
            tmp_path / which, progress=False, device="cpu", return_report=True
        )
        assert "built on the meta device" in report.classified_by, which
        assert report.format == ("bitsandbytes-4bit" if which == "nf4" else "safetensors")


def _saved(model: torch.nn.Module, path: pathlib.Path, edit=None) -> pathlib.Path:
    """``model`` saved by transformers, its tensors then edited (``edit(state) -> state``) as older or other
    producers wrote them."""
    model.save_pretrained(path)
    if edit is not None:
        state = st.load_file(path / "model.safetensors")
        st.save_file(edit(state), path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_tensors_transformers_lets_a_checkpoint_lack_are_not_missing(tmp_path):
    """Marian's save leaves out its sinusoidal positions (_keys_to_ignore_on_save), BART loads without
    final_logits_bias (_keys_to_ignore_on_load_missing), older checkpoints lack BatchNorm's
    num_batches_tracked: transformers loads each, and so does a strict load without a target. Another
    tensor missing from BART is still refused."""
    torch.manual_seed(0)
    marian = transformers.MarianConfig(vocab_size=128, decoder_vocab_size=128, d_model=32, encoder_layers=1,
                                       decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                                       encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                                       pad_token_id=1, eos_token_id=0, decoder_start_token_id=1)  # fmt: skip
    bart = transformers.BartConfig(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                   decoder_ffn_dim=64, max_position_embeddings=64)  # fmt: skip
    resnet = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    cases = {
        "marian": (transformers.MarianMTModel(marian), None),
        "bart": (
            transformers.BartForConditionalGeneration(bart),
            lambda s: {k: v for k, v in s.items() if k != "final_logits_bias"},
        ),
        "resnet": (
            transformers.ResNetForImageClassification(resnet),
            lambda s: {k: v for k, v in s.items() if not k.endswith("num_batches_tracked")},
        ),
    }
    for name, (model, edit) in cases.items():
        path = _saved(model, tmp_path / name, edit)
        type(model).from_pretrained(path)  # the producer loads it
        _, report = qbridge.load_checkpoint(path, progress=False, device="cpu", return_report=True)
        assert "built on the meta device" in report.classified_by, name
    gone = "model.encoder.layernorm_embedding.weight"
    path = _saved(
        cases["bart"][0], tmp_path / "bart-lacking", lambda s: {k: v for k, v in s.items() if k != gone}
    )
    with pytest.raises(CheckpointError, match=rf"missing: {re.escape(gone)} \(the model's \[32\]\)"):
        qbridge.load_checkpoint(path, progress=False, device="cpu")


def test_tensors_transformers_converts_as_it_loads_may_differ_in_size(tmp_path):
    """Qwen3-VL-MoE checkpoints on the Hub hold the fused experts as [experts, in, out], and transformers 5
    transposes them as it loads (a weight converter under the same name): they load strictly without a
    target, as stored. An attention weight of other size in the same checkpoint is still refused."""
    if not hasattr(transformers, "Qwen3VLMoeForConditionalGeneration"):
        pytest.skip("this transformers has no Qwen3-VL-MoE")
    config = transformers.Qwen3VLMoeConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, vocab_size=128, max_position_embeddings=64),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           deepstack_visual_indexes=[0], patch_size=8),
        image_token_id=3, video_token_id=4, vision_start_token_id=5, vision_end_token_id=6,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3VLMoeForConditionalGeneration(config)
    experts = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

    def hub_layout(state):
        return {k: v.transpose(-1, -2).contiguous() if k.endswith(experts) else v for k, v in state.items()}

    path = _saved(model, tmp_path / "hub", hub_layout)
    stored = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    with safe_open(path / "model.safetensors", "pt") as f:
        assert tuple(f.get_slice(stored).get_shape()) == (4, 32, 16)  # [experts, hidden, 2 x 8]: the Hub's
    params = qbridge.load_checkpoint(path, progress=False, device="cpu")["params"]
    assert params["model"]["language_model"]["layers"]["0"]["mlp"]["experts"]["gate_up_proj"].shape[0] == 4
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    path = _saved(model, tmp_path / "damaged", lambda s: hub_layout({**s, q_proj: s[q_proj][:16]}))
    with pytest.raises(
        CheckpointError,
        match=rf"other size: {re.escape(q_proj)}: the model's \[32, 32\], the checkpoint's \[16, 32\]",
    ):
        qbridge.load_checkpoint(path, progress=False, device="cpu")
    # the converter transposes: an expert tensor of other sizes than the model's, in any order, is refused
    path = _saved(
        model, tmp_path / "cut", lambda s: {**hub_layout(s), stored: s[stored][:2, :8].contiguous()}
    )
    with pytest.raises(
        CheckpointError,
        match=rf"other size: {re.escape(stored)}: the model's \[4, 16, 32\], the checkpoint's \[2, 8, 32\]",
    ):
        qbridge.load_checkpoint(path, progress=False, device="cpu")


def test_strict_false_with_a_target_that_fits_in_the_end_says_nothing(tmp_path):
    """A torch file of Whisper holds the tied proj_out.weight, which only the torch model explains: the first
    match, by name rules, leaves it unused, the second (the model asked) skips it. strict=False warns only
    about the last match: nothing here, and once for a target that does not fit."""
    config = transformers.WhisperConfig(**SWEEP["Whisper"])
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config)
    model.config.architectures = ["WhisperForConditionalGeneration"]
    _bin(model, tmp_path / "whisper")
    target = qbridge.load_checkpoint(tmp_path / "whisper", progress=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = qbridge.load_checkpoint(tmp_path / "whisper", target=target, strict=False, progress=False,
                                            device="cpu", return_report=True)  # fmt: skip
    assert report.match.ok and "proj_out.weight" in report.match.skipped
    del target["params"]["model"]["decoder"]["layer_norm"]
    target["params"]["model"]["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        qbridge.load_checkpoint(
            tmp_path / "whisper", target=target, strict=False, progress=False, device="cpu"
        )
    misfits = [w for w in said if "does not fit the target" in str(w.message)]
    assert len(misfits) == 1 and "model.extra.kernel" in str(misfits[0].message), [
        str(w.message) for w in said
    ]
