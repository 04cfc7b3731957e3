"""Python's garbage collector during a load at DeepSeek-V3's tensor count.

Writes DeepSeek-V3's tensors and names at tiny shapes (``deepseek_v3_scale.py --tiny``'s layout: every MoE
layer's 256 routed experts and shared expert, MLA attention, norms, FP8 weights with their 128x128 scale
grids) for ``--layers`` layers (default 61, the whole model's layer count: 95,038 tensors), then times, in
one process, opening and planning the checkpoint and whole loads with ``qbridge._gc.FACTOR`` (the older
generations' collections deferred during a load) at its default and at 1 (left alone), alternating. At tiny
shapes the wall time per tensor is host work. Medians over ``--rounds``; the ratio is the claim.

    python benchmarks/loader_gc.py --device cpu --out benchmarks/results/loader-gc-2core.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import deepseek_v3_scale as ds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=61, help="MoE layers (default 61: 95,038 tensors)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each timing both settings")
    parser.add_argument(
        "--dir", default=None, help="where to write the checkpoint (default: a temporary dir)"
    )
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if args.layers < 1 or args.rounds < 1:
        parser.error("--layers and --rounds must be at least 1")

    import jax
    import torch

    import qbridge
    from qbridge import _gc
    from qbridge._checkpoint import open_checkpoint
    from qbridge._loader import plan_load

    ds.HIDDEN, ds.MOE_INTER, ds.Q_LORA, ds.KV_LORA, ds.ROPE, ds.HEADS = 256, 128, 128, 64, 64, 2  # --tiny's
    root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="loader-gc-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    count, nbytes = ds.write_checkpoint(root, args.layers, 256, "cpu")
    print(f"wrote {count} tensors, {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s to {root}")
    print(
        f"objects the collector tracks before loading: {len(gc.get_objects())}; thresholds {gc.get_threshold()}"
    )

    def open_and_plan() -> float:
        start = time.perf_counter()
        with _gc.older_generations_deferred(), open_checkpoint(root) as ckpt:
            plan_load(ckpt, None, dtype=None, kinds=None, rename=None, strict=True)
        return (time.perf_counter() - start) / count * 1e6

    def load() -> float:
        start = time.perf_counter()
        params = qbridge.load_checkpoint(root, device=args.device, progress=False)
        jax.block_until_ready(params)
        took = time.perf_counter() - start
        del params
        return took / count * 1e6

    default = _gc.FACTOR
    settings = {f"deferred x{default}": default, "left alone": 1}
    times: dict[str, dict[str, list[float]]] = {name: {"open_plan": [], "load": []} for name in settings}
    load()  # warm-up: imports, kernels, the model's classification
    for r in range(args.rounds):
        for name, factor in settings.items():
            _gc.FACTOR = factor
            times[name]["open_plan"].append(open_and_plan())
            times[name]["load"].append(load())
        print(f"round {r + 1}: " + "; ".join(
            f"{n}: open+plan {t['open_plan'][-1]:.1f}, load {t['load'][-1]:.1f} us/tensor" for n, t in times.items()
        ))  # fmt: skip
    _gc.FACTOR = default
    medians = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    mine, alone = medians[f"deferred x{default}"], medians["left alone"]
    print(
        f"{count} tensors, median of {args.rounds}: open+plan {mine['open_plan']:.1f} against "
        f"{alone['open_plan']:.1f} us/tensor ({mine['open_plan'] / alone['open_plan']:.2f}x); whole load "
        f"{mine['load']:.1f} against {alone['load']:.1f} us/tensor ({mine['load'] / alone['load']:.2f}x)"
    )
    if args.out:
        result = {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
            else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "jax": jax.__version__},
            "layers": args.layers,
            "tensors": count,
            "bytes": nbytes,
            "us_per_tensor": times,
            "medians": medians,
        }  # fmt: skip
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
