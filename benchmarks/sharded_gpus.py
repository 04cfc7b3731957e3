"""Per-device peak memory of a sharded load across the visible GPUs (Llama-3-8B layer shapes, NF4).

Writes N decoder layers (bitsandbytes on GPU 0), then loads them with every kernel split over all GPUs,
resetting each device's peak counter first: each GPU should peak near its share of the result plus one
shard's temporaries.

    python benchmarks/sharded_gpus.py --layers 2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import jax
import numpy as np
import torch
from convert_8b import SHAPES, write_checkpoint
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import qbridge


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    gpus = jax.local_devices(backend="gpu")
    mesh = Mesh(np.array(gpus), ("x",))
    rules = [
        (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel$", P(None, "x")),
        (r"(o_proj|down_proj)\.kernel$", P("x", None)),
    ]
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        path = pathlib.Path(tmp)
        write_checkpoint(path, args.layers)
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(i)
        start = time.perf_counter()
        params = qbridge.load_checkpoint(path, progress=False, sharding=(mesh, rules))
        jax.block_until_ready(params)
        seconds = time.perf_counter() - start
    dense = sum(int(np.prod(s)) for s in SHAPES.values()) * args.layers * 2
    largest = max(int(np.prod(s)) for s in SHAPES.values()) * 2
    rows = [
        {"gpu": i, "peak_gb": torch.cuda.max_memory_allocated(i) / 1e9}
        for i in range(torch.cuda.device_count())
    ]
    share = dense / len(gpus) / 1e9
    print(f"{torch.cuda.get_device_name()} x{len(gpus)}: {args.layers} Llama-3-8B layers, result {dense / 1e9:.2f} GB "
          f"(share {share:.2f} GB per GPU, largest weight {largest / 1e9:.3f} GB), loaded in {seconds:.2f} s")  # fmt: skip
    for r in rows:
        print(f"  GPU {r['gpu']}: peak {r['peak_gb']:.2f} GB = share + {r['peak_gb'] - share:.3f} GB")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "gpus": len(gpus),
            "layers": args.layers, "result_gb": dense / 1e9, "seconds": seconds, "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
