"""transformers' own Flax models as targets: 13 architectures, plain and quantized checkpoints made by the real
producers, loaded with qbridge into the transformers Flax model of the same architecture and compared with
the torch model whose weights are the producer's own dequantization (float32 on both sides).

transformers 5 has no Flax classes: this module runs where transformers 4.x is installed (it skips
elsewhere). The second test environment, as the README says:

    python3 -m venv .venv-flax4 && . .venv-flax4/bin/activate && \\
      pip install torch==2.13.0 -e '.[test]' 'transformers==4.57.6' && python -m pytest -n 0 -s tests/qbridge/test_flax_targets.py

Qwen2 has no Flax class in transformers: its checkpoints load into jax_side's Llama (Qwen2's biased q/k/v
projections are not modelled there), so it is checked weight by weight instead.
"""

from __future__ import annotations

import json
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from checkpoints import fp8_quantize
from helpers import assert_same_bits, bnb_reference, to_numpy

import qbridge
from qbridge.parity import compare

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FlaxGPT2LMHeadModel"):
    pytest.skip("transformers' Flax classes (transformers 4.x) are not installed", allow_module_level=True)
bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")
st = pytest.importorskip("safetensors.torch")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

TEXT = dict(vocab_size=128, max_position_embeddings=64)
ARCHITECTURES = {
    "gpt2": ("GPT2Config", dict(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4), "GPT2LMHeadModel", "FlaxGPT2LMHeadModel"),
    "bert": ("BertConfig", dict(TEXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128), "BertForMaskedLM", "FlaxBertForMaskedLM"),
    "roberta": ("RobertaConfig", dict(TEXT, max_position_embeddings=72, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128), "RobertaForMaskedLM", "FlaxRobertaForMaskedLM"),
    "t5": ("T5Config", dict(vocab_size=128, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4), "T5ForConditionalGeneration", "FlaxT5ForConditionalGeneration"),
    "llama": ("LlamaConfig", dict(TEXT, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), "LlamaForCausalLM", "FlaxLlamaForCausalLM"),
    "mistral": ("MistralConfig", dict(TEXT, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), "MistralForCausalLM", "FlaxMistralForCausalLM"),
    "gemma": ("GemmaConfig", dict(TEXT, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16), "GemmaForCausalLM", "FlaxGemmaForCausalLM"),
    "qwen2": ("Qwen2Config", dict(TEXT, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), "Qwen2ForCausalLM", None),
    "vit": ("ViTConfig", dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128), "ViTModel", "FlaxViTModel"),
    "clip": ("CLIPConfig", dict(text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32),
                                vision_config=dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4), projection_dim=32), "CLIPModel", "FlaxCLIPModel"),
    "whisper": ("WhisperConfig", dict(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                      num_mel_bins=16, max_source_positions=32, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0), "WhisperForConditionalGeneration", "FlaxWhisperForConditionalGeneration"),
    "opt": ("OPTConfig", dict(TEXT, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64), "OPTForCausalLM", "FlaxOPTForCausalLM"),
    "bart": ("BartConfig", dict(TEXT, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128), "BartForConditionalGeneration", "FlaxBartForConditionalGeneration"),
}  # fmt: skip
FORMATS = ["plain", "nf4", "fp4", "int8", "fp8", "torchao"]
RESULTS: dict[tuple[str, str], str] = {}


