"""An NF4 dequantize-matmul written for Hopper in Pallas' Mosaic GPU lowering, timed against the kernel
``jax_side.quantized_matmul`` uses (Pallas' Triton lowering) and a dense bf16 ``x @ W`` in XLA, per layer on
Llama-3-8B shapes at 16 tokens, with ``fused_matmul.py``'s weights and loop. Not wired into ``jax_side``.

The kernel swaps the operands: ``y.T = W @ x.T``, so that the decoded weight is the left operand of the
warpgroup MMA, held in registers (64 rows of W per program), and x's even and odd columns (split before
the kernel, meeting the high and low nibbles) are the right operand, read from shared memory. Packed bytes,
absmax and x reach shared memory through a TMA pipeline; a nested absmax is decoded by XLA before the
call. Three decodes of the nibbles:

- ``prmt``: four 16-entry float32 lookups per 24 instructions (20 of them byte permutes (``prmt.b32``), the
  float32 table's bytes held as immediates), then ``* absmax`` and one rounding, as bitsandbytes;
- ``select``: a tree of 15 selects per nibble;
- ``none``: ``nibble - 8`` (wrong values; the time of everything else in the kernel, a bound).

Needs a Hopper GPU and a JAX whose Pallas has the Mosaic GPU lowering (JAX 0.11.2 ran it; 0.10.2 lowers it).
``--emulate`` checks the permute scheme alone, on any machine, against the table for every pair of bytes::

    python benchmarks/fused_matmul_mosaic.py --out benchmarks/results/fused-matmul-mosaic-h200.json
    python benchmarks/fused_matmul_mosaic.py --emulate
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jax_side._codes import standard_code

try:  # JAX 0.11: importing the Mosaic GPU module no longer registers its pallas lowering
    from jax._src.pallas.mosaic_gpu import pallas_call_registration  # noqa: F401
except ImportError:
    pass

NF4 = [float(v) for v in standard_code("nf4")]  # bitsandbytes' table, as jax_side decodes it


def _decode(v, table):
    """table[v] for v int32 in [0, 16): a tree of 15 selects."""
    vals = [jnp.float32(t) for t in table]
    level = vals
    bit = 1
    while len(level) > 1:
        c = (v & bit) != 0
        level = [jnp.where(c, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
        bit *= 2
    return level[0]


def _table_words(table):
    """The 16 float32 entries' bytes regrouped for prmt: word [p][w] holds byte p of entries 4w..4w+3."""
    b = np.asarray(table, np.float32).view(np.uint32)
    return [
        [sum(((int(b[4 * w + i]) >> (8 * p)) & 0xFF) << (8 * i) for i in range(4)) for w in range(4)]
        for p in range(4)
    ]


def _lookup_ptx(table):
    """PTX: $4 holds four nibble indices (bits 0-15); $0..$3 get table[index] (float32 bits) for each."""
    W = _table_words(table)
    lines = [
        "{",
        ".reg .b32 s7, s2, t, lo, hi, r0, r1, r2, r3, u01, u23, v01, v23, w0, w1, w2, w3;",
        "and.b32 s7, $4, 0x7777;",
        "shr.b32 t, $4, 1;",
        "and.b32 t, t, 0x4444;",
        "or.b32 s2, t, 0x3210;",
    ]
    for p in range(4):
        lines += [f"mov.b32 w{w}, 0x{W[p][w]:08x};" for w in range(4)]
        lines += ["prmt.b32 lo, w0, w1, s7;", "prmt.b32 hi, w2, w3, s7;", f"prmt.b32 r{p}, lo, hi, s2;"]
    lines += [
        "prmt.b32 u01, r0, r1, 0x5140;",
        "prmt.b32 u23, r2, r3, 0x5140;",
        "prmt.b32 v01, r0, r1, 0x7362;",
        "prmt.b32 v23, r2, r3, 0x7362;",
        "prmt.b32 $0, u01, u23, 0x5410;",
        "prmt.b32 $1, u01, u23, 0x7632;",
        "prmt.b32 $2, v01, v23, 0x5410;",
        "prmt.b32 $3, v01, v23, 0x7632;",
        "}",
    ]
    return "\n".join(lines)


