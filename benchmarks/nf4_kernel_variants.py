"""Variants of the fused NF4 kernel, timed per layer on one GPU against XLA's dense ``x @ W`` (the loop and
weights of ``fused_matmul.py``): the kernel as it was before 2026-11-30 (``base``: a 16-row tensor-core
tile for any row count, x read with a stride of 2), the next step's bytes prefetched by hand (``pf``),
x's even and odd columns split before the kernel (``xs``), more waves of programs, wider tiles, software
pipelining, one row of x on the vector units (``gemv*``), and, as a bound only, a decode without the table
lookup (``*_notable``, wrong values). Every variant but the bound is first checked against a float32
expand-then-matmul.

    python benchmarks/nf4_kernel_variants.py base pf pf_xs gemv_w4 ...   # names from VARS and GEMV
    SHAPES="4096x4096" TOKENS="1 16" python benchmarks/nf4_kernel_variants.py
    INTERP=1 JAX_PLATFORMS=cpu python benchmarks/nf4_kernel_variants.py  # the checks only, interpreted

Results: ``results/nf4-kernel-variants-h200.txt``.
"""

from __future__ import annotations

import functools
import os
import sys

if os.environ.get("INTERP") == "1":  # XLA's CPU compiler would fold the kernels' roundings away
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false"

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fused_matmul as fm

from jax_side import _fused
from jax_side._codes import standard_code
from jax_side._nf4 import _bytes as _packed_bytes

INTERPRET = os.environ.get("INTERP") == "1"


