"""Per-layer matmul with a kept-quantized weight: the fused kernel against expand-then-matmul and against a
dense bf16 ``x @ W`` in XLA, on Llama-3-8B layer shapes, on one GPU.

Weights are random NF4 (nested absmax, blocksize 64) and FP8 (float8_e4m3fn, 128x128 block scales) made in
JAX. Each figure is the time of one matmul inside a jitted loop (``lax.fori_loop``; each step feeds the
next, so nothing is hoisted) that rotates through enough weight copies to exceed the L2 several times,
median of 5 runs after a warm-up run. At one token ``quantized_matmul`` multiplies through XLA's one-row
reduction (the decode fused into it); the tensor-core kernel that larger token counts use is timed beside it.
FP8 from 2 to 16 tokens is also timed with a scale gathered per element of its 256-element steps over
128x128 blocks (``_fused._fp8_tiles``), as before one scale was loaded per half of a step. GB/s counts the bytes of the weight as
stored (packed bytes + absmax pieces, or FP8 values + scales; bf16 for dense) over that time, beside the
read ceiling (a reduction over 256 MiB arrays, timed the same way) measured in the same run.

    python benchmarks/fused_matmul.py --out benchmarks/results/fused-matmul-h200.json
    python benchmarks/fused_matmul.py --sweep      # try other tiles, print the best per case
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_side
from jax_side import _fused, _mosaic

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # [out, in]
TOKENS = [1, 16, 128]
L2_BYTES = 50 * 2**20


def nf4_weight(rng: np.random.Generator, n: int, k: int) -> jax_side.NF4Weight:
    blocks = n * k // 64
    return jax_side.NF4Weight(
        packed=jnp.asarray(rng.integers(0, 256, n * k // 2, dtype=np.uint8)),
        absmax=jnp.asarray(rng.integers(0, 256, blocks, dtype=np.uint8)),
        nested_absmax=jnp.asarray(rng.random(-(-blocks // 256), dtype=np.float32) * 0.01 + 1e-3),
        nested_code=jnp.asarray(np.sort(rng.uniform(-1, 1, 256)).astype(np.float32)),
        offset=jnp.float32(0.03),
        shape=(n, k),
    )


def fp8_weight(rng: np.random.Generator, n: int, k: int) -> jax_side.FP8Weight:
    w = jnp.asarray(rng.standard_normal((n, k), dtype=np.float32)).astype(jnp.float8_e4m3fn)
    scale = jnp.asarray(rng.random((-(-n // 128), -(-k // 128)), dtype=np.float32) * 0.01)
    return jax_side.FP8Weight(w, scale)


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def time_per_matmul(fn, weights, x, reps: int = 5, whole: bool = False) -> float:
    """Seconds per ``fn(x, w)`` inside one jitted loop over the weight copies."""
    steps = max(2, 64 // len(weights))

    @jax.jit
    def loop(x, weights):
        def body(_, carry):
            x, acc = carry
            for w in weights:
                y = fn(x, w)
                acc = acc + (y if whole else y[..., :1]).astype(jnp.float32).sum()
            x = x + (acc * 1e-30).astype(x.dtype)  # the next step depends on this one
            return x, acc

        return jax.lax.fori_loop(0, steps, body, (x, jnp.float32(0)))

    jax.block_until_ready(loop(x, weights))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(loop(x, weights))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / (steps * len(weights))


def read_ceiling() -> float:
    """Bytes read per second by a reduction over 256 MiB arrays (what a matmul does to its weight), timed
    like the matmuls: inside the same kind of jitted loop, rotating through four arrays."""
    rng = np.random.default_rng(0)
    arrays = [jnp.asarray(rng.random(2**26, dtype=np.float32)) for _ in range(4)]
    seconds = time_per_matmul(lambda x, a: a * x[0], arrays, jnp.ones((1,), jnp.float32), whole=True)
    return arrays[0].nbytes / seconds


def fused(x, w):
    with _fused.matmul_path("auto"):
        return _fused.quantized_matmul(x, w)


def expand(x, w):
    with _fused.matmul_path("expand"):
        return _fused.quantized_matmul(x, w)


def dense(x, kernel):
    return x @ kernel


def copies(make, n, k, rng) -> list:
    first = make(rng, n, k)
    count = int(np.clip(np.ceil(3 * L2_BYTES / nbytes(first)), 2, 16))
    return [first] + [make(rng, n, k) for _ in range(count - 1)]


def check(rng) -> None:
    """The fused path against expand-then-matmul in float32, on odd shapes, before timing anything."""
    for make, (n, k), m in [
        (nf4_weight, (200, 320), 3),
        (fp8_weight, (300, 200), 20),
        (nf4_weight, (4096, 4096), 1),
    ]:
        w = make(rng, n, k)
        x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
        want = np.asarray(x) @ np.asarray(w.dequantize(dtype=jnp.float32)).T
        for dt, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)):
            got = np.asarray(jax.jit(fused)(x.astype(dt), w), np.float32)
            ref = (
                np.asarray(x.astype(dt).astype(jnp.float32))
                @ np.asarray(w.dequantize().astype(dt).astype(jnp.float32)).T
            )
            err = np.abs(got - ref).max() / np.abs(ref).max()
            print(
                f"check {type(w).__name__} {n}x{k} m={m} {jnp.dtype(dt).name}: max rel err {err:.2e} (vs f32 {np.abs(got - want).max() / np.abs(want).max():.2e})"
            )
            assert err < tol, err


VARIANTS = [  # (bm, bn, bk, waves: programs aimed at, in multiples of the multiprocessors, warps, stages)
    (16, 32, 256, 1, 4, 1),
    (16, 32, 256, 4, 4, 1),
    (16, 32, 512, 4, 4, 1),
    (16, 64, 256, 4, 4, 1),
    (16, 64, 256, 4, 8, 1),
    (16, 32, 512, 8, 4, 1),
    (16, 64, 512, 4, 8, 1),
    (16, 128, 256, 2, 8, 1),
    (16, 32, 256, 4, 4, 2),
    (16, 32, 128, 1, 4, 3),
    (16, 64, 128, 1, 4, 3),
    (16, 64, 128, 4, 4, 3),
    (16, 128, 128, 4, 8, 3),
]


VARIANTS_MANY_ROWS = [  # above 16 rows of x: larger output tiles, more warps, deeper pipelines
    (128, 64, 128, 1, 4, 3),
    (128, 128, 128, 1, 8, 3),
    (64, 128, 128, 1, 4, 3),
    (64, 128, 128, 1, 8, 3),
    (128, 64, 128, 1, 8, 4),
    (64, 64, 128, 2, 4, 4),
    (128, 256, 128, 1, 8, 3),
    (128, 128, 128, 2, 8, 4),
]


def sweep(weights, x) -> list:
    """Times other tiles; prints the best three. The contraction is split until the grid holds ``waves``
    times as many programs as the card has multiprocessors (or every program takes one step)."""
    out = []
    many = x.shape[0] > 16
    for bm, bn, bk, waves, warps, stages in VARIANTS_MANY_ROWS if many else VARIANTS:
        if many:
            bm = 64 if bm == 16 else bm

        def pick(m, n, k, step, gathers, bm=bm, bn=bn, bk=bk, waves=waves, warps=warps, stages=stages):
            bk = max(step, bk)
            programs = -(-m // bm) * -(-n // bn)
            s = max(1, min(-(-k // bk), -(-waves * _fused._SMS // programs)))
            return _fused._Tiles(bm, bn, bk, s, warps, stages)

        _fused._tiles_override = pick
        try:
            s = time_per_matmul(fused, weights, x, reps=3)
        except Exception as e:  # a tile that does not compile
            print(f"  tiles {bm, bn, bk, waves, warps, stages}: {type(e).__name__}: {str(e)[:200]}")
            continue
        finally:
            _fused._tiles_override = None
        out.append((s, (bm, bn, bk, waves, warps, stages)))
    out.sort(key=lambda r: r[0])
    for s, t in out[:3]:
        print(f"  sweep {s * 1e6:7.1f} us (bm, bn, bk, waves, warps, stages) = {t}")
    return out[:5]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--shapes", nargs="*", default=[f"{n}x{k}" for n, k in SHAPES], help="OUTxIN")
    parser.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    parser.add_argument("--formats", nargs="*", default=["NF4", "FP8"])
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    formats = [(f, {"NF4": nf4_weight, "FP8": fp8_weight}[f]) for f in args.formats]
    rng = np.random.default_rng(0)
    check(rng)
    ceiling = read_ceiling()
    dev = jax.devices()[0].device_kind
    print(f"{dev}; jax {jax.__version__}; read ceiling {ceiling / 1e12:.2f} TB/s")
    rows = []
    for (n, k), (fmt, make) in itertools.product(shapes, formats):
        weights = copies(make, n, k, rng)
        kernels = [
            jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) * 0.02, jnp.bfloat16)
            for _ in range(max(2, int(np.ceil(3 * L2_BYTES / (n * k * 2)))))
        ]
        wbytes = nbytes(weights[0])
        for m in args.tokens:
            x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), jnp.bfloat16)
            row = {
                "format": fmt,
                "shape": [n, k],
                "tokens": m,
                "weight_bytes": wbytes,
                "dense_bytes": n * k * 2,
            }
            row["dense_s"] = time_per_matmul(dense, kernels, x)
            row["expand_s"] = time_per_matmul(expand, weights, x)
            row["fused_s"] = time_per_matmul(fused, weights, x)
            if m == 1:  # the same row through the tensor-core kernel, as before the vector-unit one
                _fused._one_row_in_xla = False
                try:
                    row["fused_tensor_cores_s"] = time_per_matmul(fused, weights, x)
                finally:
                    _fused._one_row_in_xla = True
            # the Triton kernel's variants below: with the Mosaic GPU kernel (Hopper, 2-128 rows) set aside
            if fmt == "FP8" and 1 < m <= 16:  # a scale gathered per element there, as before
                _fused._fp8_two_scales, _mosaic._force = False, False
                try:
                    row["fused_per_element_scales_s"] = time_per_matmul(fused, weights, x)
                finally:
                    _fused._fp8_two_scales, _mosaic._force = True, None
            if args.sweep:
                _mosaic._force = False
                try:
                    row["sweep"] = sweep(weights, x)
                finally:
                    _mosaic._force = None
            rows.append(row)
            print(f"{fmt} {n}x{k} tokens {m:3d}: dense {row['dense_s'] * 1e6:7.1f} us ({n * k * 2 / row['dense_s'] / ceiling:4.0%} of ceiling)"
                  f"  expand {row['expand_s'] * 1e6:7.1f} us  fused {row['fused_s'] * 1e6:7.1f} us ({wbytes / row['fused_s'] / ceiling:4.0%})"
                  f"  fused/dense {row['fused_s'] / row['dense_s']:.2f}x  floor {wbytes / ceiling * 1e6:.1f} us"
                  + (f"  tensor cores {row['fused_tensor_cores_s'] * 1e6:.1f} us" if m == 1 else "")
                  + (f"  per-element scales {row['fused_per_element_scales_s'] * 1e6:.1f} us" if "fused_per_element_scales_s" in row else "")
                  , flush=True)  # fmt: skip
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"device": dev, "jax": jax.__version__, "read_ceiling_Bps": ceiling,
                                                      "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
