"""Python's garbage collector during a load at about DeepSeek-V3's tensor count.

Writes DeepSeek-V3's tensors and names at tiny shapes (``deepseek_v3_scale.py --tiny``'s layout: every layer
a MoE layer with 256 routed experts and a shared one, MLA attention, norms, FP8 weights with their 128x128
scale grids) for ``--layers`` layers (default 61, the real model's layer count: 95,038 tensors, against the
real model's about 91,000 with 58 MoE layers), then times, in one process, opening and planning the
checkpoint and whole loads under three settings, alternating: the older generations' collections deferred
(``qbridge._gc.FACTOR`` at its default, what a load does), left alone (``FACTOR = 1``), and the collector
switched off during the load. Before each timing the heap is collected (``gc.collect()``, not timed); right
after each load a further ``gc.collect()`` is timed, the collection work a load leaves behind (a deferred
load leaves more). At tiny shapes the wall time per tensor is host work. Per setting: the median over
``--rounds`` and the rounds' range; the ratios against "left alone" are the claim. The checkpoint is deleted
at the end unless ``--dir`` is given.

    python benchmarks/loader_gc.py --device cpu --out benchmarks/results/loader-gc-2core.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time

import deepseek_v3_scale as ds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers", type=int, default=61, help="layers, each a MoE layer (default 61: 95,038 tensors)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each timing both settings")
    parser.add_argument(
        "--dir", default=None, help="where to write the checkpoint (default: a temporary dir)"
    )
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if args.layers < 1 or args.rounds < 1:
        parser.error("--layers and --rounds must be at least 1")
    if args.out and not pathlib.Path(args.out).resolve().parent.is_dir():
        parser.error(f"--out {args.out}: its folder does not exist")

    import jax
    import torch

    import qbridge
    from qbridge import _gc
    from qbridge._checkpoint import open_checkpoint
    from qbridge._devices import resolve_device
    from qbridge._loader import plan_load

    try:
        resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        parser.error(f"--device {args.device}: {e}")

    ds.use_tiny_shapes()
    root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="loader-gc-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        count, nbytes = ds.write_checkpoint(root, args.layers, 256, "cpu")
    except BaseException:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
        raise
    print(f"wrote {count} tensors, {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s to {root}")
    print(
        f"objects the collector tracks before loading: {len(gc.get_objects())}; thresholds {gc.get_threshold()}"
    )

    def open_and_plan() -> float:
        gc.collect()
        start = time.perf_counter()
        with _gc.older_generations_deferred(), open_checkpoint(root) as ckpt:
            plan_load(ckpt, None, dtype=None, kinds=None, rename=None, strict=True)
        return (time.perf_counter() - start) / count * 1e6

    def load() -> tuple[float, float]:
        gc.collect()
        start = time.perf_counter()
        params = qbridge.load_checkpoint(root, device=args.device, progress=False)
        jax.block_until_ready(params)
        took = time.perf_counter() - start
        start = time.perf_counter()
        gc.collect()  # what the load left to collect (params still held)
        left = time.perf_counter() - start
        del params
        return took / count * 1e6, left / count * 1e6

    default = _gc.FACTOR
    settings = {f"deferred x{default}": default, "left alone": 1, "switched off": None}
    kinds = ("open_plan", "load", "collect_after")
    times: dict[str, dict[str, list[float]]] = {name: {k: [] for k in kinds} for name in settings}
    try:
        load()  # warm-up: imports, kernels, the model's classification
        for r in range(args.rounds):
            for name, factor in settings.items():
                _gc.FACTOR = factor or 1
                if factor is None:
                    gc.disable()
                try:
                    times[name]["open_plan"].append(open_and_plan())
                    took, left = load()
                finally:
                    gc.enable()
                times[name]["load"].append(took)
                times[name]["collect_after"].append(left)
            print(f"round {r + 1}: " + "; ".join(
                f"{n}: open+plan {t['open_plan'][-1]:.1f}, load {t['load'][-1]:.1f} (+{t['collect_after'][-1]:.1f} "
                "collected after)" for n, t in times.items()
            ) + " us/tensor")  # fmt: skip
    finally:
        _gc.FACTOR = default
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    medians = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    alone = medians["left alone"]
    print(f"{count} tensors, us per tensor, median [range] of {args.rounds} rounds:")
    for name, t in times.items():
        m = medians[name]
        print(
            f"  {name:14s} open+plan {m['open_plan']:6.1f} [{min(t['open_plan']):.1f}-{max(t['open_plan']):.1f}] "
            f"({m['open_plan'] / alone['open_plan']:.2f}x)  load {m['load']:6.1f} [{min(t['load']):.1f}-"
            f"{max(t['load']):.1f}] ({m['load'] / alone['load']:.2f}x)  load + the collection after "
            f"{m['load'] + m['collect_after']:6.1f} ({(m['load'] + m['collect_after']) / (alone['load'] + alone['collect_after']):.2f}x)"
        )  # fmt: skip
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