def kernel_v(
    x_ref,
    xo_ref,
    packed_ref,
    absmax_ref,
    nabs_ref,
    ncode_ref,
    offset_ref,
    code_ref,
    out_ref,
    *,
    m,
    n,
    groups,
    half,
    bg,
    steps,
    nested_blocksize,
    nested,
    wdtype,
    t,
    prefetch,
    xsplit,
    notable=False,
    select=False,
):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    # select: the 16 table entries read once per program, each nibble decoded by a tree of 15 selects
    # (no gather in the loop, so that Triton can pipeline it); the same float32 values as the lookup
    entries = [code_ref[j] for j in range(16)] if select else None

    def lookup(nibble):
        if entries is None:
            return code_ref[nibble]
        level = entries
        for bit in (1, 2, 4, 8):
            on = (nibble & bit) != 0
            level = [jnp.where(on, level[2 * j + 1], level[2 * j]) for j in range(len(level) // 2)]
        return level[0]

    p = _fused._program(m, n, t)
    pn, ps, pm, rows, row_ok, x_ok = p
    kb = bg * half
    cdtype = x_ref.dtype

    def load_w(i):
        g0 = (ps * steps + i) * bg
        gs = g0 + jnp.arange(bg)
        ok = row_ok[:, None] & (gs < groups)[None, :] & (i < steps)
        q = plt.load(packed_ref.at[pl.ds(pn * t.bn, t.bn), pl.ds(g0, bg), :], mask=ok[:, :, None], other=0)
        a = plt.load(absmax_ref.at[pl.ds(pn * t.bn, t.bn), pl.ds(g0, bg)], mask=ok, other=0)
        return q, a

    def load_x(i):
        g0 = (ps * steps + i) * bg
        k_ok = (g0 * half + jnp.arange(kb)) < groups * half
        x_mask = x_ok[:, None] & k_ok[None, :] & (i < steps)
        if xsplit:
            xe = plt.load(x_ref.at[pl.ds(pm * t.bm, t.bm), pl.ds(g0 * half, kb)], mask=x_mask, other=0)
            xo = plt.load(xo_ref.at[pl.ds(pm * t.bm, t.bm), pl.ds(g0 * half, kb)], mask=x_mask, other=0)
        else:
            even = jnp.broadcast_to(2 * (g0 * half + jnp.arange(kb))[None, :], (t.bm, kb))
            xrows = jnp.broadcast_to((pm * t.bm + jnp.arange(t.bm))[:, None], (t.bm, kb))
            xe = plt.load(x_ref.at[xrows, even], mask=x_mask, other=0)
            xo = plt.load(x_ref.at[xrows, even + 1], mask=x_mask, other=0)
        return xe, xo

    def compute(i, q, a, xe, xo, acc):
        g0 = (ps * steps + i) * bg
        gs = g0 + jnp.arange(bg)
        if nested:
            block = jnp.minimum(
                (rows[:, None] * groups + gs[None, :]) // nested_blocksize, nabs_ref.shape[0] - 1
            )
            scale = ncode_ref[a.astype(jnp.int32)] * nabs_ref[block] + offset_ref[0]
        else:
            scale = a
        scale = scale[:, :, None]
        if notable:
            hi = (
                (((q >> 4).astype(jnp.int32) - 8).astype(jnp.float32) * scale)
                .astype(wdtype)
                .astype(cdtype)
                .reshape(t.bn, kb)
            )
            lo = (
                (((q & 15).astype(jnp.int32) - 8).astype(jnp.float32) * scale)
                .astype(wdtype)
                .astype(cdtype)
                .reshape(t.bn, kb)
            )
            return acc + _fused._dot(xe, hi) + _fused._dot(xo, lo)
        hi = (lookup((q >> 4).astype(jnp.int32)) * scale).astype(wdtype).astype(cdtype).reshape(t.bn, kb)
        lo = (lookup((q & 15).astype(jnp.int32)) * scale).astype(wdtype).astype(cdtype).reshape(t.bn, kb)
        return acc + _fused._dot(xe, hi) + _fused._dot(xo, lo)

    acc0 = jnp.zeros((t.bm, t.bn), jnp.float32)
    if prefetch:

        def body(i, carry):
            acc, q, a, xe, xo = carry
            nq, na = load_w(i + 1)
            nxe, nxo = load_x(i + 1)
            acc = compute(i, q, a, xe, xo, acc)
            return acc, nq, na, nxe, nxo

        q, a = load_w(0)
        xe, xo = load_x(0)
        acc = jax.lax.fori_loop(0, steps, body, (acc0, q, a, xe, xo))[0]
    else:

        def body(i, acc):
            q, a = load_w(i)
            xe, xo = load_x(i)
            return compute(i, q, a, xe, xo, acc)

        acc = jax.lax.fori_loop(0, steps, body, acc0)
    _fused._store(out_ref, acc, p, t)


def gemv_kernel(
    xe_ref,
    xo_ref,
    packed_ref,
    absmax_ref,
    nabs_ref,
    ncode_ref,
    offset_ref,
    code_ref,
    out_ref,
    *,
    groups,
    half,
    bg,
    steps,
    nested_blocksize,
    nested,
    wdtype,
    bn,
    n,
    split,
    cdtype,
    notable=False,
):
    """m == 1 on the vector units: acc[bn, kb] += decoded * x, one reduction at the end."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    pn, ps = pl.program_id(0), pl.program_id(1)
    rows = pn * bn + jnp.arange(bn)
    row_ok = rows < n
    kb = bg * half

    def body(i, acc):
        g0 = (ps * steps + i) * bg
        gs = g0 + jnp.arange(bg)
        ok = row_ok[:, None] & (gs < groups)[None, :]
        q = plt.load(packed_ref.at[pl.ds(pn * bn, bn), pl.ds(g0, bg), :], mask=ok[:, :, None], other=0)
        a = plt.load(absmax_ref.at[pl.ds(pn * bn, bn), pl.ds(g0, bg)], mask=ok, other=0)
        k_ok = (g0 * half + jnp.arange(kb)) < groups * half
        xe = plt.load(xe_ref.at[pl.ds(g0 * half, kb)], mask=k_ok, other=0).astype(jnp.float32)
        xo = plt.load(xo_ref.at[pl.ds(g0 * half, kb)], mask=k_ok, other=0).astype(jnp.float32)
        if nested:
            block = jnp.minimum(
                (rows[:, None] * groups + gs[None, :]) // nested_blocksize, nabs_ref.shape[0] - 1
            )
            scale = ncode_ref[a.astype(jnp.int32)] * nabs_ref[block] + offset_ref[0]
        else:
            scale = a
        scale = scale[:, :, None]
        if notable:
            ch = ((q >> 4).astype(jnp.int32) - 8).astype(jnp.float32)
            cl = ((q & 15).astype(jnp.int32) - 8).astype(jnp.float32)
        else:
            ch = code_ref[(q >> 4).astype(jnp.int32)]
            cl = code_ref[(q & 15).astype(jnp.int32)]
        hi = (ch * scale).astype(wdtype).astype(cdtype).astype(jnp.float32).reshape(bn, kb)
        lo = (cl * scale).astype(wdtype).astype(cdtype).astype(jnp.float32).reshape(bn, kb)
        return acc + hi * xe[None, :] + lo * xo[None, :]

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bn, kb), jnp.float32))
    y = jnp.sum(acc, axis=1)
    if split == 1:
        plt.store(out_ref.at[pl.ds(pn * bn, bn)], y.astype(out_ref.dtype), mask=row_ok)
    else:
        plt.store(out_ref.at[ps, pl.ds(pn * bn, bn)], y, mask=row_ok)


def gemv(x, w, *, bn=32, bk=256, waves=2, warps=4, stages=1, notable=False):
    from jax.experimental import pallas as pl

    n, k = w.shape
    assert x.shape[0] == 1
    bs = w.blocksize
    half, groups = bs // 2, k // bs
    bk = max(bs, bk)
    bg = bk // bs
    k_steps = -(-groups // bg)
    programs = -(-n // bn)
    split = max(1, min(k_steps, -(-waves * _fused._SMS // programs)))
    steps = -(-k_steps // split)
    split = -(-k_steps // steps)
    flat, _ = _packed_bytes(w.packed)
    packed = flat[: n * k // 2].reshape(n, groups, half)
    absmax = w.absmax.reshape(n, groups)
    nested = w.nested_absmax is not None
    nabs = w.nested_absmax.reshape(-1) if nested else jnp.zeros((1,), jnp.float32)
    ncode = w.nested_code.reshape(-1) if nested else jnp.zeros((1,), jnp.float32)
    offset = jnp.asarray(0.0 if w.offset is None else w.offset, jnp.float32).reshape(1)
    code = jnp.asarray(standard_code(w.quant_type)) if w.code is None else w.code.reshape(-1)
    xe, xo = x[0, 0::2], x[0, 1::2]
    kernel = functools.partial(
        gemv_kernel,
        groups=groups,
        half=half,
        bg=bg,
        steps=steps,
        nested_blocksize=w.nested_blocksize,
        nested=nested,
        wdtype=jnp.dtype(w.dtype),
        bn=bn,
        n=n,
        split=split,
        cdtype=x.dtype,
        notable=notable,
    )
    shape = (n,) if split == 1 else (split, n)
    from jax.experimental.pallas import triton as plt

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(shape, x.dtype if split == 1 else jnp.float32),
        grid=(pl.cdiv(n, bn), split),
        interpret=INTERPRET,
        compiler_params=None if INTERPRET else plt.CompilerParams(num_warps=warps, num_stages=stages),
        name="gemv",
    )(xe, xo, packed, absmax, nabs, ncode, offset, code)
    out = out if split == 1 else out.sum(0)
    return out.astype(x.dtype)[None, :]


def nf4_matmul_v(
    x, w, *, prefetch, xsplit, waves=1, bn=None, bk=None, warps=4, stages=1, notable=False, select=False
):
    n, k = w.shape
    m = x.shape[0]
    bs = w.blocksize
    half, groups = bs // 2, k // bs
    t = _fused._tiles(m, n, k, bs, gathers=True)
    if bn or bk or waves != 1:
        bn = bn or t.bn
        bk = max(bs, bk or t.bk)
        programs = -(-m // t.bm) * -(-n // bn)
        s = max(1, min(-(-k // bk), -(-waves * _fused._SMS // programs)))
        t = t._replace(bn=bn, bk=bk, split=s)
    t = t._replace(warps=warps, stages=stages)
    bg = t.bk // bs
    steps, t = _fused._split_steps(-(-groups // bg), t)
    flat, _ = _packed_bytes(w.packed)
    packed = flat[: n * k // 2].reshape(n, groups, half)
    absmax = w.absmax.reshape(n, groups)
    nested = w.nested_absmax is not None
    nabs = w.nested_absmax.reshape(-1) if nested else jnp.zeros((1,), jnp.float32)
    ncode = w.nested_code.reshape(-1) if nested else jnp.zeros((1,), jnp.float32)
    offset = jnp.asarray(0.0 if w.offset is None else w.offset, jnp.float32).reshape(1)
    code = jnp.asarray(standard_code(w.quant_type)) if w.code is None else w.code.reshape(-1)
    if xsplit:
        xe, xo = x[:, 0::2], x[:, 1::2]
    else:
        xe, xo = x, x[:1, :1]
    kernel = functools.partial(
        kernel_v,
        m=m,
        n=n,
        groups=groups,
        half=half,
        bg=bg,
        steps=steps,
        nested_blocksize=w.nested_blocksize,
        nested=nested,
        wdtype=jnp.dtype(w.dtype),
        t=t,
        prefetch=prefetch,
        xsplit=xsplit,
        notable=notable,
        select=select,
    )
    return _fused._call(
        kernel,
        (xe, xo, packed, absmax, nabs, ncode, offset, code),
        m=m,
        n=n,
        dtype=x.dtype,
        t=t,
        interpret=INTERPRET,
        name="v",
    )


VARS = {
    "base": dict(prefetch=False, xsplit=False),
    "pf": dict(prefetch=True, xsplit=False),
    "pf_xs": dict(prefetch=True, xsplit=True),
    "xs": dict(prefetch=False, xsplit=True),
    "pf_w4": dict(prefetch=True, xsplit=False, waves=4),
    "pf_w4_bn64_8w": dict(prefetch=True, xsplit=False, waves=4, bn=64, warps=8),
    "pf_bk512": dict(prefetch=True, xsplit=False, bk=512),
    "pf_w2_bk512": dict(prefetch=True, xsplit=False, bk=512, waves=2),
    "pf_st2": dict(prefetch=True, xsplit=False, stages=2),
    "pf_notable": dict(prefetch=True, xsplit=False, notable=True),
    # gather-free decodes, pipelined by Triton (2026-12-01): a bound without the table, and the select tree
    "notable_st3": dict(prefetch=False, xsplit=False, notable=True, stages=3),
    "sel": dict(prefetch=False, xsplit=False, select=True),
    "sel_st3": dict(prefetch=False, xsplit=False, select=True, stages=3),
    "sel_st3_bn64": dict(prefetch=False, xsplit=False, select=True, stages=3, bn=64),
    "xs_sel_st3": dict(prefetch=False, xsplit=True, select=True, stages=3),
}


GEMV = {
    "gemv": dict(),
    "gemv_w4": dict(waves=4),
    "gemv_bn16_bk512": dict(bn=16, bk=512, waves=4),
    "gemv_bn64_bk128_8w": dict(bn=64, bk=128, waves=4, warps=8),
    "gemv_st3": dict(stages=3, waves=4),
    "gemv_notable": dict(waves=4, notable=True),
}


def check():
    rng = np.random.default_rng(1)
    for (n, k), m in [((96, 320), 3), ((200, 640), 20)]:
        w = fm.nf4_weight(rng, n, k)
        x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
        ref = np.asarray(x) @ np.asarray(w.dequantize(dtype=jnp.float32)).T
        for name, kw in VARS.items():
            if kw.get("notable"):
                continue
            got = np.asarray(jax.jit(lambda x, w, kw=kw: nf4_matmul_v(x, w, **kw))(x, w))
            err = np.abs(got - ref).max() / np.abs(ref).max()
            print(f"check {name} {n}x{k} m={m}: {err:.2e}", flush=True)
            assert err < 1e-4, (name, err)
        if m == 3:
            x1 = x[:1]
            ref1 = ref[:1]
            for name, kw in GEMV.items():
                if kw.get("notable"):
                    continue
                got = np.asarray(jax.jit(lambda x, w, kw=kw: gemv(x, w, **kw))(x1, w))
                err = np.abs(got - ref1).max() / np.abs(ref1).max()
                print(f"check {name} {n}x{k}: {err:.2e}", flush=True)
                assert err < 1e-4, (name, err)


def main():
    check()
    if INTERPRET:
        return
    rng = np.random.default_rng(0)
    names = sys.argv[1:] or list(VARS)
    ceiling = fm.read_ceiling()
    print(f"{jax.devices()[0].device_kind} ceiling {ceiling / 1e12:.2f} TB/s", flush=True)
    for n, k in [
        tuple(map(int, v.split("x")))
        for v in os.environ.get("SHAPES", "4096x4096 14336x4096 4096x14336").split()
    ]:
        weights = fm.copies(fm.nf4_weight, n, k, rng)
        kernels = [
            jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) * 0.02, jnp.bfloat16)
            for _ in range(max(2, int(np.ceil(3 * fm.L2_BYTES / (n * k * 2)))))
        ]
        wb = fm.nbytes(weights[0])
        for m in [int(v) for v in os.environ.get("TOKENS", "1 16 128").split()]:
            x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), jnp.bfloat16)
            d = fm.time_per_matmul(fm.dense, kernels, x, reps=3)
            line = f"{n}x{k} m={m:3d} dense {d * 1e6:6.1f}"
            for name in names:
                if name in GEMV and m != 1:
                    continue
                kw = VARS.get(name) or GEMV[name]
                fn = gemv if name in GEMV else nf4_matmul_v
                try:
                    s = fm.time_per_matmul(lambda x, w, kw=kw, fn=fn: fn(x, w, **kw), weights, x, reps=3)
                    line += f" | {name} {s * 1e6:6.1f} ({wb / s / ceiling:4.0%})"
                except Exception as e:
                    line += f" | {name} ERR {type(e).__name__}: {str(e)[:80]}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
