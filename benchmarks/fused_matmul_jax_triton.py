"""Kept-quantized matmul through Triton itself (``jax_triton.triton_call``) instead of Pallas' Triton lowering:
the same decode-in-the-loop kernels written in Triton, timed per layer against the Pallas kernels that
``jax_side.quantized_matmul`` uses and against XLA's dense ``x @ W``, in one run, with ``fused_matmul.py``'s
weights, loop and read ceiling.

The kernels (``nf4_mm``, ``fp8_mm``) do what the Pallas ones do: a program takes ``BN`` rows of W and ``BM``
rows of x, walks its part of the contraction in ``BK`` steps, decodes each step's tile in registers (NF4:
the 16-entry table and the nested absmax, two float32 roundings; FP8: one 128x128 scale per tile), rounds
to bfloat16 and multiplies on the tensor cores; above one program per multiprocessor-wave, the contraction
is split and the float32 partial sums added after. Shapes are compile-time constants (``tl.constexpr``),
as JAX's shapes are static. ``enable_fp_fusion=False`` keeps the nested absmax's two roundings apart.
Configurations: ``(BM, BN, BK, warps, stages, waves)``. Every kernel is first checked against a float32
expand-then-matmul on odd shapes.

Needs a GPU, ``jax-triton`` (0.3.1 here) and Triton:

    python benchmarks/fused_matmul_jax_triton.py benchmarks/results/fused-matmul-jax-triton-h200.json

Results: ``results/fused-matmul-jax-triton-h200.json``.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import jax_triton as jt
import numpy as np
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fused_matmul as fm

from jax_side import _fused
from jax_side._nf4 import _bytes as _packed_bytes

SMS = 132


@triton.jit
def nf4_mm(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    nabs_ptr,
    ncode_ptr,
    code_ptr,
    offset_ptr,
    out_ptr,
    M: tl.constexpr,
    N: tl.constexpr,
    K: tl.constexpr,
    steps: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BS: tl.constexpr,
    NBS: tl.constexpr,
    NESTED: tl.constexpr,
    SPLIT: tl.constexpr,
    F32: tl.constexpr,
):
    pn = tl.program_id(0)
    ps = tl.program_id(1)
    pm = tl.program_id(2)
    G: tl.constexpr = BK // BS
    H: tl.constexpr = BS // 2
    rows = pn * BN + tl.arange(0, BN)
    row_ok = rows < N
    xr = pm * BM + tl.arange(0, BM)
    x_ok = xr < M
    groups = K // BS
    acc = tl.zeros([BM, BN], tl.float32)
    offset = tl.load(offset_ptr)
    hh = tl.arange(0, H)
    kk = tl.arange(0, BK // 2)
    for i in range(steps):
        g0 = (ps * steps + i) * G
        gs = g0 + tl.arange(0, G)
        ok = row_ok[:, None] & (gs < groups)[None, :]
        blocks = rows[:, None] * groups + gs[None, :]
        q = tl.load(packed_ptr + (blocks[:, :, None] * H + hh[None, None, :]), mask=ok[:, :, None], other=0)
        a = tl.load(absmax_ptr + blocks, mask=ok, other=0)
        if NESTED:
            s = tl.load(ncode_ptr + a.to(tl.int32)) * tl.load(nabs_ptr + blocks // NBS, mask=ok, other=0)
            s = s + offset
        else:
            s = a
        s3 = s[:, :, None]
        hi = tl.load(code_ptr + (q >> 4).to(tl.int32)) * s3
        lo = tl.load(code_ptr + (q & 15).to(tl.int32)) * s3
        hi = tl.reshape(hi.to(tl.bfloat16).to(x_ptr.dtype.element_ty), [BN, BK // 2])
        lo = tl.reshape(lo.to(tl.bfloat16).to(x_ptr.dtype.element_ty), [BN, BK // 2])
        ke = g0 * H + kk
        xm = x_ok[:, None] & (ke < groups * H)[None, :]
        xp = x_ptr + xr[:, None] * K + 2 * ke[None, :]
        xe = tl.load(xp, mask=xm, other=0)
        xo = tl.load(xp + 1, mask=xm, other=0)
        if F32:
            acc += tl.dot(xe, tl.trans(hi), input_precision="ieee")
            acc += tl.dot(xo, tl.trans(lo), input_precision="ieee")
        else:
            acc += tl.dot(xe, tl.trans(hi))
            acc += tl.dot(xo, tl.trans(lo))
    om = x_ok[:, None] & row_ok[None, :]
    if SPLIT == 1:
        tl.store(out_ptr + xr[:, None] * N + rows[None, :], acc.to(out_ptr.dtype.element_ty), mask=om)
    else:
        tl.store(out_ptr + ps * M * N + xr[:, None] * N + rows[None, :], acc, mask=om)


@triton.jit
def fp8_mm(
    x_ptr,
    w_ptr,
    s_ptr,
    out_ptr,
    M: tl.constexpr,
    N: tl.constexpr,
    K: tl.constexpr,
    steps: tl.constexpr,
    si: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BO: tl.constexpr,
    BI: tl.constexpr,
    SPLIT: tl.constexpr,
    F32: tl.constexpr,
):
    """128x128 block scales, BN <= BO, BK <= BI: one scale per tile."""
    pn = tl.program_id(0)
    ps = tl.program_id(1)
    pm = tl.program_id(2)
    rows = pn * BN + tl.arange(0, BN)
    row_ok = rows < N
    xr = pm * BM + tl.arange(0, BM)
    x_ok = xr < M
    acc = tl.zeros([BM, BN], tl.float32)
    kk = tl.arange(0, BK)
    srow = (pn * BN) // BO
    for i in range(steps):
        k0 = (ps * steps + i) * BK
        cols = k0 + kk
        col_ok = cols < K
        ok = row_ok[:, None] & col_ok[None, :]
        wq = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=ok, other=0.0)
        s = tl.load(s_ptr + srow * si + k0 // BI)
        w = (wq.to(tl.float32) * s).to(tl.bfloat16).to(x_ptr.dtype.element_ty)
        xt = tl.load(x_ptr + xr[:, None] * K + cols[None, :], mask=x_ok[:, None] & col_ok[None, :], other=0)
        if F32:
            acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(w))
    om = x_ok[:, None] & row_ok[None, :]
    if SPLIT == 1:
        tl.store(out_ptr + xr[:, None] * N + rows[None, :], acc.to(out_ptr.dtype.element_ty), mask=om)
    else:
        tl.store(out_ptr + ps * M * N + xr[:, None] * N + rows[None, :], acc, mask=om)


def split_for(m, n, k, BM, BN, BK, waves):
    ksteps = -(-k // BK)
    programs = -(-m // BM) * -(-n // BN)
    split = 1 if programs >= waves * SMS else max(1, min(ksteps, -(-waves * SMS // programs)))
    steps = -(-ksteps // split)
    return steps, -(-ksteps // steps)


def launch(kernel, args, x, n, k, cfg, **meta):
    """``kernel`` over ``x [m, k]`` and a ``[n, k]`` weight (``args``: the arrays after ``x``), with the tiles and
    contraction split of ``cfg``; the float32 partial sums added when split."""
    BM, BN, BK, warps, stages, waves = cfg
    m = x.shape[0]
    steps, split = split_for(m, n, k, BM, BN, BK, waves)
    out_shape = jax.ShapeDtypeStruct(
        (split, m, n) if split > 1 else (m, n), jnp.float32 if split > 1 else x.dtype
    )
    out = jt.triton_call(
        x,
        *args,
        M=m,
        N=n,
        K=k,
        steps=steps,
        kernel=kernel,
        out_shape=out_shape,
        grid=(triton.cdiv(n, BN), split, triton.cdiv(m, BM)),
        num_warps=warps,
        num_stages=stages,
        enable_fp_fusion=False,
        BM=BM,
        BN=BN,
        BK=BK,
        SPLIT=split,
        F32=x.dtype == jnp.float32,
        **meta,
    )
    return out.sum(0).astype(x.dtype) if split > 1 else out


def nf4_tt(x, w, cfg):
    n, k = w.shape
    flat, _ = _packed_bytes(w.packed)
    nested = w.nested_absmax is not None
    nabs = w.nested_absmax.reshape(-1) if nested else jnp.zeros((1,), jnp.float32)
    ncode = w.nested_code.reshape(-1) if nested else jnp.zeros((1,), jnp.float32)
    off = jnp.asarray(0.0 if w.offset is None else w.offset, jnp.float32).reshape(1)
    code = _fused._nf4_code(w).astype(jnp.float32)
    args = (flat, w.absmax.reshape(-1), nabs, ncode, code, off)
    return launch(nf4_mm, args, x, n, k, cfg, BS=w.blocksize, NBS=w.nested_blocksize, NESTED=nested)


def fp8_tt(x, w, cfg):
    n, k = w.weight.shape
    s = w.scale_inv.astype(jnp.float32)
    return launch(fp8_mm, (w.weight, s), x, n, k, cfg, si=s.shape[1], BO=128, BI=128)


SMALL_NF4 = [
    (16, 32, 256, 4, 1, 1),
    (16, 64, 256, 4, 1, 1),
    (16, 32, 256, 4, 2, 2),
    (16, 64, 128, 4, 3, 1),
    (16, 128, 128, 8, 3, 2),
    (16, 32, 512, 4, 1, 2),
]
SMALL_FP8 = [(16, 64, 128, 4, 4, 4), (16, 32, 128, 4, 4, 2), (16, 64, 128, 4, 3, 1), (16, 128, 128, 8, 4, 1)]
BIG_NF4 = [(64, 64, 128, 4, 1, 1), (64, 128, 128, 8, 3, 1)]
BIG_FP8 = [(64, 128, 128, 4, 3, 1), (128, 128, 128, 8, 3, 1)]


def check(rng):
    for make, fn, cfgs, (n, k), m in [
        (fm.nf4_weight, nf4_tt, SMALL_NF4[:2] + BIG_NF4[:1], (200, 320), 3),
        (fm.fp8_weight, fp8_tt, SMALL_FP8[:1] + BIG_FP8[:1], (300, 256), 20),
    ]:
        w = make(rng, n, k)
        for dt in (jnp.float32, jnp.bfloat16):
            x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32)).astype(dt)
            ref = (
                np.asarray(x.astype(jnp.float32))
                @ np.asarray(w.dequantize().astype(dt).astype(jnp.float32)).T
            )
            for cfg in cfgs:
                got = np.asarray(jax.jit(lambda x, w, cfg=cfg, fn=fn: fn(x, w, cfg))(x, w), np.float32)
                err = np.abs(got - ref).max() / np.abs(ref).max()
                print(f"check {make.__name__} {jnp.dtype(dt).name} {cfg}: {err:.2e}", flush=True)
                assert err < (1e-5 if dt == jnp.float32 else 2e-2), err


def main() -> None:
    rng = np.random.default_rng(0)
    check(rng)
    ceiling = fm.read_ceiling()
    print(
        f"{jax.devices()[0].device_kind}; jax {jax.__version__}; triton {triton.__version__}; ceiling {ceiling / 1e12:.2f} TB/s",
        flush=True,
    )
    rows = []
    for n, k in fm.SHAPES:
        for fmt, make, fn, small, big in (
            ("NF4", fm.nf4_weight, nf4_tt, SMALL_NF4, BIG_NF4),
            ("FP8", fm.fp8_weight, fp8_tt, SMALL_FP8, BIG_FP8),
        ):
            weights = fm.copies(make, n, k, rng)
            kernels_ = [
                jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) * 0.02, jnp.bfloat16)
                for _ in range(max(2, int(np.ceil(3 * fm.L2_BYTES / (n * k * 2)))))
            ]
            wbytes = fm.nbytes(weights[0])
            for m in (1, 16, 128):
                x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), jnp.bfloat16)
                d = fm.time_per_matmul(fm.dense, kernels_, x)
                p = fm.time_per_matmul(fm.fused, weights, x)
                res = {}
                for cfg in small if m <= 16 else big:
                    try:
                        res[str(cfg)] = fm.time_per_matmul(
                            lambda x, w, cfg=cfg, fn=fn: fn(x, w, cfg), weights, x
                        )
                    except Exception as e:
                        print("  fail", cfg, type(e).__name__, str(e)[:200], flush=True)
                best = min(res, key=res.get)
                rows.append(dict(fmt=fmt, n=n, k=k, m=m, dense=d, pallas=p, triton=res))
                print(
                    f"{fmt} {n}x{k} m={m:3d}: dense {d * 1e6:6.1f}  pallas {p * 1e6:6.1f} ({p / d:.2f}x)  triton best {res[best] * 1e6:6.1f} ({res[best] / d:.2f}x dense, {res[best] / p:.2f}x pallas, {wbytes / res[best] / ceiling:.0%} ceil) {best}",
                    flush=True,
                )
                print("   all:", {c: round(v * 1e6, 1) for c, v in res.items()}, flush=True)
    if len(sys.argv) > 1:
        pathlib.Path(sys.argv[1]).write_text(
            json.dumps(
                dict(
                    device=jax.devices()[0].device_kind,
                    jax=jax.__version__,
                    triton=triton.__version__,
                    jax_triton=jt.__version__,
                    ceiling=ceiling,
                    rows=rows,
                ),
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
