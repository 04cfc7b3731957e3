"""Time from an NF4 checkpoint with Llama-3-8B layer shapes on local disk to JAX arrays on the GPU.

Writes a checkpoint of N decoder layers (random weights quantized by bitsandbytes on the GPU, saved in
transformers' layout), then compares, in the same run: (a) qbridge.load_checkpoint to the GPU; (b)
bitsandbytes dequantization on the GPU, then .cpu().numpy() and jax.device_put; (c) dequantization on the
CPU, then jax.device_put. Reports the median of 3 runs each (page cache warm) and peak GPU memory.

    python benchmarks/convert_8b.py --layers 4 --out benchmarks/results/convert-8b.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qbridge
import torch_side

SHAPES = {  # Llama-3-8B
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}  # fmt: skip


def nf4_layers(layers: int) -> dict[str, torch.Tensor]:
    """The linear weights of ``layers`` decoder layers, random, quantized to NF4 by bitsandbytes on the GPU,
    under transformers' keys (``<name>.weight`` and its ``.absmax`` ... ``.quant_state`` pieces)."""
    import bitsandbytes.functional as F

    state = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for i in range(layers):
        for name, shape in SHAPES.items():
            w = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
            packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            key = f"model.layers.{i}.{name}.weight"
            state[key] = packed.cpu()
            state.update({f"{key}.{k}": v.cpu() for k, v in qs.as_dict(packed=True).items()})
    return state


def write_checkpoint(path: pathlib.Path, layers: int) -> int:
    state = nf4_layers(layers)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}}))
    return len([k for k in state if k.endswith(".weight")])


def _pieces(path: pathlib.Path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        for key in keys:
            if key.endswith(".weight"):
                yield (
                    key,
                    {k[len(key) + 1 :]: f.get_tensor(k) for k in keys if k.startswith(key + ".")}
                    | {"": f.get_tensor(key)},
                )


def _quant_state(pieces, device):
    import bitsandbytes.functional as F

    qs = {k: v for k, v in pieces.items() if k}
    return F.QuantState.from_dict(qs, device=device)


def via_host(path: pathlib.Path, dequantize_on: str) -> dict:
    import bitsandbytes.functional as F

    out = {}
    gpu = jax.local_devices(backend="gpu")[0]
    for key, pieces in _pieces(path):
        if dequantize_on == "cuda":
            dense = F.dequantize_4bit(pieces[""].cuda(), _quant_state(pieces, "cuda")).cpu()
        else:
            dense = torch_side.dequantize(pieces[""], _quant_state(pieces, "cpu"))
        out[key] = jax.device_put(dense.view(torch.int16).numpy().view(jax.numpy.bfloat16), gpu)
    jax.block_until_ready(out)
    return out


def measure(fn, runs: int = 3) -> tuple[float, float]:
    times, peaks = [], []
    for _ in range(runs):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        jax.block_until_ready(result)
        times.append(time.perf_counter() - start)
        peaks.append(torch.cuda.max_memory_allocated() / 1e9)
        del result
    return statistics.median(times), max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        path = pathlib.Path(tmp)
        weights = write_checkpoint(path, args.layers)
        size = (path / "model.safetensors").stat().st_size
        params = sum(np.prod(s) for s in SHAPES.values()) * args.layers
        rows = {}
        rows["(a) qbridge.load_checkpoint -> GPU"] = measure(
            lambda: qbridge.load_checkpoint(path, device="cuda", progress=False)
        )
        rows["(b) bitsandbytes on GPU -> .cpu().numpy() -> jax.device_put"] = measure(
            lambda: via_host(path, "cuda")
        )
        rows["(c) dequantize on CPU -> jax.device_put"] = measure(lambda: via_host(path, "cpu"), runs=1)
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "jax": jax.__version__,
        "layers": args.layers, "weights": weights, "params": int(params), "file_bytes": size,
        "rows": {k: {"seconds": t, "peak_torch_gpu_gb": p} for k, (t, p) in rows.items()},
    }  # fmt: skip
    base = rows["(a) qbridge.load_checkpoint -> GPU"][0]
    print(f"{result['device']}: {args.layers} Llama-3-8B layers, {weights} NF4 weights, {params / 1e9:.2f} G params, "
          f"{size / 1e9:.2f} GB file")  # fmt: skip
    for k, (t, p) in rows.items():
        print(f"{k:<62}{t:>8.3f} s  x{t / base:>6.1f}  peak torch GPU {p:.2f} GB")
    print(
        "(peak torch GPU: what torch allocated at most; the results of (b) and (c) live in JAX's allocator besides)"
    )
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
