"""Per-tensor cost of handing a CUDA tensor to JAX: qbridge.to_jax against bare jax.dlpack.from_dlpack.

Host-side wall time per call (median of many calls, warm-up excluded); the GPU work each call queues is
tiny (stream waits), so the host time is the cost. Prints a table and writes JSON to --out.

    python benchmarks/handoff.py --out benchmarks/results/handoff.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import torch

import qbridge


def _median_us(fn, tensors, reps: int) -> float:
    for t in tensors[:20]:
        fn(t)
    times = []
    for i in range(reps):
        t = tensors[i % len(tensors)]
        t0 = time.perf_counter()
        fn(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for numel in (1024, 1 << 24):
        tensors = [torch.randn(numel, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        torch.cuda.synchronize()
        cases = {
            "jax.dlpack.from_dlpack (no stream care)": lambda t: jax.dlpack.from_dlpack(t),
            "qbridge.to_jax producer='current'": lambda t: qbridge.to_jax(t, producer="current"),
            "qbridge.to_jax (default, producer='auto')": lambda t: qbridge.to_jax(t),
        }
        for name, fn in cases.items():
            rows.append({"case": name, "numel": numel, "us_per_call": _median_us(fn, tensors, args.reps)})
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "jax": jax.__version__,
        "streams_scanned_by_auto": len(qbridge._handoff._torch_streams(0)),
        "rows": rows,
    }
    print(
        f"{info['device']}, torch {info['torch']}, jax {info['jax']}; 'auto' checks {info['streams_scanned_by_auto']} streams"
    )
    base = {r["numel"]: r["us_per_call"] for r in rows if r["case"].startswith("jax.")}
    for r in rows:
        print(
            f"{r['case']:<45} numel {r['numel']:>9}  {r['us_per_call']:8.1f} us  x{r['us_per_call'] / base[r['numel']]:.2f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