def _prmt(a: int, b: int, c: int) -> int:
    """``prmt.b32`` in its default mode: byte i of the result is byte ``c``'s nibble i of ``{b, a}``."""
    src = a | (b << 32)
    return sum(((src >> (8 * ((c >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


_OPS = {
    "mov.b32": lambda v: v[0],
    "and.b32": lambda v: v[0] & v[1],
    "or.b32": lambda v: v[0] | v[1],
    "shr.b32": lambda v: v[0] >> v[1],
    "prmt.b32": lambda v: _prmt(*v),
}


def _run_ptx(ptx: str, sel: int) -> list[int]:
    """Interprets :func:`_lookup_ptx`'s text (its ``mov``, ``and``, ``or``, ``shr`` and ``prmt``) with
    ``$4 = sel``; returns ``$0..$3``."""
    regs = {"$4": sel}

    def val(x: str) -> int:
        return regs[x] if x in regs else int(x, 0)

    for line in ptx.splitlines():
        op, _, rest = line.strip().rstrip(";").partition(" ")
        if op in ("{", "}", ".reg"):
            continue
        d, *src = (t.strip() for t in rest.split(","))
        v = [val(t) for t in src]
        regs[d] = _OPS[op](v)
    return [regs[f"${i}"] for i in range(4)]


def emulate_lookup(table=NF4) -> None:
    """Runs :func:`_lookup_ptx`'s instructions on the CPU for every pair of bytes and compares the four
    results with ``table[nibble]``, bit for bit. Raises AssertionError on the first difference."""
    ptx = _lookup_ptx(table)
    want = np.asarray(table, np.float32).view(np.uint32)
    for sel in range(1 << 16):
        nibbles = [sel & 15, (sel >> 4) & 15, (sel >> 8) & 15, sel >> 12]
        got = _run_ptx(ptx, sel)
        assert got == [int(want[v]) for v in nibbles], (hex(sel), got)


def _prmt_decoder(tile_m, dtype, table):
    """(hi, lo) = table[q >> 4] * scale, table[q & 15] * scale, rounded to ``dtype``, decoded with byte
    permutes (16-entry lookups, four per instruction group) instead of a tree of selects."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, vector
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mgu

    ptx = _lookup_ptx(table)
    out_t = plgpu.ShapeDtypeStruct((tile_m, 32), jnp.dtype(dtype), layout=plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA), return_type=(out_t, out_t))
    def decode(ctx, q, scale):
        i32 = ir.IntegerType.get_signless(32)
        i16 = ir.IntegerType.get_signless(16)
        f32 = ir.F32Type.get()
        odt = ir.BF16Type.get() if jnp.dtype(dtype) == jnp.bfloat16 else ir.F16Type.get()
        struct = llvm.StructType.get_literal([i32] * 4)
        v2 = ir.VectorType.get((2,), f32)
        o2 = ir.VectorType.get((2,), odt)
        hi_regs = np.empty(q.registers.shape, dtype=object)
        lo_regs = np.empty(q.registers.shape, dtype=object)
        for idx, reg in np.ndenumerate(q.registers):
            sel = arith.extui(i32, mgu.bitcast(reg, i16))  # byte 0: element 0, byte 1: element 1
            out = llvm.inline_asm(struct, [sel], ptx, "=r,=r,=r,=r,r")
            lo0, hi0, lo1, hi1 = (mgu.bitcast(llvm.extractvalue(i32, out, [i]), f32) for i in range(4))
            sreg = scale.registers[idx]
            s0 = vector.extract(sreg, dynamic_position=[], static_position=[0])
            s1 = vector.extract(sreg, dynamic_position=[], static_position=[1])
            for regs, (a, b) in ((hi_regs, (hi0, hi1)), (lo_regs, (lo0, lo1))):
                v = vector.from_elements(v2, [arith.mulf(a, s0), arith.mulf(b, s1)])
                regs[idx] = arith.truncf(o2, v)  # round to nearest even, as astype
        return tuple(
            fa.FragmentedArray(_registers=r, _layout=q.layout, _is_signed=None) for r in (hi_regs, lo_regs)
        )

    return decode


def nf4_matmul(x, q, absmax_t, *, decode="prmt", bpr=4, split=None, stages=4, table=NF4):
    """``x [T, k] @ W.T`` -> ``[T, n]`` in ``x.dtype`` (bf16 or f16; T up to 32), where ``W [n, k]`` is the
    NF4 weight held as bitsandbytes packs it: ``q`` uint8 ``[n, k / 2]`` (high nibble = even column) and
    its decoded absmax, float32, transposed to ``[k / 64, n]``. Each element is decoded as
    ``round(table[nibble] * absmax)`` to ``x.dtype`` (bitsandbytes' order), multiplied on the tensor cores
    with float32 accumulation. ``decode``: "prmt" (byte-permute lookups), "select" (a tree of selects) or
    "none" (``nibble - 8``: wrong values, a bound for the rest of the kernel). ``bpr``: absmax blocks per
    row per pipeline step; ``split``: programs along the contraction (default: until the grid fills the
    132 multiprocessors); ``stages``: pipeline depth."""
    tile_m = 64
    t_rows, k = x.shape
    n = q.shape[0]
    nb = 32 * bpr  # bytes per row per step
    ke = 64 * bpr  # elements per step
    assert k % ke == 0 and n % tile_m == 0
    N = max(16, -(-t_rows // 16) * 16)
    steps = k // ke
    tiles = n // tile_m
    if split is None:
        split = 1
        while tiles * split < 132 and steps % (split * 2) == 0 and steps // (split * 2) >= 2:
            split *= 2
    sp = steps // split
    xp = jnp.zeros((N, k), x.dtype).at[:t_rows].set(x)
    xe = xp[:, 0::2].T  # [k/2, N]
    xo = xp[:, 1::2].T
    bits = 16
    x_swz = plgpu.find_swizzle(N * bits, "rhs")
    x_tr = (plgpu.TilingTransform((8, x_swz * 8 // bits)), plgpu.SwizzleTransform(x_swz))
    q_swz = plgpu.find_swizzle(nb * 8, "lhs")
    q_tr = (plgpu.TilingTransform((8, q_swz)), plgpu.SwizzleTransform(q_swz))

    sem = plgpu.LoweringSemantics.Warpgroup
    o_swz = plgpu.find_swizzle(N * 32, "out")
    o_tr = (plgpu.TilingTransform((8, o_swz * 8 // 32)), plgpu.SwizzleTransform(o_swz))

    decoder = _prmt_decoder(tile_m, x.dtype, table) if decode == "prmt" else None

    def step(_, q_smem, a_smem, xe_smem, xo_smem, acc_ref):
        qraw = q_smem[...]
        qv = qraw.astype(jnp.int32)
        for b in range(bpr):
            qb = qv[:, 32 * b : 32 * (b + 1)]
            sb = lax.broadcast_in_dim(a_smem[b], qb.shape, [0])
            if decoder is not None:
                hi, lo = decoder(qraw[:, 32 * b : 32 * (b + 1)], sb)
            else:
                dec = (
                    (lambda v: (v - 8).astype(jnp.float32))
                    if decode == "none"
                    else (lambda v: _decode(v, table))
                )
                hi = (dec(qb >> 4) * sb).astype(x.dtype)
                lo = (dec(qb & 15) * sb).astype(x.dtype)
            plgpu.wgmma(acc_ref, hi, xe_smem.at[pl.ds(32 * b, 32)])
            plgpu.wgmma(acc_ref, lo, xo_smem.at[pl.ds(32 * b, 32)])
            plgpu.wgmma_wait(0)
        return acc_ref

    def kernel(q_gmem, a_gmem, xe_gmem, xo_gmem, out_gmem, out_smem):
        i = lax.axis_index("n")
        j = lax.axis_index("s")
        rows = pl.ds(i * tile_m, tile_m)

        def scoped(acc_ref):
            plgpu.emit_pipeline(
                step,
                grid=(sp,),
                in_specs=[
                    plgpu.BlockSpec((tile_m, nb), lambda s: (0, s), transforms=q_tr),
                    plgpu.BlockSpec((bpr, tile_m), lambda s: (s, 0)),
                    plgpu.BlockSpec((ke // 2, N), lambda s: (s, 0), transforms=x_tr),
                    plgpu.BlockSpec((ke // 2, N), lambda s: (s, 0), transforms=x_tr),
                ],
                max_concurrent_steps=stages,
                init_carry=acc_ref,
            )(
                q_gmem.at[rows, pl.ds(j * sp * nb, sp * nb)],
                a_gmem.at[pl.ds(j * sp * bpr, sp * bpr), rows],
                xe_gmem.at[pl.ds(j * sp * (ke // 2), sp * (ke // 2))],
                xo_gmem.at[pl.ds(j * sp * (ke // 2), sp * (ke // 2))],
            )
            out_smem[...] = acc_ref[...]

        pl.run_scoped(scoped, plgpu.ACC((tile_m, N), jnp.float32))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[j, rows])
        plgpu.wait_smem_to_gmem(0)

    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((split, n, N), jnp.float32),
        grid=(tiles, split),
        grid_names=("n", "s"),
        scratch_types=dict(out_smem=plgpu.SMEM((tile_m, N), jnp.float32, transforms=o_tr)),
        compiler_params=plgpu.CompilerParams(lowering_semantics=sem),
    )(q, absmax_t, xe, xo)
    return out.sum(0)[:, :t_rows].T.astype(x.dtype)


def reference(x, q, absmax_t, table=NF4):
    """The same product in float32 from the dense weight decoded by XLA (rounded to ``x.dtype`` first)."""
    n = q.shape[0]
    tab = jnp.asarray(table, jnp.float32)
    hi = tab[(q >> 4).astype(jnp.int32)]
    lo = tab[(q & 15).astype(jnp.int32)]
    w = jnp.stack([hi, lo], -1).reshape(n, -1)  # [n, k]
    a = jnp.repeat(absmax_t.T, 64, axis=1)
    w = (w * a).astype(x.dtype).astype(jnp.float32)
    return jnp.dot(x.astype(jnp.float32), w.T, precision="highest")


def _pieces(w):
    """An ``NF4Weight``'s packed bytes ``[n, k / 2]`` and decoded absmax ``[k / 64, n]``."""
    from jax_side._nf4 import decode_nested_absmax

    n, k = w.shape
    a = decode_nested_absmax(w.absmax, w.nested_absmax, w.nested_code, w.nested_blocksize, w.offset)
    return w.packed.reshape(n, k // 2), a.reshape(n, k // 64).T


def mosaic(**cfg):
    """``fn(x, w)`` for ``fused_matmul.time_per_matmul``: the absmax decode included in the time."""

    def fn(x, w):
        q, a = _pieces(w)
        return nf4_matmul(x, q, a, **cfg)

    return fn


def main() -> None:
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import fused_matmul as fm

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16])
    parser.add_argument(
        "--emulate", action="store_true", help="check the permute scheme on the CPU, then stop"
    )
    args = parser.parse_args()
    emulate_lookup()
    print("permute scheme: equal to the table for all 65536 pairs of bytes", flush=True)
    if args.emulate:
        return
    rng = np.random.default_rng(0)
    for n, k, t in [(4096, 4096, 16), (192, 768, 3)]:
        w = fm.nf4_weight(rng, n, k)
        x = jnp.asarray(rng.standard_normal((t, k), dtype=np.float32)).astype(jnp.bfloat16)
        q, a = _pieces(w)
        want = np.asarray(reference(x, q, a))
        for decode in ("prmt", "select"):
            got = np.asarray(jax.jit(mosaic(decode=decode))(x, w), np.float32)
            err = float(np.abs(got - want).max() / np.abs(want).max())
            print(f"check {n}x{k} T={t} {decode}: max rel err {err:.2e}", flush=True)
            assert err < 2e-2, err
    rows = []
    for n, k in fm.SHAPES:
        ws = fm.copies(fm.nf4_weight, n, k, rng)
        count = max(2, int(np.ceil(3 * fm.L2_BYTES / (n * k * 2))))
        dense = [
            jnp.asarray(rng.standard_normal((k, n), dtype=np.float32)).astype(jnp.bfloat16)
            for _ in range(count)
        ]
        for t in args.tokens:
            x = jnp.asarray(rng.standard_normal((t, k), dtype=np.float32)).astype(jnp.bfloat16)
            r = {"n": n, "k": k, "tokens": t}
            r["dense_us"] = fm.time_per_matmul(fm.dense, dense, x) * 1e6
            r["in_use_us"] = fm.time_per_matmul(fm.fused, ws, x) * 1e6
            for decode in ("prmt", "select", "none"):
                r[f"mosaic_{decode}_us"] = fm.time_per_matmul(mosaic(decode=decode), ws, x) * 1e6
            print(
                json.dumps({key: round(v, 1) if isinstance(v, float) else v for key, v in r.items()}),
                flush=True,
            )
            rows.append(r)
    if args.out:
        meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
        pathlib.Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
