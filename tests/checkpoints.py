"""Checkpoints made by the real producers, small enough for CI: transformers + bitsandbytes
``save_pretrained``, torchao ``quantize_`` saved both ways, and an FP8 block checkpoint written by the
documented layout (transformers refuses to quantize FP8 on a CPU, and to read partial tiles there)."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

# Sizes bitsandbytes' CPU forward accepts (rows in multiples of 32, columns in multiples of 64), so the
# quantized torch model itself can run as the reference on a CPU.
LLAMA = dict(
    vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip


def dense_llama(
    path: pathlib.Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, sizes: dict | None = None
):
    """A random transformers Llama saved plain; ``sizes`` overrides entries of ``LLAMA``."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**LLAMA, **(sizes or {})})
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(path)
    return model


def bnb_llama(
    dense_dir: pathlib.Path,
    out: pathlib.Path,
    *,
    quant_type: str,
    nested: bool,
    shard: bool = False,
    device_map: str = "cpu",
    quant_storage: torch.dtype = torch.uint8,
):
    """transformers quantizes the dense checkpoint with bitsandbytes and saves it (sharded if asked)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=nested,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=quant_storage,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(
        dense_dir, quantization_config=config, dtype=torch.bfloat16, device_map=device_map
    )
    model.save_pretrained(out, max_shard_size="60KB" if shard else "5GB")
    return model.eval()


def fp8_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 quantization as DeepSeek-V3's checkpoints store it: scale_inv = amax / 448 per block."""
    rows, cols = w.shape
    grid = (math.ceil(rows / block), math.ceil(cols / block))
    wf = w.float()
    scale = torch.empty(grid)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = wf[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


def fp8_llama(
    dense_dir: pathlib.Path, out: pathlib.Path, *, block: int = 128, scale_name: str = "weight_scale_inv"
):
    """The HF fine-grained FP8 layout: every Linear weight of the decoder as float8 + block scales."""
    from safetensors.torch import load_file, save_file

    state = load_file(dense_dir / "model.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    flat = {}
    for key, value in state.items():
        if ".layers." in key and key.endswith("_proj.weight"):
            q, s = fp8_quantize(value, block)
            flat[key] = q
            flat[key.replace(".weight", "." + scale_name)] = s
        else:
            flat[key] = value
    save_file(flat, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dense_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "weight_block_size": [block, block],
        "activation_scheme": "dynamic",
    }
    (out / "config.json").write_text(json.dumps(config))
    return flat


def torchao_llama(dense_dir: pathlib.Path, out: pathlib.Path, config_name: str = "int8"):
    """torchao ``quantize_`` on the dense model, saved as a torch state dict and in torchao's safetensors layout."""
    transformers = pytest.importorskip("transformers")
    ao = pytest.importorskip("torchao.quantization")
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    model = transformers.LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16).eval()
    config = {
        "int8": ao.Int8WeightOnlyConfig(),
        "float8": ao.Float8WeightOnlyConfig(),
        "intx": ao.IntxWeightOnlyConfig(),
    }[config_name]
    ao.quantize_(
        model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn
    )
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    torch.save(state, out / "model.pt")
    data, meta = flatten_tensor_state_dict(state)
    (out / "st").mkdir(exist_ok=True)
    save_file(data, out / "st" / "model.safetensors", metadata=meta)
    (out / "st" / "config.json").write_text((dense_dir / "config.json").read_text())
    (out / "config.json").write_text((dense_dir / "config.json").read_text())
    return model


def flax_llama_target(config: dict):
    """A target factory for ``qbridge convert --target checkpoints:flax_llama_target`` (config dict in)."""
    import jax.numpy as jnp

    import jax_side

    return jax_side.abstract_llama(jax_side.LlamaConfig.from_hf(config), param_dtype=jnp.bfloat16)


def BrokenLlama(config: dict, *, rngs):
    """jax_side's Flax Llama with a planted fault (the first norm's epsilon), for ``qbridge parity --model``."""
    import jax.numpy as jnp

    import jax_side

    model = jax_side.llama_for_causal_lm(
        jax_side.LlamaConfig.from_hf(config), param_dtype=jnp.float32, rngs=rngs
    )
    model.model.layers[0].input_layernorm.eps = 1e-1
    return model


FP8_EXPERT_KINDS = {  # name -> (shape, count): more than one group of each, a remainder, partial 128x128 tiles
    "gate_proj": ((256, 384), 40),
    "down_proj": ((200, 130), 37),
}


def fp8_experts(folder, *, damaged=None, scale_dtype=torch.float32):
    """Many FP8 expert weights of two kinds with 128x128 block scales (the layout DeepSeek-V3 stores), in one
    file; ``damaged``: a scale key to hold a NaN. Returns what was stored."""
    from helpers import random_fp8, random_scales
    from safetensors.torch import save_file

    stored = {"model.norm.weight": torch.randn(384).bfloat16()}
    seed = 0
    for name, (shape, count) in FP8_EXPERT_KINDS.items():
        for e in range(count):
            key = f"model.layers.0.mlp.experts.{e}.{name}.weight"
            seed += 1
            stored[key] = random_fp8(shape, seed=seed)
            grid = (-(-shape[0] // 128), -(-shape[1] // 128))
            stored[key + "_scale_inv"] = random_scales(grid, seed=1000 + seed).to(scale_dtype)
    if damaged is not None:
        stored[damaged][0, -1] = float("nan")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(stored, folder / "model.safetensors")
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    (folder / "config.json").write_text(json.dumps(config))
    return stored


def fp8_experts_decoded(stored):
    """What one ``torch_side.dequantize_fp8`` call per weight of :func:`fp8_experts` gives (on the GPU), in
    the Flax layout (a Linear's kernel: the transpose), by Flax name (``model.`` dropped, ``.weight`` kept)."""
    import torch_side

    out = {}
    for key, value in stored.items():
        if key.endswith("_proj.weight"):
            w, s = value.cuda(), stored[key + "_scale_inv"].cuda()
            decoded = torch_side.dequantize_fp8(w, s, torch.bfloat16, block_size=(128, 128)).t().cpu()
            out[key.removeprefix("model.")] = decoded  # Flax names: no "model." (see _flat)
    return out


def loaded_weights(params):
    """A loaded ``params`` tree (without a target) flat, by the checkpoint's names: ``{"layers.0....weight": array}``."""
    import jax

    return {
        ".".join(str(getattr(k, "key", k)) for k in path[1:-1]) + ".weight": leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
