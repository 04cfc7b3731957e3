"""Keeping NF4 weights quantized in JAX: parameter memory and forward latency against the dense path, on a
model with Llama-3-8B layer shapes.

Writes an NF4 checkpoint (bitsandbytes on the GPU, transformers' key layout) of N decoder layers (vocab
32000), loads it dense and kept quantized into jax_side's Llama, and times the forward as a user runs it
again and again: ``jax.jit`` over the model's split state (``nnx.jit`` would walk the module graph in Python
on every call), batch 1 at 1, 16 and 128 tokens, median of 20 after warm-up, XLA's defaults. Kept weights
run through the fused kernel (``matmul_path("auto")``) and, for comparison, expanded then multiplied
(``matmul_path("expand")``); an FP8 checkpoint (128x128 block scales) of the same shapes likewise.
Whether a dense weight is materialized is read off the compiled program's temporary memory; parameter
memory is what JAX's allocator holds after the load; the bytes-moved floor is the parameter bytes at
4.2 TB/s.

    python benchmarks/keep_quantized.py --layers 4 --out benchmarks/results/keep-quantized-fused-h200.json
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from convert_8b import SHAPES, nf4_layers
from safetensors.torch import save_file

import jax_side
import qbridge

VOCAB = 32000
CONFIG = dict(vocab_size=VOCAB, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
              rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)  # fmt: skip


def fp8_layers(layers: int) -> dict[str, torch.Tensor]:
    """Random Llama-3-8B linear weights as float8_e4m3fn with 128x128 block scales (DeepSeek-V3's layout)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    state = {}
    for i in range(layers):
        for name, (rows, cols) in SHAPES.items():
            w = torch.randn(rows, cols, device="cuda", generator=gen) * 0.02
            tiles = w.reshape(rows // 128, 128, cols // 128, 128)
            scale = tiles.abs().amax(dim=(1, 3)) / 448.0
            q = (tiles / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
            state[f"model.layers.{i}.{name}.weight"] = q.cpu()
            state[f"model.layers.{i}.{name}.weight_scale_inv"] = scale.float().cpu()
    return state


def write(path: pathlib.Path, layers: int, fmt: str = "nf4") -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    state = nf4_layers(layers) if fmt == "nf4" else fp8_layers(layers)
    state["model.embed_tokens.weight"] = (
        (torch.randn(VOCAB, 4096, device="cuda", generator=gen) * 0.02).bfloat16().cpu()
    )
    state["lm_head.weight"] = (torch.randn(VOCAB, 4096, device="cuda", generator=gen) * 0.02).bfloat16().cpu()
    state["model.norm.weight"] = torch.ones(4096, dtype=torch.bfloat16)
    for i in range(layers):
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(4096, dtype=torch.bfloat16)
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(4096, dtype=torch.bfloat16)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    quant = (
        {"quant_method": "bitsandbytes"}
        if fmt == "nf4"
        else {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    )
    config = dict(CONFIG, num_hidden_layers=layers, quantization_config=quant)
    (path / "config.json").write_text(json.dumps(config))


def _forward(graphdef, state, ids):
    from flax import nnx

    return nnx.merge(graphdef, state)(ids)


def latency_ms(forward, state, ids) -> float:
    for _ in range(3):
        forward(state, ids).block_until_ready()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        forward(state, ids).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _jax_bytes() -> int:
    return jax.local_devices(backend="gpu")[0].memory_stats()["bytes_in_use"]


def main() -> None:
    from flax import nnx

    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    largest_dense = max(np.prod(s) for s in SHAPES.values()) * 2
    modes = [("nf4", "dense", None), ("nf4", "kept NF4", "auto"), ("nf4", "kept NF4, expanded", "expand"),
             ("fp8", "kept FP8", "auto"), ("fp8", "kept FP8, expanded", "expand")]  # fmt: skip
    for fmt in ("nf4", "fp8"):
        with tempfile.TemporaryDirectory(dir=".") as tmp:
            path = pathlib.Path(tmp)
            write(path, args.layers, fmt)
            config = jax_side.LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
            target = jax_side.abstract_llama(config, param_dtype=jnp.bfloat16)
            for mode_fmt, mode, matmul in modes:
                if mode_fmt != fmt:
                    continue
                before = _jax_bytes()
                params = qbridge.load_checkpoint(
                    path, target=target, keep_quantized=mode != "dense", progress=False, device="cuda"
                )
                jax.block_until_ready(params)
                resident = _jax_bytes() - before  # the loaded parameters live in JAX's allocator
                model = jax_side.llama_for_causal_lm(config, param_dtype=jnp.bfloat16)
                if mode == "dense":
                    nnx.update(model, params)
                else:
                    jax_side.load_quantized_into_nnx(model, params)
                held, _ = jax_side.quantized_nbytes(params)
                del params
                graphdef, state = nnx.split(model)
                row = {"param_bytes": int(held), "resident_jax_bytes": int(resident)}
                with jax_side.matmul_path(matmul or "auto"):
                    forward = jax.jit(functools.partial(_forward, graphdef))
                    for tokens in (1, 16, 128):
                        ids = jnp.asarray(
                            np.random.default_rng(tokens).integers(0, VOCAB, (1, tokens)), jnp.int32
                        )
                        row[f"tokens{tokens}_temp_bytes"] = (
                            forward.lower(state, ids).compile().memory_analysis().temp_size_in_bytes
                        )
                        row[f"tokens{tokens}_ms"] = latency_ms(forward, state, ids)
                results[mode] = row
                del model, state
                print(
                    mode, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True
                )
    dense = results["dense"]
    print(
        f"{torch.cuda.get_device_name()}: {args.layers} Llama-3-8B layers (vocab {VOCAB}), jax.jit of the split state, batch 1"
    )
    floor = {}
    for mode, row in results.items():
        print(f"  {mode:<19} params {row['param_bytes'] / 1e9:6.3f} GB  "
              + "  ".join(f"{t} tokens {row[f'tokens{t}_ms']:7.3f} ms ({row[f'tokens{t}_ms'] / dense[f'tokens{t}_ms']:.2f}x dense)" for t in (1, 16, 128))
              + f"  XLA temp {row['tokens1_temp_bytes'] / 1e6:.0f} MB"
              + f"  bytes-moved floor {row['param_bytes'] / 4.2e12 * 1e3:.3f} ms at 4.2 TB/s")  # fmt: skip
        floor[mode] = row["param_bytes"] / 4.2e12
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "layers": args.layers,
            "vocab": VOCAB, "jax": jax.__version__, "torch": torch.__version__, "form": "jax.jit of nnx.split state",
            "largest_dense_weight_bytes": int(largest_dense), "bytes_floor_s_at_4.2TBps": floor, "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
