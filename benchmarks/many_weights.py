"""Many weights at once against one call per weight (GPU machine): ``python benchmarks/many_weights.py [--out F]``.

Each row times a whole list, the device synchronized before and after, median of 7 runs after 2 warm-up
runs (kernels compiled, plans made; ``torch_side.wait_for_kernels()`` first), and reports wall
microseconds per weight and the host microseconds per weight the Python thread spent before the final
wait. Peers in the same run: a loop of single calls, bitsandbytes ``dequantize_4bit`` per weight, a
one-128x128-tile-per-program FP8 launch per weight, bare ``jax.dlpack.from_dlpack`` per tensor. Random data.
"""

import argparse
import json
import statistics
import time

import bitsandbytes.functional as F
import jax
import torch

import qbridge
import torch_side
from qbridge._bench_kernels import one_tile_per_program_fp8


def timed(fn, reps=7):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    walls, hosts = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        walls.append(t2 - t0)
        hosts.append(t1 - t0)
    return statistics.median(walls), statistics.median(hosts)


def fp8_rows(row, n, shape):
    Ws = [(torch.randn(shape, device="cuda") * 64).to(torch.float8_e4m3fn) for _ in range(n)]
    ss = [torch.rand(-(-shape[0] // 128), -(-shape[1] // 128), device="cuda") for _ in range(n)]
    outs = [torch.empty(shape, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
    case = f"FP8 {n} x {shape[0]}x{shape[1]}"
    row(case, "dequantize_fp8_many", n, lambda: torch_side.dequantize_fp8_many(Ws, ss))
    row(
        case,
        "dequantize_fp8 per weight",
        n,
        lambda: [torch_side.dequantize_fp8(w, s) for w, s in zip(Ws, ss)],
    )
    row(case, "one 128x128 tile per program, per weight", n,
        lambda: [one_tile_per_program_fp8(w, s, o) for w, s, o in zip(Ws, ss, outs)])  # fmt: skip
    row(case, "dequantize_fp8_many(transpose=True)", n,
        lambda: torch_side.dequantize_fp8_many(Ws, ss, transpose=True))  # fmt: skip
    row(case, "dequantize_fp8(transpose=True) per weight", n,
        lambda: [torch_side.dequantize_fp8(w, s, transpose=True) for w, s in zip(Ws, ss)])  # fmt: skip


def nf4_rows(row, n, shape):
    items = [F.quantize_4bit(torch.randn(shape, device="cuda", dtype=torch.bfloat16), quant_type="nf4",
                             compress_statistics=True) for _ in range(n)]  # fmt: skip
    packed = [p for p, _ in items]
    states = [qs for _, qs in items]
    case = f"NF4 nested {n} x {shape[0]}x{shape[1]}"
    row(case, "dequantize_many", n, lambda: torch_side.dequantize_many(packed, states))
    row(case, "dequantize per weight", n, lambda: [torch_side.dequantize(p, q) for p, q in items])
    row(
        case,
        "bitsandbytes dequantize_4bit per weight",
        n,
        lambda: [F.dequantize_4bit(p, q) for p, q in items],
    )


def handoff_rows(row, n, shape):
    ts = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
    case = f"to JAX {n} x {shape[0]}x{shape[1]} bf16"
    row(case, "to_jax_many", n, lambda: jax.block_until_ready(qbridge.to_jax_many(ts)))
    row(case, "to_jax per tensor", n, lambda: jax.block_until_ready([qbridge.to_jax(t) for t in ts]))
    row(case, 'to_jax(producer="current") per tensor', n,
        lambda: jax.block_until_ready([qbridge.to_jax(t, producer="current") for t in ts]))  # fmt: skip
    row(case, "jax.dlpack.from_dlpack per tensor", n,
        lambda: jax.block_until_ready([jax.dlpack.from_dlpack(t) for t in ts]))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch_side.wait_for_kernels()  # every call below runs the compiled kernels
    rows = []

    def row(case, method, n, fn, peer=None):
        wall, host = timed(fn)
        rows.append(dict(case=case, method=method, n=n, wall_us_per_weight=wall / n * 1e6,
                         host_us_per_weight=host / n * 1e6))  # fmt: skip
        r = rows[-1]
        print(
            f"{case:<44}{method:<44}{r['wall_us_per_weight']:>10.1f}{r['host_us_per_weight']:>10.1f}",
            flush=True,
        )

    print(f"{'case':<44}{'method':<44}{'wall us':>10}{'host us':>10}  (per weight)")
    for n, shape in ((256, (2048, 7168)), (256, (7168, 2048)), (64, (576, 7168))):
        fp8_rows(row, n, shape)
    for n, shape in ((128, (1024, 4096)), (32, (4096, 4096)), (32, (14336, 4096))):
        nf4_rows(row, n, shape)
    for n, shape in ((256, (2048, 7168)), (1024, (1024, 1024))):
        handoff_rows(row, n, shape)
    if args.out:
        versions = {"torch": torch.__version__, "jax": jax.__version__}
        with open(args.out, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "versions": versions, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
