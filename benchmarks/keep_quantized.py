"""Keeping NF4 weights quantized in JAX: resident parameter memory and forward latency against the dense
path, on a model with Llama-3-8B layer shapes.

Writes an NF4 checkpoint (bitsandbytes on the GPU, transformers' key layout) of N decoder layers with a
small vocabulary, loads it dense and kept quantized into jax_side's Llama, and times a jitted forward of
one token at batch 1 and 16 (median of 20 after warm-up). Whether XLA fuses the expansion into the
matmuls or materializes dense weights is read off the compiled program's temporary memory.

    python benchmarks/keep_quantized.py --layers 4 --out benchmarks/results/keep-quantized.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from safetensors.torch import save_file

import jax_side
import qbridge

from convert_8b import SHAPES, nf4_layers  # noqa: E402

CONFIG = dict(vocab_size=1024, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
              rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)  # fmt: skip


def write(path: pathlib.Path, layers: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    state = nf4_layers(layers)
    state["model.embed_tokens.weight"] = (torch.randn(1024, 4096, device="cuda", generator=gen) * 0.02).bfloat16().cpu()
    state["lm_head.weight"] = (torch.randn(1024, 4096, device="cuda", generator=gen) * 0.02).bfloat16().cpu()
    state["model.norm.weight"] = torch.ones(4096, dtype=torch.bfloat16)
    for i in range(layers):
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(4096, dtype=torch.bfloat16)
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(4096, dtype=torch.bfloat16)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = dict(CONFIG, num_hidden_layers=layers, quantization_config={"quant_method": "bitsandbytes"})
    (path / "config.json").write_text(json.dumps(config))


def latency_ms(forward, model, ids) -> float:
    for _ in range(3):
        forward(model, ids).block_until_ready()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        forward(model, ids).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    from flax import nnx

    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        path = pathlib.Path(tmp)
        write(path, args.layers)
        config = jax_side.LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
        target = jax_side.abstract_llama(config, param_dtype=jnp.bfloat16)
        results = {}
        largest_dense = max(np.prod(s) for s in SHAPES.values()) * 2
        for mode in ("dense", "kept NF4"):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            params = qbridge.load_checkpoint(path, target=target, keep_quantized=mode != "dense", progress=False, device="cuda")
            model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
            if mode == "dense":
                nnx.update(model, params)
            else:
                jax_side.load_quantized_into_nnx(model, params)
            held, _ = jax_side.quantized_nbytes(params)
            del params
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated() - before  # the parameters live in torch's allocator (zero-copy)
            forward = nnx.jit(lambda m, ids: m(ids))
            row = {"param_bytes": int(held), "resident_torch_bytes": int(resident)}
            for batch in (1, 16):
                ids = jnp.zeros((batch, 1), jnp.int32)
                compiled = forward.lower(model, ids).compile() if hasattr(forward, "lower") else None
                temp = compiled.memory_analysis().temp_size_in_bytes if compiled is not None else None
                row[f"batch{batch}_ms"] = latency_ms(forward, model, ids)
                row[f"batch{batch}_temp_bytes"] = temp
            results[mode] = row
            del model
    dense, kept = results["dense"], results["kept NF4"]
    print(f"{torch.cuda.get_device_name()}: {args.layers} Llama-3-8B layers (vocab 1024), jitted forward of one token")
    for mode, row in results.items():
        print(f"  {mode:<9} params {row['param_bytes'] / 1e9:6.3f} GB (torch-resident {row['resident_torch_bytes'] / 1e9:6.3f} GB)  "
              f"batch 1 {row['batch1_ms']:7.3f} ms  batch 16 {row['batch16_ms']:7.3f} ms  "
              f"XLA temp {row['batch1_temp_bytes'] and row['batch1_temp_bytes'] / 1e6} MB")  # fmt: skip
    ratio = kept["param_bytes"] / dense["param_bytes"]
    materialized = (kept["batch1_temp_bytes"] or 0) >= largest_dense
    print(f"memory kept/dense {ratio:.3f}; latency kept/dense batch 1 {kept['batch1_ms'] / dense['batch1_ms']:.2f}x, "
          f"batch 16 {kept['batch16_ms'] / dense['batch16_ms']:.2f}x; XLA "
          f"{'materializes a dense weight per call (temp >= one dense weight)' if materialized else 'fuses the expansion (no dense-weight temp)'}")  # fmt: skip
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "layers": args.layers,
            "jax": jax.__version__, "largest_dense_weight_bytes": int(largest_dense), "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
