"""A whole fresh process loading an NF4 checkpoint, against the raw route, with empty and warm caches.

Writes a checkpoint of N decoder layers with Llama-3-8B's linear shapes (random weights quantized to
nested NF4 by bitsandbytes, transformers' keys), then times fresh ``python -c`` processes in the same
run, each reading the file from the page cache:

- qbridge: ``qbridge.load_checkpoint(path, device=...)`` (no target), to ready arrays;
- the raw route: for each weight, bitsandbytes' ``QuantState.from_dict`` and ``dequantize_4bit`` on the
  device, then a bare ``jax.dlpack.from_dlpack`` of the transposed view (the Flax ``[in, out]`` layout).

First with empty caches (a fresh ``TRITON_CACHE_DIR`` and ``QBRIDGE_CACHE_DIR``), then again with what
those runs left. Each process prints its import and load seconds; the whole-process wall time is measured
outside it. Then, in this process (``--loads``, default 6, alternating, the first of each excluded): repeated
loads of both routes against the physical floor measured in the same run: the file's bytes at the slower of
the page-cache read with 8 threads and pinned host-to-device copies (they can overlap). ``--scale`` divides
every dimension (a quick run, or a CPU smoke test with ``--device cpu``).

    python benchmarks/fresh_process_raw_route.py --layers 4 --out benchmarks/results/fresh-raw-route.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

SHAPES = {  # Llama-3-8B
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}  # fmt: skip

QBRIDGE = r"""
import sys, time
t0 = time.perf_counter()
import jax, qbridge
t1 = time.perf_counter()
params = qbridge.load_checkpoint(sys.argv[1], device=sys.argv[2], progress=False)
jax.block_until_ready(params)
t2 = time.perf_counter()
print("PROCESS", t1 - t0, t2 - t1, len(jax.tree.leaves(params)))
"""

RAW_LOAD = r"""
import jax
import bitsandbytes.functional as F
from safetensors import safe_open

def raw_load(path, device):
    out = {}
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        for key in keys:
            if not key.endswith(".weight"):
                continue
            pieces = {k[len(key) + 1 :]: f.get_tensor(k) for k in keys if k.startswith(key + ".")}
            qs = F.QuantState.from_dict(pieces, device=device)
            dense = F.dequantize_4bit(f.get_tensor(key).to(device), qs)
            out[key] = jax.dlpack.from_dlpack(dense.t())
    return jax.block_until_ready(out)
"""

RAW = (
    """
import sys, time
t0 = time.perf_counter()
import torch
"""
    + RAW_LOAD
    + """