def _inputs(arch: str, config) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 120, (2, 11))
    if arch == "vit":
        return {"pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}
    if arch == "clip":
        return {"input_ids": ids, "pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)}
    if arch == "whisper":
        return {
            "input_features": rng.standard_normal((2, 16, 64)).astype(np.float32),
            "decoder_input_ids": ids[:, :5],
        }
    if arch in ("t5", "bart"):
        return {"input_ids": ids, "decoder_input_ids": ids[:, :7]}
    return {"input_ids": ids}


def _output(arch: str, out):
    if arch == "vit":
        return out.last_hidden_state
    if arch == "clip":
        return out.logits_per_image
    return out.logits


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return tmp_path_factory.mktemp("flax_targets")


def _dense(made: pathlib.Path, arch: str):
    cfg_name, kwargs, torch_name, _ = ARCHITECTURES[arch]
    path = made / arch / "plain"
    config = getattr(transformers, cfg_name)(**kwargs)
    if not path.exists():
        torch.manual_seed(0)
        getattr(transformers, torch_name)(config).eval().save_pretrained(path)
    return path, config


def _linear_names(model: torch.nn.Module) -> list[str]:
    out_emb = model.get_output_embeddings()
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not out_emb and m.weight.shape[0] % 2 == 0
    ]


def _make(made: pathlib.Path, arch: str, fmt: str):
    """The checkpoint of ``fmt`` by its real producer, and the reference torch model: the float32 model whose
    quantized weights hold the producer's own dequantization."""
    plain, _ = _dense(made, arch)
    torch_cls = getattr(transformers, ARCHITECTURES[arch][2])
    reference = torch_cls.from_pretrained(plain, torch_dtype=torch.float32).eval()
    if fmt == "plain":
        return plain, reference
    out = made / arch / fmt
    if fmt in ("nf4", "fp4", "int8"):
        qc = transformers.BitsAndBytesConfig(load_in_4bit=fmt != "int8", load_in_8bit=fmt == "int8", bnb_4bit_quant_type=fmt if fmt != "int8" else "nf4",
                                             bnb_4bit_use_double_quant=fmt == "nf4", bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
        q = torch_cls.from_pretrained(
            plain, quantization_config=qc, device_map="cpu", torch_dtype=torch.float32
        )
        q.save_pretrained(out)
        with torch.no_grad():
            for name, module in q.named_modules():
                if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                    w = module.weight
                    # bitsandbytes' reference decode made to act as its CUDA kernel (FP4's signed zero, flushed
                    # denormals: tests/helpers.py); its CPU kernel differs from its CUDA one there
                    dense = (
                        bnb_reference(w.data, w.quant_state)
                        if fmt != "int8"
                        else F.int8_vectorwise_dequant(w.data, w.SCB)
                    )
                    target = reference.get_submodule(name).weight
                    target.copy_(
                        dense.T if type(reference.get_submodule(name)).__name__ == "Conv1D" else dense
                    )
        return out, reference
    if fmt == "fp8":
        state = st.load_file(plain / "model.safetensors")
        names = {f"{n}.weight" for n in _linear_names(reference)}
        flat = {}
        with torch.no_grad():
            for key, value in state.items():
                if key in names:
                    q, s = fp8_quantize(value)
                    flat[key], flat[key.replace(".weight", ".weight_scale_inv")] = q, s
                    rows, cols = value.shape
                    expanded = s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
                    reference.get_submodule(key.rpartition(".")[0]).weight.copy_(q.float() * expanded)
                else:
                    flat[key] = value
        out.mkdir(parents=True, exist_ok=True)
        st.save_file(flat, out / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((plain / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
        (out / "config.json").write_text(json.dumps(cfg))
        return out, reference
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    names = set(_linear_names(reference))
    quantized = torch_cls.from_pretrained(plain, torch_dtype=torch.float32).eval()
    quantize_(quantized, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in names)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(quantized.state_dict(), out / "model.pt")
    (out / "config.json").write_text((plain / "config.json").read_text())
    with torch.no_grad():
        for name in names:
            reference.get_submodule(name).weight.copy_(quantized.get_submodule(name).weight.dequantize())
    return out, reference


def _weights_equal(path: pathlib.Path, reference: torch.nn.Module) -> None:
    state = qbridge.dequantized_state(path)
    for name, p in reference.named_parameters():
        if name in state:
            assert_same_bits(to_numpy(state[name].float()), to_numpy(p.detach()))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture_into_its_transformers_flax_model(made, arch, fmt):
    if arch == "gpt2" and fmt in ("fp8", "torchao"):
        pytest.skip("GPT-2's projections are Conv1D, which neither producer quantizes")
    path, reference = _make(made, arch, fmt)
    inputs = _inputs(arch, reference.config)
    flax_name = ARCHITECTURES[arch][3]
    if flax_name is None:  # no Flax class: every weight against the reference, bit for bit
        _weights_equal(path, reference)
        RESULTS[(arch, fmt)] = "weights equal (no Flax class)"
        return
    flax_cls = getattr(transformers, flax_name)
    try:
        target = qbridge.build_target(f"transformers:{flax_name}", path)
    except (
        TypeError
    ):  # transformers 4.x's Flax code calls JAX functions this JAX no longer has (FlaxT5: jnp.clip)
        _weights_equal(path, reference)
        RESULTS[(arch, fmt)] = f"weights equal ({flax_name} does not build on jax {jax.__version__})"
        return
    params, report = qbridge.load_checkpoint(path, target=target, progress=False, return_report=True)
    flax_model = flax_cls(flax_cls.config_class.from_pretrained(path), _do_init=False)
    # transformers' own torch -> Flax conversion of the reference weights: every leaf, bit for bit
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    shapes = types.SimpleNamespace(
        params=target, base_model_prefix=flax_cls.base_model_prefix
    )  # what the converter reads
    want_params = convert_pytorch_state_dict_to_flax(
        {k: v.detach() for k, v in reference.state_dict().items()}, shapes
    )
    flat_want = dict(
        jax.tree_util.tree_leaves_with_path(want_params)
    )  # (it also writes tied heads the model reuses)
    flat_got = dict(jax.tree_util.tree_leaves_with_path(params))
    assert set(flat_got) == {p for p, _ in jax.tree_util.tree_leaves_with_path(target)} and set(
        flat_got
    ) <= set(flat_want)
    for path_, leaf in flat_got.items():
        assert_same_bits(np.asarray(leaf, dtype=np.float32), np.asarray(flat_want[path_], dtype=np.float32))
    try:
        got = _output(arch, flax_model(**{k: jnp.asarray(v) for k, v in inputs.items()}, params=params))
    except TypeError as e:  # transformers 4.x's Flax code calls JAX functions this JAX no longer has
        RESULTS[(arch, fmt)] = f"leaves equal; the Flax model does not run on jax {jax.__version__}"
        pytest.xfail(
            f"{flax_name} does not run on jax {jax.__version__} ({e}); every leaf equals transformers' conversion"
        )
    with torch.no_grad():
        want = _output(arch, reference(**{k: torch.from_numpy(v) for k, v in inputs.items()}))
    parity = compare({"out": want}, {"out": got}, rtol=2e-3, min_cosine=1 - 1e-6)
    o = parity.outputs[0]
    RESULTS[(arch, fmt)] = f"rel {o.max_rel:.1e}, cos {o.cosine:.7f}"
    print(f"\n[{arch} {fmt}] {report}\n{parity}")
    assert parity.ok, f"{arch} {fmt}\n{parity}"


@pytest.fixture(scope="module", autouse=True)
def _table():
    """Prints the architecture x format table of the run at the end (``pytest -n 0 -s``), for the README."""
    yield
    if RESULTS:
        lines = ["| architecture | " + " | ".join(FORMATS) + " |", "| --- |" + " --- |" * len(FORMATS)]
        for arch in ARCHITECTURES:
            lines.append(f"| {arch} | " + " | ".join(RESULTS.get((arch, f), "—") for f in FORMATS) + " |")
        print("\n" + "\n".join(lines))