t1 = time.perf_counter()
out = raw_load(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
print("PROCESS", t1 - t0, t2 - t1, len(out))
"""
)


def write_checkpoint(path: pathlib.Path, layers: int, scale: int, device: str) -> int:
    import bitsandbytes.functional as F
    import torch
    from safetensors.torch import save_file

    state = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for i in range(layers):
        for name, (rows, cols) in SHAPES.items():
            shape = (rows // scale, cols // scale)
            w = torch.randn(shape, device=device, generator=gen, dtype=torch.bfloat16) * 0.02
            packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            key = f"model.layers.{i}.{name}.weight"
            state[key] = packed.cpu()
            state.update({f"{key}.{k}": v.cpu() for k, v in qs.as_dict(packed=True).items()})
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}}))
    return layers * len(SHAPES)


def run(script: str, target: str, device: str, env: dict[str, str]) -> dict[str, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", script, target, device], env=env, capture_output=True, text=True, timeout=900
    )
    wall = time.perf_counter() - start
    line = [x for x in done.stdout.splitlines() if x.startswith("PROCESS")]
    if done.returncode or not line:
        raise RuntimeError(f"the process failed: {done.stderr.strip()[-2000:]}")
    imports, load, count = line[0].split()[1:]
    return {"process_s": wall, "import_s": float(imports), "load_s": float(load), "weights": int(count)}


def repeated_loads(ckpt: pathlib.Path, size: int, device: str, loads: int) -> dict[str, object]:
    """Repeated loads of both routes in this process (alternating; the first of each excluded), against
    the floor measured here: ``size`` bytes at min(8-thread page-cache read, pinned host-to-device)."""
    import jax
    from deepseek_v3_scale import pinned_copy_bandwidth, read_bandwidth

    import qbridge

    files = [ckpt / "model.safetensors"]
    read_bandwidth(files, 8, 4 << 20)  # into the page cache
    read8 = read_bandwidth(files, 8, 4 << 20)  # 4 MiB reads: one file keeps 8 threads busy
    copy = pinned_copy_bandwidth() if device == "cuda" else None
    floor = size / (min(read8, copy) if copy is not None else read8)
    ns: dict[str, Any] = {}
    exec(RAW_LOAD, ns)  # the raw route's imports and raw_load, as its fresh processes run them
    times: dict[str, list[float]] = {"qbridge": [], "raw": []}
    for _ in range(loads):
        t0 = time.perf_counter()
        params = qbridge.load_checkpoint(ckpt, device=device, progress=False)
        jax.block_until_ready(params)
        times["qbridge"].append(time.perf_counter() - t0)
        del params
        t0 = time.perf_counter()
        out = ns["raw_load"](str(files[0]), device)
        times["raw"].append(time.perf_counter() - t0)
        del out
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(
        f"in process: page-cache read {read8 / 1e9:.1f} GB/s (8 threads)"
        + (f", pinned host-to-device {copy / 1e9:.1f} GB/s" if copy is not None else "")
        + f"; floor {floor * 1e3:.1f} ms; repeated loads (median of {loads - 1}): qbridge {med['qbridge'] * 1e3:.1f} ms "
        f"({med['qbridge'] / floor:.1f}x the floor), raw route {med['raw'] * 1e3:.1f} ms ({med['raw'] / floor:.1f}x); "
        f"qbridge / raw {med['qbridge'] / med['raw']:.2f}x"
    )
    return {
        "read_gb_s_8_threads": read8 / 1e9, "pinned_h2d_gb_s": copy / 1e9 if copy is not None else None,
        "floor_s": floor, "load_s": times, "median_excluding_first_s": med,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers to write (default 4)")
    parser.add_argument("--scale", type=int, default=1, help="divide every dimension by this (default 1)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--loads", type=int, default=6, help="in-process loads of each route (default 6)")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if args.loads < 2:
        parser.error(
            f"--loads must be at least 2 (the first load of each route is left out), got {args.loads}"
        )
    import jax
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda (the default): torch sees no CUDA GPU here; use --device cpu")
    rows = []
    with tempfile.TemporaryDirectory(prefix="qbridge-raw-route-") as tmp:
        root = pathlib.Path(tmp)
        (root / "ckpt").mkdir()
        weights = write_checkpoint(root / "ckpt", args.layers, args.scale, args.device)
        size = (root / "ckpt" / "model.safetensors").stat().st_size
        env = {
            **os.environ,
            "TRITON_CACHE_DIR": str(root / "triton"),
            "QBRIDGE_CACHE_DIR": str(root / "qbridge"),
        }
        env.pop("QBRIDGE_TRITON_COMPILE", None)
        if args.device == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
        for caches in ("empty", "warm"):
            for method, script, target in (
                ("qbridge.load_checkpoint", QBRIDGE, str(root / "ckpt")),
                (
                    "raw route: bitsandbytes + jax.dlpack.from_dlpack",
                    RAW,
                    str(root / "ckpt" / "model.safetensors"),
                ),
            ):
                row = {"caches": caches, "method": method, **run(script, target, args.device, env)}
                rows.append(row)
                print(
                    f"{caches:<6}{method:<52}process {row['process_s']:7.2f} s  imports {row['import_s']:6.2f} s  "
                    f"load {row['load_s']:7.3f} s  ({row['weights']} weights)",
                    flush=True,
                )
        in_process = repeated_loads(root / "ckpt", size, args.device, args.loads)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {
        "device": device, "torch": torch.__version__, "jax": jax.__version__, "layers": args.layers,
        "scale": args.scale, "weights": weights, "file_bytes": size, "rows": rows, "in_process": in_process,
    }  # fmt: skip
    for caches in ("empty", "warm"):
        mine, raw = (r for r in rows if r["caches"] == caches)
        print(
            f"{caches} caches: qbridge / raw route, whole process {mine['process_s'] / raw['process_s']:.2f}x"
        )
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
