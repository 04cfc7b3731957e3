"""``x @ dequantize(W).T`` for 4-bit and FP8 weights on Hopper GPUs, in Pallas' Mosaic GPU lowering.

The operands are swapped, ``y.T = W @ x.T``, so that the decoded weight is the warpgroup MMA's left operand,
held in registers (64 rows of W per program), and x is the right operand in shared memory (its rows padded
to 16, 32, 64 or 128, the MMA's N). Weight bytes, scales and x reach shared memory through a TMA pipeline;
each block of a row is decoded in registers and multiplied on the tensor cores with float32 accumulation.

- 4-bit: x's even and odd columns meet the high and low nibbles of bitsandbytes' packed bytes (XLA orders
  each 64 or 128 columns of x evens first, in the one transpose that pads x before the call). Each element
  is ``round(code[nibble] * absmax)`` in x's dtype (bitsandbytes' order of operations, as
  ``jax_side.dequantize_nf4`` then a cast). Each row's 16 products are made once per absmax block, a
  quarter by each of the four threads that hold the row and shared by shuffles within the quad, and
  looked up by byte permutes (``prmt.b32``: 12 instructions per four elements, no multiply or rounding per
  element); ``_products = False`` looks the table up instead and multiplies each element (24 instructions
  per four float32 lookups). A nested absmax is handed over as stored: each program copies its codes, the
  tile's nested absmax and their table into shared memory and decodes its scales once before its loop, with
  the eager decode's two roundings (:func:`_absmax_filler`); where those copies cannot be whole TMA units
  (``in`` not a multiple of 1024, say) or do not fit beside the pipeline, XLA decodes it before the call.
- FP8 (float8_e4m3fn): ``round(float32(w) * scale)`` in x's dtype (``jax_side.dequantize_fp8``'s order).
  Block scales of 128 columns whose blocks span whole 64-row tiles (DeepSeek-V3's 128x128) are read as
  stored: each program copies the part of its row of the grid it needs once, and waits for it at its
  pipeline's first step, while the pipeline's first copies of W and x are on their way. Other layouts are
  laid out by XLA before the call as each row's scale per 128 columns (1/128 of the weight's elements).

Weights that share x (a layer's q/k/v or gate/up) can take one launch (:func:`matmul_group`): the grid
holds every weight's tiles, each program taking its weight's pipeline; on an H200 a two-layer Llama forward
then took 0.95x the GPU time at 16 tokens of one launch per weight (``benchmarks/RESULTS.md``).

Measured on an H200 at Llama-3-8B's projection shapes (``benchmarks/fused_matmul_mosaic.py``,
``benchmarks/RESULTS.md``): the 4-bit kernel takes 0.50-0.85x the time of the Pallas Triton kernel in
``_fused`` at 16, 64 and 128 rows of x, the FP8 kernel 0.62-0.98x at 16 and 128 rows.

Differences from ``dequantize()`` then a matmul: a decoded product below FLT_MIN in magnitude is kept, not
flushed to zero (as in the Triton kernel; such a product moves a sum by less than FLT_MIN times an element of
x), and a nested absmax that XLA decodes inside a jit may round once where the eager decode rounds twice
(see ``jax_side._nf4``). :func:`takes` asks this process's devices, not the lowering's target: a program lowered
ahead of time on a Hopper host (``jax.export``) carries the kernel.

Which calls it takes (:func:`takes`): Hopper GPUs (compute capability 9.x: the warpgroup MMA), a JAX with
Pallas' Mosaic GPU lowering, 2 (1 with ``_one_row``) to ``MAX_ROWS`` (128) rows of bfloat16 or float16 x,
weights ``[out, in]`` with ``out`` a multiple of 64 and ``in`` a multiple of 256, rounded once
(``roundings`` of x's dtype or float32 only), outside ``jax.shard_map``'s varying axes; 4-bit weights with
blocksize 64 and the standard NF4/FP4 table (``code`` None: the table is compiled into the kernel), FP8
weights in float8_e4m3fn with per-tensor, per-row or block scales whose blocks span a multiple of 128
columns. Others go to ``_fused``'s Triton kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._codes import standard_code
from ._fp8 import fp8_scale_layout
from ._nf4 import _bytes as _packed_bytes
from ._nf4 import _decode_nested
from ._quantized import FP8Weight, NF4Weight
from ._varying import _varying_axes

# The most rows of x quantized_matmul hands the kernel (its own limit, _STAGES' largest). At 128 tokens on an
# H200, a two-layer Llama forward with this limit spent 0.71x (NF4) and 0.84x (FP8) of the GPU time it spent
# with a limit of 32 (the Triton kernel taking the rows above it); both were compiled in one process
# (benchmarks/profile_forward.py --also-rows; benchmarks/RESULTS.md).
MAX_ROWS = 128
_TILE = 64  # rows of W per program: the warpgroup MMA's M
_BLOCKS = 4  # absmax blocks per row per pipeline step (256 elements of the contraction)
_FP8_BLOCKS = 2  # FP8: 128-column scale blocks per step (256 elements)
_SMS = 132  # H100/H200 multiprocessors: from 33 rows of x the contraction is split until the grid fills them
# Up to 32 rows of x: a pipeline of 2 steps, and the contraction split until the grid holds this many programs
# (several per multiprocessor: the kernel waits on its own instructions' latency, and shared memory for 2 steps
# lets 4 programs share one, 3 for FP8 at 17-32 rows). On an H200, at 14336x4096 and 16 rows, the 4-bit kernel
# took 0.80x its time with 4 steps and the grid filled once; in a two-layer Llama forward the FP8 kernels took
# 0.92x (16 rows) and 0.82x (32 rows) of theirs (benchmarks/RESULTS.md).
_SMALL_STAGES = 2
_SMALL_PROGRAMS = 6 * _SMS
_TMA_SIDE = 256  # the most elements along each side of one TMA copy
_force: bool | None = None  # tests lower the kernel for CUDA on machines without a Hopper GPU through this
# True: one row of x comes here too (padded to 16 rows), not to XLA's one-row reduction (jax_side._fused)
_one_row = False


@functools.cache
def _unavailable() -> str | None:
    """None where this JAX has Pallas' Mosaic GPU lowering with what the kernel uses; else why not."""
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError as e:
        return f"this JAX ({jax.__version__}) has no Pallas Mosaic GPU lowering ({e})"
    try:  # JAX 0.11: importing plgpu no longer registers its pallas lowering
        from jax._src.pallas.mosaic_gpu import pallas_call_registration  # noqa: F401
    except ImportError:
        pass
    missing = [n for n in ("kernel", "emit_pipeline", "inline_mgpu", "wgmma", "ACC") if not hasattr(plgpu, n)]
    return f"this JAX's Mosaic GPU lowering lacks {', '.join(missing)}" if missing else None


@functools.cache
def _hopper() -> bool:
    """Whether this process's CUDA devices are all Hopper GPUs (compute capability 9.x)."""
    try:
        gpus = jax.devices("cuda")
    except RuntimeError:
        return False
    return bool(gpus) and all(str(getattr(d, "compute_capability", "")).startswith("9.") for d in gpus)


def _varies(args: tuple) -> bool:
    """Whether any of ``args`` varies along a ``jax.shard_map`` axis (the kernel declares no variance)."""
    return any(_varying_axes(a) for a in jax.tree_util.tree_leaves(args))


def takes(x2: jax.Array, w: Any) -> bool:
    """Whether this kernel multiplies ``x2 [m, in]`` by ``w`` (see the module docstring)."""
    if not isinstance(w, (NF4Weight, FP8Weight)) or not (_hopper() if _force is None else _force):
        return False
    m, k = x2.shape
    n = w.shape[0]
    if isinstance(w, NF4Weight):
        fits = w.code is None and w.blocksize == 64
        step = 64 * _BLOCKS
    else:
        layout = fp8_scale_layout(w.weight.shape, w.scale_inv.shape, w.block)
        fits = (
            w.weight.dtype == jnp.dtype(jnp.float8_e4m3fn)
            and not layout.stack
            and (layout.kind != "block" or layout.block[1] % 128 == 0)
        )
        step = 128 * _FP8_BLOCKS
    return (
        fits
        and (1 if _one_row else 2) <= m <= MAX_ROWS
        and x2.dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and n % _TILE == 0
        and k % step == 0
        and all(jnp.dtype(d) in (x2.dtype, jnp.dtype(jnp.float32)) for d in w.roundings)
        and not _varies((x2, w))
        and _unavailable() is None
    )


def _table_words(table: Any) -> list[list[int]]:
    """The 16 float32 entries' bytes regrouped for ``prmt``: ``[p][w]`` holds byte p of entries 4w..4w+3."""
    b = np.asarray(table, np.float32).view(np.uint32)
    return [[sum(((int(b[4 * w + i]) >> (8 * p)) & 0xFF) << (8 * i) for i in range(4)) for w in range(4)]
            for p in range(4)]  # fmt: skip


def lookup_ptx(table: Any) -> str:
    """PTX for four lookups in a 16-entry float32 ``table``: ``$4`` holds four 4-bit indices (bits 0-15), and
    ``$0..$3`` get ``table[index]``'s bits for each. ``prmt.b32 d, a, b, c`` picks byte i of ``d`` from the
    eight bytes of ``{b, a}`` by nibble i of ``c``: each of a float's four bytes is looked up in the entries
    below 8 and in those from 8 (``c``'s nibbles are the indices' low three bits), one of the two picked by
    the index's fourth bit, and the four bytes of each result gathered last."""
    words = _table_words(table)
    lines = ["{", ".reg .b32 s7, s2, t, lo, hi, r0, r1, r2, r3, u01, u23, v01, v23, w0, w1, w2, w3;",
             "and.b32 s7, $4, 0x7777;", "shr.b32 t, $4, 1;", "and.b32 t, t, 0x4444;", "or.b32 s2, t, 0x3210;"]  # fmt: skip
    for p in range(4):
        lines += [f"mov.b32 w{w}, 0x{words[p][w]:08x};" for w in range(4)]
        lines += ["prmt.b32 lo, w0, w1, s7;", "prmt.b32 hi, w2, w3, s7;", f"prmt.b32 r{p}, lo, hi, s2;"]
    lines += ["prmt.b32 u01, r0, r1, 0x5140;", "prmt.b32 u23, r2, r3, 0x5140;",
              "prmt.b32 v01, r0, r1, 0x7362;", "prmt.b32 v23, r2, r3, 0x7362;",
              "prmt.b32 $0, u01, u23, 0x5410;", "prmt.b32 $1, u01, u23, 0x7632;",
              "prmt.b32 $2, v01, v23, 0x5410;", "prmt.b32 $3, v01, v23, 0x7632;", "}"]  # fmt: skip
    return "\n".join(lines)


def _scale_register(scales: tuple, idx: tuple) -> Any:
    """The register of ``scales`` (one ``[64, 32]`` array per absmax block, in the warpgroup MMA's layout)
    that covers the elements of ``q``'s register ``idx`` (``q``: ``[64, 32 * len(scales)]``; the layout's
    second register axis counts column tiles of 8)."""
    block, tile = divmod(idx[1], 4)
    at = (*idx[:1], tile, *idx[2:])
    return scales[block].registers[at]


def _decoder(dtype: Any, table: Any, group: int = 1) -> Any:
    """``(hi, lo) = decode(q, *scales)``: ``q`` uint8 ``[64, 32 * group]`` (``group`` absmax blocks of 64
    rows), each of ``scales`` float32 ``[64, 32]`` (each row's absmax in one block); ``round(table[q >> 4] *
    scale)`` and ``round(table[q & 15] * scale)`` in ``dtype`` (bfloat16 or float16), in the warpgroup MMA's
    register layout."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, vector
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mgu
    from jax.experimental.pallas import mosaic_gpu as plgpu

    ptx = lookup_ptx(table)
    out = plgpu.ShapeDtypeStruct((_TILE, 32 * group), jnp.dtype(dtype), layout=plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,) * (1 + group), return_type=(out, out))
    def decode(ctx: Any, q: Any, *scales: Any) -> Any:
        i32, i16, f32 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(16), ir.F32Type.get()
        odt = ir.BF16Type.get() if jnp.dtype(dtype) == jnp.bfloat16 else ir.F16Type.get()
        struct = llvm.StructType.get_literal([i32] * 4)
        v2, o2 = ir.VectorType.get((2,), f32), ir.VectorType.get((2,), odt)
        hi_regs = np.empty(q.registers.shape, dtype=object)
        lo_regs = np.empty(q.registers.shape, dtype=object)
        for idx, reg in np.ndenumerate(q.registers):  # two bytes of one row: elements 2j..2j+3 of W
            sel = arith.extui(i32, mgu.bitcast(reg, i16))  # nibbles: lo0, hi0, lo1, hi1
            looked = llvm.inline_asm(struct, [sel], ptx, "=r,=r,=r,=r,r")
            assert isinstance(looked, ir.Value)
            lo0, hi0, lo1, hi1 = (mgu.bitcast(llvm.extractvalue(i32, looked, [i]), f32) for i in range(4))
            s = _scale_register(scales, idx)
            s0 = vector.extract(s, dynamic_position=[], static_position=[0])
            s1 = vector.extract(s, dynamic_position=[], static_position=[1])
            for regs, (a, b) in ((hi_regs, (hi0, hi1)), (lo_regs, (lo0, lo1))):
                pair = vector.from_elements(v2, [arith.mulf(a, s0), arith.mulf(b, s1)])
                regs[idx] = arith.truncf(o2, pair)  # to nearest even, as astype
        return tuple(
            fa.FragmentedArray(_registers=r, _layout=q.layout, _is_signed=None) for r in (hi_regs, lo_regs)
        )

    return decode


# Each row's 16 products ``round(table[j] * absmax)`` as two byte tables. Operands are numbered outputs first,
# then inputs: $8..$15 hold the products in pairs (entry 2i in bits 0-15 of $(8 + i), entry 2i + 1 in bits
# 16-31); $0..$3 get the low bytes of entries 4w..4w+3, $4..$7 their high bytes.
PRODUCT_TABLES_PTX = "\n".join(
    ["{"]
    + [f"prmt.b32 ${w}, ${2 * w + 8}, ${2 * w + 9}, 0x6420;" for w in range(4)]
    + [f"prmt.b32 ${w + 4}, ${2 * w + 8}, ${2 * w + 9}, 0x7531;" for w in range(4)]
    + ["}"]
)
# Four lookups in those tables: $2 holds four 4-bit indices (lo0, hi0, lo1, hi1), $3..$6 the low-byte table,
# $7..$10 the high-byte one; $0 gets the products of hi0 and hi1 as a pair, $1 those of lo0 and lo1.
PRODUCT_LOOKUP_PTX = "\n".join([
    "{", ".reg .b32 s7, s2, t, a, b, rl, rh;",
    "and.b32 s7, $2, 0x7777;", "shr.b32 t, $2, 1;", "and.b32 t, t, 0x4444;", "or.b32 s2, t, 0x3210;",
    "prmt.b32 a, $3, $4, s7;", "prmt.b32 b, $5, $6, s7;", "prmt.b32 rl, a, b, s2;",
    "prmt.b32 a, $7, $8, s7;", "prmt.b32 b, $9, $10, s7;", "prmt.b32 rh, a, b, s2;",
    "prmt.b32 $0, rl, rh, 0x7351;", "prmt.b32 $1, rl, rh, 0x6240;", "}",
])  # fmt: skip


# A row's two byte tables made by the four threads of a quad that hold the row (the warpgroup MMA's layout
# gives threads 4q..4q+3 of a warp the same rows), each making a quarter: thread t of the quad multiplies
# entries 4t..4t+3 (:func:`quad_entries`) into the pairs $8 (entries 4t, 4t + 1) and $9 (4t + 2, 4t + 3),
# permutes them into its word of each table, and gathers the quad's four words of each by shuffles within
# the quad (``shfl.sync.idx`` with segments of 4 lanes: ``c = 0x1c1f``). $0..$7 as PRODUCT_TABLES_PTX's:
# 4 multiplies, 2 conversions, 2 permutes and 8 shuffles per table, where each thread making all of it
# takes 16, 8 and 8.
QUAD_TABLES_PTX = "\n".join(
    ["{", ".reg .b32 lo, hi;", "prmt.b32 lo, $8, $9, 0x6420;", "prmt.b32 hi, $8, $9, 0x7531;"]
    + [f"shfl.sync.idx.b32 ${w}, lo, {w}, 0x1c1f, 0xffffffff;" for w in range(4)]
    + [f"shfl.sync.idx.b32 ${w + 4}, hi, {w}, 0x1c1f, 0xffffffff;" for w in range(4)]
    + ["}"]
)


def quad_entries(lane: int) -> range:
    """The table entries thread ``lane`` of a warp multiplies for QUAD_TABLES_PTX: its quarter of 16."""
    return range(4 * (lane % 4), 4 * (lane % 4) + 4)


def _products_decoder(dtype: Any, table: Any, group: int = 1) -> Any:
    """As :func:`_decoder`, with each row's 16 products ``round(table[j] * absmax)`` made once per absmax
    block and looked up (12 instructions per four elements, no multiply or rounding per element): the same
    values, as bitsandbytes rounds them. With ``_quad_tables`` the four threads holding a row make its
    products a quarter each and share them (QUAD_TABLES_PTX); otherwise each makes all 16."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, vector
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mgu
    from jax.experimental.pallas import mosaic_gpu as plgpu

    values = [float(v) for v in np.asarray(table, np.float32)]
    out = plgpu.ShapeDtypeStruct((_TILE, 32 * group), jnp.dtype(dtype), layout=plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,) * (1 + group), return_type=(out, out))
    def decode(ctx: Any, q: Any, *scales: Any) -> Any:
        i32, i16, f32 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(16), ir.F32Type.get()
        odt = ir.BF16Type.get() if jnp.dtype(dtype) == jnp.bfloat16 else ir.F16Type.get()
        v2, o2 = ir.VectorType.get((2,), f32), ir.VectorType.get((2,), odt)
        consts = [mgu.c(v, f32) for v in values]
        tables: dict[Any, list[Any]] = {}  # (block, the row a register holds) -> 8 words
        if _quad_tables:  # this thread's quarter of the table: quad_entries(lane)
            quarter = arith.andi(mgu.thread_idx(), mgu.c(3, i32))
            mine = [consts[i] for i in quad_entries(0)]
            for t in (1, 2, 3):
                at_t = arith.cmpi(arith.CmpIPredicate.eq, quarter, mgu.c(t, i32))
                mine = [arith.select(at_t, consts[e], v) for e, v in zip(quad_entries(t), mine, strict=True)]

        def quad_tables(s: Any) -> list[Any]:
            pairs = []
            for i in range(2):
                prods = vector.from_elements(v2, [arith.mulf(mine[2 * i], s), arith.mulf(mine[2 * i + 1], s)])
                pairs.append(mgu.bitcast(arith.truncf(o2, prods), i32))  # to nearest even, as astype
            words = llvm.inline_asm(llvm.StructType.get_literal([i32] * 8), pairs, QUAD_TABLES_PTX,
                                    ",".join(["=r"] * 8 + ["r"] * 2))  # fmt: skip
            assert isinstance(words, ir.Value)
            return [llvm.extractvalue(i32, words, [i]) for i in range(8)]

        def row_tables(s: Any) -> list[Any]:
            if _quad_tables:
                return quad_tables(s)
            pairs = []
            for i in range(8):
                prods = vector.from_elements(
                    v2, [arith.mulf(consts[2 * i], s), arith.mulf(consts[2 * i + 1], s)]
                )
                pairs.append(mgu.bitcast(arith.truncf(o2, prods), i32))  # to nearest even, as astype
            words = llvm.inline_asm(llvm.StructType.get_literal([i32] * 8), pairs, PRODUCT_TABLES_PTX,
                                    ",".join(["=r"] * 8 + ["r"] * 8))  # fmt: skip
            assert isinstance(words, ir.Value)
            return [llvm.extractvalue(i32, words, [i]) for i in range(8)]

        hi_regs = np.empty(q.registers.shape, dtype=object)
        lo_regs = np.empty(q.registers.shape, dtype=object)
        for idx, reg in np.ndenumerate(q.registers):  # two bytes of one row: elements 2j..2j+3 of W
            row = (
                idx[1] // 4,
                *idx[:1],
                *idx[2:],
            )  # the block, and the row: column tiles of a block share it
            if row not in tables:
                s = vector.extract(_scale_register(scales, idx), dynamic_position=[], static_position=[0])
                tables[row] = row_tables(s)
            sel = arith.extui(i32, mgu.bitcast(reg, i16))  # nibbles: lo0, hi0, lo1, hi1
            looked = llvm.inline_asm(llvm.StructType.get_literal([i32] * 2), [sel, *tables[row]],
                                     PRODUCT_LOOKUP_PTX, ",".join(["=r"] * 2 + ["r"] * 9))  # fmt: skip
            assert isinstance(looked, ir.Value)
            hi_regs[idx] = mgu.bitcast(llvm.extractvalue(i32, looked, [0]), o2)
            lo_regs[idx] = mgu.bitcast(llvm.extractvalue(i32, looked, [1]), o2)
        return tuple(
            fa.FragmentedArray(_registers=r, _layout=q.layout, _is_signed=None) for r in (hi_regs, lo_regs)
        )

    return decode


# False: FP8 block scales laid out per row by XLA before every call, as before 2026-12-01 (benchmarks time both)
_grid_scales = True
_products = True  # False: the byte-permute lookup of the table (benchmarks/fused_matmul_mosaic.py times both)
# True: each row's product tables made a quarter by each thread of the quad holding the row, and shared by
# shuffles (QUAD_TABLES_PTX); False: each thread makes the whole of each table (benchmarks time both)
_quad_tables = True


class _Format(NamedTuple):
    """How a weight's stored columns meet x: each absmax/scale block of a row holds ``cols`` stored columns
    (bytes of W) and meets ``len(xs)`` operands of x, ``x_rows`` rows of each; ``decode(w, scale)`` turns a
    ``[64, cols]`` block and its row scales (broadcast to ``[64, cols]``) into one left operand per x
    operand, in the warpgroup MMA's register layout."""

    cols: int
    x_rows: int
    blocks: int  # blocks per pipeline step
    decode: Any
    group: int = 1  # blocks per MMA: ``decode(w [64, cols * group], *scales)`` (x's rows per MMA: a multiple of 64 from
    # 64 tokens up, where x's tile swizzles 128 bytes)
    # left operands per block: x's rows for each ``group`` blocks hold each part's ``x_rows * group`` rows in turn
    parts: int = 1


class Nested(NamedTuple):
    """A 4-bit weight's nested absmax as stored, for the kernel to decode: ``codes`` uint8 ``[n, k / 64]`` (one
    per block of a row), ``nested_absmax`` float32 ``[n * k / 64 / nested_blocksize]``, ``nested_code`` float32
    ``[256]``, ``offset`` float32 ``[1]``."""

    codes: jax.Array
    nested_absmax: jax.Array
    nested_code: jax.Array
    offset: jax.Array
    nested_blocksize: int


_nested_in_kernel = True  # False: a nested absmax decoded by XLA before every call (benchmarks time both)
# True: a program waits for its row of an FP8 scale grid at its pipeline's first step, after the pipeline has
# issued its first copies of W and x; False: before the pipeline. (A nested absmax's wait and decode stay
# before the pipeline: at its first step they cost 3 % more kernel time at 16 tokens on an H200; RESULTS.md.)
_grid_wait_in_loop = True
_SMEM_LIMIT = 200 * 1024  # shared memory a program may take with a nested absmax held (H100/H200: 227 KiB)


def _smem_bytes(fmt: _Format, w: jax.Array, rows: int, stages: int) -> int:
    """Shared memory a program's pipeline and output take: ``stages`` steps of W's bytes and x, the output tile."""
    wb, xb = fmt.cols * fmt.blocks, fmt.parts * fmt.x_rows * fmt.blocks
    return stages * (_TILE * wb * w.dtype.itemsize + xb * rows * 2) + _TILE * rows * 4


def _nested_copy(nested: Nested, kb: int, width: int, smem: int) -> str | None:
    """How a program copies its absmax codes to decode them itself: ``"own"`` (its ``width`` columns) or
    ``"rows"`` (the tile's whole rows of ``kb`` codes); None where it cannot (TMA copies of whole 16-byte
    units and at most 256 elements a side; nested blocks that do not start with the tile; shared memory)."""
    nb = nested.nested_blocksize
    if not _nested_in_kernel or nested.nested_code.shape != (256,) or kb % 16 or _TILE * kb % nb:
        return None
    kn = _TILE * kb // nb  # nested absmax per tile
    copy = "own" if width % 16 == 0 and width <= _TMA_SIDE else "rows" if kb <= _TMA_SIDE else None
    held = _TILE * (width if copy == "own" else kb) + 4 * kn + 4 * 256 + 4 * _TILE * width
    return copy if copy and kn % 4 == 0 and kn <= _TMA_SIDE and smem + held <= _SMEM_LIMIT else None


def _decoded_t(nested: Nested, n: int, k: int) -> jax.Array:
    """A nested absmax of a weight ``[n, k]`` decoded by XLA (``decode_nested_absmax``), transposed: float32
    ``[k / 64, n]``."""
    codes = nested.codes.reshape(-1)
    absmax = _decode_nested(
        codes, nested.nested_absmax, nested.nested_code, nested.nested_blocksize, nested.offset.reshape(())
    )
    return absmax.reshape(n, k // 64).T


def _absmax_filler(width: int, *, kb: int, nested_blocksize: int) -> Any:
    """``fill(codes, nested, table, absmax, offset, col, first)``: decodes a program's nested absmax into
    ``absmax`` float32 ``[width, 64]`` (shared memory; ``absmax[c, r]`` the scale of the tile's row ``r`` in
    the program's block ``c``), as ``decode_nested_absmax`` on concrete arrays: ``flush(flush(table[code] *
    nested[a // nested_blocksize]) + offset)``, two roundings (no fused multiply-add), ``a`` the absmax's index
    in the tile. ``codes`` uint8 (the tile's rows; the program's block ``c`` at column ``first + c``),
    ``nested`` float32 (the tile's nested absmax), ``table`` float32 ``[256]``, ``offset`` float32 ``[1]`` in
    global memory, ``col`` the program's first block in a row. Ends with a warpgroup barrier."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, memref
    from jax.experimental.mosaic.gpu import utils as mgu
    from jax.experimental.pallas import mosaic_gpu as plgpu

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 5 + (plgpu.Layout.WGMMA,) * 2)
    def fill(
        ctx: Any, codes: Any, nested: Any, table: Any, absmax: Any, offset: Any, col: Any, first: Any
    ) -> None:
        i32, f32, index = ir.IntegerType.get_signless(32), ir.F32Type.get(), ir.IndexType.get()

        def c(v: int) -> Any:
            return mgu.c(v, i32)

        def at(v: Any) -> Any:
            return arith.index_castui(index, v)

        def rn(op: str, a: Any, b: Any) -> Any:  # rounded to nearest: never fused into a multiply-add
            return llvm.inline_asm(f32, [a, b], f"{op}.rn.f32 $0, $1, $2;", "=f,f,f")

        def flush(v: Any) -> Any:  # below FLT_MIN in magnitude: a zero of its sign (NaN kept)
            bits = mgu.bitcast(v, i32)
            small = arith.cmpi(arith.CmpIPredicate.ult, arith.andi(bits, c(0x7FFFFFFF)), c(0x00800000))
            return mgu.bitcast(arith.select(small, arith.andi(bits, c(-0x80000000)), bits), f32)

        t = arith.remui(mgu.thread_idx(), c(128))
        r, half = arith.remui(t, c(_TILE)), arith.divui(t, c(_TILE))  # a row; even or odd blocks
        col, first = col.registers.item(), first.registers.item()
        add = memref.load(offset, [at(c(0))])
        row_start = arith.muli(r, c(kb))
        for u in range(width // 2):
            blk = arith.addi(half, c(2 * u))  # the program's block
            code = memref.load(codes, [at(r), at(arith.addi(first, blk))])
            value = memref.load(table, [at(arith.extui(i32, code))])
            a = arith.addi(row_start, arith.addi(col, blk))
            scale = memref.load(nested, [at(arith.divui(a, c(nested_blocksize)))])
            memref.store(flush(rn("add", flush(rn("mul", value, scale)), add)), absmax, [at(blk), at(r)])
        mgu.warpgroup_barrier()

    return fill


def _swapped_matmul(xt: jax.Array, w: Any, scales_t: Any, fmt: _Format, *, m: int, out_dtype: Any,
                    split: int | None, stages: int, scale_rows: Any = None, nested: Any = None,
                    programs: int = 0) -> jax.Array:  # fmt: skip
    """``decode(W) @ xt`` -> ``[m, n]`` in ``out_dtype``: ``w [n, kw]`` stored columns, ``scales_t`` float32
    ``[kw / cols, n]``, ``xt [kx, rows]`` x transposed, its rows padded and, with ``fmt.parts`` left operands
    per block, each ``fmt.group`` blocks' rows ordered as the operands meet them.
    The contraction is split until the grid fills the multiprocessors, or holds ``programs`` programs where
    that is given (float32 partial sums, added by XLA one after another).

    With ``scale_rows`` (a multiple of 64), ``scales_t`` is instead a block-scale grid, float32
    ``[ceil(n / scale_rows), kw / cols]``: each program copies the part of its row its steps use into shared
    memory once (a multiple of 4 scales and at most 256, one TMA copy: the contraction is split no further
    than the first allows and at least as far as the second needs), waited for at the pipeline's first step
    (``_grid_wait_in_loop``), and ``decode`` gets each block's scale as a scalar.

    With ``nested`` (``scales_t`` None), each program copies its absmax codes, the tile's nested absmax and
    their table into shared memory and decodes its absmax there once (:func:`_absmax_filler`), where
    :func:`_nested_copy` allows; elsewhere XLA decodes it first.

    A group of weights that share x: ``w``, ``scales_t``, ``scale_rows`` and ``nested`` as tuples of one entry
    per weight (``kw`` equal, the same kind of scales), multiplied in one launch whose grid holds every
    weight's tiles in turn (each program takes the pipeline of the weight its tile is in): the result is
    ``[m, sum of n]``, the weights' outputs side by side. A program computes exactly what it computes for its
    weight alone with the same ``split``."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    grouped = isinstance(w, tuple)
    ws = w if grouped else (w,)
    count = len(ws)
    ss = scales_t if grouped else (scales_t,)
    srs = scale_rows if isinstance(scale_rows, tuple) else (scale_rows,) * count
    nesteds: tuple[Any, ...] = (nested,) * count if nested is None or isinstance(nested, Nested) else nested
    grid_kind = srs[0] is not None
    if {s is not None for s in srs} != {grid_kind} or len({nd is None for nd in nesteds}) != 1:
        raise ValueError("a group's weights must hold the same kind of scales")
    kw = ws[0].shape[1]
    if any(v.shape[1] != kw for v in ws):
        raise ValueError(f"a group's weights must have the same stored columns, got {[v.shape for v in ws]}")
    rows = xt.shape[1]  # the MMA's N
    wb, xb = fmt.cols * fmt.blocks, fmt.parts * fmt.x_rows * fmt.blocks  # stored columns and x rows per step
    if kw % wb:
        raise ValueError(f"the weight's {kw} stored columns are not whole pipeline steps of {wb}")
    steps = kw // wb
    member_tiles = [v.shape[0] // _TILE for v in ws]
    starts = [sum(member_tiles[:g]) for g in range(count)]  # each weight's first tile in the grid
    tiles, n = sum(member_tiles), sum(v.shape[0] for v in ws)

    def whole(parts: int) -> bool:  # a program's grid scales are whole 16-byte units (a TMA copy's)
        return not grid_kind or steps // parts * fmt.blocks % 4 == 0

    if split is None:
        split = 1
        while (
            tiles * split < (programs or _SMS)
            and steps % (split * 2) == 0
            and steps // (split * 2) >= 2
            and whole(split * 2)
        ):
            split *= 2
        if grid_kind:  # a program's grid scales: at most 256 (a TMA copy's side)
            split = max(split, _grid_split(steps, fmt.blocks) or split)
    if steps % split:
        raise ValueError(f"split={split} does not divide the contraction's {steps} steps of {xb} elements")
    sp = steps // split  # steps per program

    def transforms(minor_bytes: int, itemsize: int, kind: str) -> tuple:
        swz = plgpu.find_swizzle(minor_bytes * 8, kind)
        return (plgpu.TilingTransform((8, swz // itemsize)), plgpu.SwizzleTransform(swz))

    x_tr = transforms(rows * 2, 2, "rhs")
    w_tr = transforms(wb * ws[0].dtype.itemsize, ws[0].dtype.itemsize, "lhs")
    o_tr = transforms(rows * 4, 4, "out")

    width = sp * fmt.blocks  # a program's blocks (scales) per row
    if grid_kind and (any(r % _TILE for r in srs) or not whole(split) or width > _TMA_SIDE):
        raise ValueError(
            f"the kernel cannot read a block-scale grid of {[getattr(s, 'shape', None) for s in ss]} "
            f"({srs} rows a block)"
        )
    kb = kw // fmt.cols  # blocks per row
    copy = None
    if nesteds[0] is not None:
        smem = _smem_bytes(fmt, ws[0], rows, stages)
        copies = {_nested_copy(nd, kb, width, smem=smem) for nd in nesteds}
        nbs = {nd.nested_blocksize for nd in nesteds}
        if len(copies) != 1 or None in copies or len(nbs) != 1:  # decoded by XLA first
            ss = tuple(_decoded_t(nd, v.shape[0], 64 * kb) for nd, v in zip(nesteds, ws))
            nesteds = (None,) * count
        else:
            (copy,), (nb,) = copies, nbs
            fill = _absmax_filler(width, kb=kb, nested_blocksize=nb)
    is_nested = nesteds[0] is not None

    def step(idx: Any, w_smem: Any, *refs: Any) -> Any:
        if not grid_kind and not is_nested:
            s_smem, x_smem, acc = refs
        else:
            x_smem, held, acc = refs
        wv = w_smem[...]
        g = fmt.group
        for b in range(0, fmt.blocks, g):
            at = [idx[0] * fmt.blocks + b + i for i in range(g)]  # the blocks' columns among the program's
            if grid_kind:
                scales = [held[0, c] for c in at]
            else:
                row_scales = [s_smem[b + i] for i in range(g)] if not is_nested else [held[c] for c in at]
                scales = [jax.lax.broadcast_in_dim(v, (_TILE, fmt.cols), [0]) for v in row_scales]
            lhs = fmt.decode(wv[:, fmt.cols * b : fmt.cols * (b + g)], *scales)
            for i, a in enumerate(lhs):
                at_x = fmt.x_rows * (fmt.parts * b + i * g)  # part i of the blocks from b
                plgpu.wgmma(acc, a, x_smem.at[pl.ds(at_x, fmt.x_rows * g)])
            plgpu.wgmma_wait(0)
        return acc

    per = 5 if is_nested else 2  # global refs per weight: w and scales (codes), then the nested pieces

    def body(x_gmem: Any, *refs: Any, out_smem: Any, **held_refs: Any) -> None:
        *member_refs, out_gmem = refs
        i, j = jax.lax.axis_index("n"), jax.lax.axis_index("s")

        def member(g: int, t: Any) -> None:  # the program's tile t of weight g
            w_gmem, s_gmem, *nested_gmem = member_refs[per * g : per * (g + 1)]
            wrows = pl.ds(t * _TILE, _TILE)
            s_spec, s_in, held = [], [], None
            # the wait for the program's grid scales, at the pipeline's first step
            ready: Callable[[], None] | None = None
            if grid_kind:  # this program's row of the grid, the columns of its steps
                held = held_refs["row_scales"]
                plgpu.copy_gmem_to_smem(
                    s_gmem.at[pl.ds(t * _TILE // srs[g], 1), pl.ds(j * width, width)], held, held_refs["got"]
                )
                if _grid_wait_in_loop:
                    ready = functools.partial(plgpu.barrier_wait, held_refs["got"])
                else:
                    plgpu.barrier_wait(held_refs["got"])
            elif is_nested:  # this program's absmax codes, nested absmax and table; decoded here once
                held, codes, nested_s, table = (held_refs[k] for k in ("absmax", "codes", "nested", "table"))
                nested_absmax, nested_code, offset = nested_gmem
                # whole rows of codes, or the program's own columns: the program's first block among those copied
                first, cols = (j * width, pl.ds(0, kb)) if copy == "rows" else (0, pl.ds(j * width, width))
                kn = _TILE * kb // nb  # the tile's nested absmax
                plgpu.copy_gmem_to_smem(s_gmem.at[wrows, cols], codes, held_refs["got_codes"])
                plgpu.copy_gmem_to_smem(
                    nested_absmax.at[pl.ds(t * kn, kn)], nested_s, held_refs["got_nested"]
                )
                plgpu.copy_gmem_to_smem(nested_code, table, held_refs["got_table"])
                for got in ("got_codes", "got_nested", "got_table"):
                    plgpu.barrier_wait(held_refs[got])
                fill(codes, nested_s, table, held, offset, j * width, first)
            else:
                s_spec = [plgpu.BlockSpec((fmt.blocks, _TILE), lambda s: (s, 0))]
                s_in = [s_gmem.at[pl.ds(j * width, width), wrows]]

            def held_step(idx: Any, *refs: Any) -> Any:
                if ready is not None:  # the first step: the pipeline's first copies are on their way
                    pl.when(idx[0] == 0)(ready)
                return step(idx, *refs[:-1], held, refs[-1])

            def scoped(acc: Any) -> None:
                plgpu.emit_pipeline(
                    step if held is None else held_step,
                    grid=(sp,),
                    in_specs=[
                        plgpu.BlockSpec((_TILE, wb), lambda s: (0, s), transforms=w_tr),
                        *s_spec,
                        plgpu.BlockSpec((xb, rows), lambda s: (s, 0), transforms=x_tr),
                    ],
                    max_concurrent_steps=stages,
                    init_carry=acc,
                )(
                    w_gmem.at[wrows, pl.ds(j * sp * wb, sp * wb)],
                    *s_in,
                    x_gmem.at[pl.ds(j * sp * xb, sp * xb)],
                )
                out_smem[...] = acc[...]

            pl.run_scoped(scoped, plgpu.ACC((_TILE, rows), jnp.float32))

        if count == 1:
            member(0, i)
        else:  # the weight whose tiles hold tile i
            for g in range(count):
                pl.when((i >= starts[g]) & (i < starts[g] + member_tiles[g]))(
                    functools.partial(member, g, i - starts[g])
                )
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[j, pl.ds(i * _TILE, _TILE)])
        plgpu.wait_smem_to_gmem(0)

    scratch: dict[str, Any] = dict(out_smem=plgpu.SMEM((_TILE, rows), jnp.float32, transforms=o_tr))
    ins: list = [xt]
    if grid_kind:
        scratch.update(row_scales=plgpu.SMEM((1, width), jnp.float32), got=plgpu.Barrier(num_arrivals=1))
    if is_nested:
        scratch.update(
            codes=plgpu.SMEM((_TILE, kb if copy == "rows" else width), jnp.uint8),
            nested=plgpu.SMEM((_TILE * kb // nb,), jnp.float32),
            table=plgpu.SMEM((256,), jnp.float32),
            absmax=plgpu.SMEM((width, _TILE), jnp.float32),
            **{got: plgpu.Barrier(num_arrivals=1) for got in ("got_codes", "got_nested", "got_table")},
        )
        for v, nd in zip(ws, nesteds):
            ins += [v, nd.codes, nd.nested_absmax, nd.nested_code, nd.offset]
    else:
        for v, s in zip(ws, ss):
            ins += [v, s]
    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((split, n, rows), jnp.float32),
        grid=(tiles, split),
        grid_names=("n", "s"),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(*ins)
    # the partial sums added in order, one after another: the same additions whatever the grid's other weights
    # (a reduction's order may change with its shape)
    total = functools.reduce(jnp.add, [out[s] for s in range(split)])
    return total[:, :m].T.astype(out_dtype)


# pipeline depth by x's padded rows (shared memory holds x's tiles); up to 32 rows _SMALL_STAGES is used instead
_STAGES = {16: 4, 32: 4, 64: 3, 128: 2}
_stages = 0  # one pipeline depth for every call (benchmarks try depths); 0: by x's rows


def _padded_rows(m: int) -> int:
    """x's rows padded to the MMA's N: 16, 32, 64 or 128.

    Raises:
        ValueError: more than 128 rows.
    """
    if m > max(_STAGES):
        raise ValueError(f"the kernel takes up to {max(_STAGES)} rows of x, got {m}")
    return next(r for r in _STAGES if m <= r)


def _pipeline(rows: int, stages: int | None) -> tuple[int, int]:
    """The pipeline's depth (``stages``, else ``_stages``, else by x's padded ``rows``) and the programs the
    grid is split for (``_SMALL_PROGRAMS`` up to 32 rows whatever the depth; 0 above: until it fills the
    multiprocessors once), :func:`_swapped_matmul`'s ``stages`` and ``programs``."""
    small = rows <= 32
    return stages or _stages or (_SMALL_STAGES if small else _STAGES[rows]), _SMALL_PROGRAMS if small else 0


def _padded_t(x: jax.Array) -> jax.Array:
    """``x [m, k]`` transposed, its rows padded to the MMA's N: ``[k, 16 | 32 | 64 | 128]``."""
    m, k = x.shape
    return jnp.zeros((_padded_rows(m), k), x.dtype).at[:m].set(x).T


def _paired_t(x: jax.Array, span: int) -> jax.Array:
    """As :func:`_padded_t`, with each ``span`` columns of x reordered evens first, then odds (``[k, rows]``):
    the even columns meet the high nibbles. One transpose in XLA, padding included."""
    m, k = x.shape
    rows = _padded_rows(m)
    if k % span:
        raise ValueError(f"x's {k} columns are not whole spans of {span}")
    xp = jnp.zeros((rows, k), x.dtype).at[:m].set(x)
    return xp.reshape(rows, k // span, span // 2, 2).transpose(1, 3, 2, 0).reshape(k, rows)


def kernel(
    x: jax.Array, q: Any, absmax_t: Any, *, table: Any, split: int | None = None,
    stages: int | None = None, decode: Any = None,
) -> jax.Array:  # fmt: skip
    """``x [m, k] @ W.T`` -> ``[m, n]`` in ``x.dtype`` (bfloat16 or float16; ``m`` up to 128), where
    ``W [n, k]`` is held as ``q`` uint8 ``[n, k / 2]`` (bitsandbytes' packing: high nibble = even column)
    and its absmax, float32, transposed to ``[k / 64, n]``, or its nested absmax as stored (:class:`Nested`,
    decoded by the kernel where it can); ``q`` and ``absmax_t`` as tuples of a group's weights (the same
    ``k`` and kind of absmax) give ``[m, sum of n]`` from one launch. ``split``: programs along the
    contraction (default: doubled until the grid holds ``_SMALL_PROGRAMS`` programs up to 32 rows, else
    until it fills the multiprocessors);
    ``stages``: the pipeline's depth (default by x's rows, :func:`_pipeline`); ``decode``: another
    ``(hi, lo) = decode(q, *scales)`` (``benchmarks/fused_matmul_mosaic.py`` times some)."""
    rows = _padded_rows(x.shape[0])
    group = 1 if rows <= 32 else 2  # from 64 rows of x, two absmax blocks per MMA
    xt = _paired_t(x, 64 * group)
    decode = decode or (_products_decoder if _products else _decoder)(x.dtype, table, group)
    fmt = _Format(cols=32, x_rows=32, blocks=_BLOCKS, decode=decode, group=group, parts=2)
    nested: Any
    scales_t: Any
    if isinstance(q, tuple):  # a group: one entry per weight
        nested = tuple(a if isinstance(a, Nested) else None for a in absmax_t)
        scales_t = tuple(None if isinstance(a, Nested) else a for a in absmax_t)
    else:
        nested, scales_t = (absmax_t, None) if isinstance(absmax_t, Nested) else (None, absmax_t)
    stages, programs = _pipeline(rows, stages)
    return _swapped_matmul(xt, q, scales_t, fmt, m=x.shape[0], out_dtype=x.dtype, split=split, stages=stages,
                           nested=nested, programs=programs)  # fmt: skip


def fp8_kernel(x: jax.Array, w: Any, scales_t: Any, *, split: int | None = None, stages: int | None = None,
               scale_rows: Any = None) -> jax.Array:  # fmt: skip
    """``x [m, k] @ W.T`` -> ``[m, n]`` in ``x.dtype``, where ``W [n, k]`` is ``float32(w) * scale`` rounded
    to ``x.dtype`` (``jax_side.dequantize_fp8``'s order), ``w`` float8_e4m3fn ``[n, k]``, and ``scales_t``
    float32 ``[k / 128, n]`` each row's scale per 128 columns; or, with ``scale_rows`` (a multiple of 64),
    the block-scale grid float32 ``[ceil(n / scale_rows), k / 128]`` (``k / 128`` a multiple of 4), read
    as it is stored. ``w``, ``scales_t`` and ``scale_rows`` as tuples of a group's weights give ``[m, sum of
    n]`` from one launch."""

    def decode(wb: jax.Array, scale: jax.Array) -> list[jax.Array]:
        return [(wb.astype(jnp.float32) * scale).astype(x.dtype)]

    fmt = _Format(cols=128, x_rows=128, blocks=_FP8_BLOCKS, decode=decode)
    xt = _padded_t(x)
    stages, programs = _pipeline(xt.shape[1], stages)
    return _swapped_matmul(xt, w, scales_t, fmt, m=x.shape[0], out_dtype=x.dtype, split=split, stages=stages,
                           scale_rows=scale_rows, programs=programs)  # fmt: skip


def _stored(w: NF4Weight) -> tuple[jax.Array, jax.Array | Nested]:
    """A 4-bit weight's packed bytes ``[n, k / 2]`` and its absmax as stored: float32 transposed to
    ``[k / 64, n]``, or :class:`Nested`."""
    n, k = w.shape
    flat, _ = _packed_bytes(w.packed)  # quant_storage wider than a byte: its bytes
    q = flat[: n * k // 2].reshape(n, k // 2)
    if w.nested_absmax is None:
        return q, w.absmax.reshape(n, k // 64).T
    nested = Nested(
        codes=w.absmax.reshape(n, k // 64),
        nested_absmax=w.nested_absmax.reshape(-1),
        nested_code=jnp.asarray(w.nested_table()).reshape(-1),
        offset=jnp.asarray(w.offset, jnp.float32).reshape(1),
        nested_blocksize=w.nested_blocksize,
    )
    return q, nested


def pieces(w: NF4Weight) -> tuple[jax.Array, jax.Array]:
    """A 4-bit weight's packed bytes ``[n, k / 2]`` and its decoded absmax, float32 ``[k / 64, n]``."""
    q, absmax = _stored(w)
    return q, _decoded_t(absmax, *w.shape) if isinstance(absmax, Nested) else absmax


def nf4_matmul(x2: jax.Array, w: NF4Weight) -> jax.Array:
    """``x2 [m, in] @ dequantize(w).T`` in ``x2.dtype`` through :func:`kernel`, for calls :func:`takes`: a
    nested absmax handed over as stored, for the kernel to decode where it can."""
    return kernel(x2, *_stored(w), table=standard_code(w.quant_type))


def fp8_scales_t(w: FP8Weight) -> jax.Array:
    """An FP8 weight's scales as each row's scale per 128 columns, float32 ``[in / 128, out]``."""
    n, k = w.shape
    layout = fp8_scale_layout(w.weight.shape, w.scale_inv.shape, w.block)
    s = w.scale_inv.astype(jnp.float32)
    if layout.kind == "tensor":
        return jnp.broadcast_to(s.reshape(()), (k // 128, n))
    if layout.kind == "row":
        return jnp.broadcast_to(s.reshape(1, n), (k // 128, n))
    bo, bi = layout.block
    s = jnp.repeat(s.reshape(layout.grid), bo, axis=0)[:n]
    return jnp.repeat(s, bi // 128, axis=1)[:, : k // 128].T


def _grid_split(steps: int, blocks: int) -> int | None:
    """The fewest programs (a power of 2) along a contraction of ``steps`` pipeline steps of ``blocks`` scales
    whose share of a row of the scale grid one TMA copy takes (whole 16-byte units, at most 256), or None."""
    split = 1
    while steps % split == 0:
        width = steps // split * blocks
        if width % 4 == 0 and width <= _TMA_SIDE:
            return split
        split *= 2
    return None


def grid_rows(w: FP8Weight) -> int | None:
    """The rows of ``w``'s scale blocks where :func:`fp8_kernel` reads its block-scale grid as stored (blocks of
    128 columns spanning whole 64-row tiles, the contraction split so that each program copies at most 256
    whole 16-byte units of a row of the grid), else None."""
    layout = fp8_scale_layout(w.weight.shape, w.scale_inv.shape, w.block)
    bo, bi = layout.block
    fits = layout.kind == "block" and bi == 128 and bo % _TILE == 0 and layout.grid[1] % 4 == 0
    steps = w.shape[1] // (128 * _FP8_BLOCKS)
    return bo if fits and _grid_split(steps, _FP8_BLOCKS) is not None else None


def fp8_matmul(x2: jax.Array, w: FP8Weight) -> jax.Array:
    """``x2 [m, in] @ dequantize(w).T`` in ``x2.dtype`` through :func:`fp8_kernel`, for calls :func:`takes`:
    block scales read as stored where :func:`grid_rows` allows, else laid out per row and 128 columns by XLA
    first (:func:`fp8_scales_t`)."""
    if _grid_scales and (rows := grid_rows(w)) is not None:
        return fp8_kernel(x2, w.weight, scale_grid(w), scale_rows=rows)
    return fp8_kernel(x2, w.weight, fp8_scales_t(w))


def scale_grid(w: FP8Weight) -> jax.Array:
    """An FP8 weight's block scales as their grid, float32 ``[ceil(out / rows), ceil(in / cols)]`` (as stored),
    what :func:`fp8_kernel` reads with ``scale_rows``."""
    return w.scale_inv.astype(jnp.float32).reshape(
        fp8_scale_layout(w.weight.shape, w.scale_inv.shape, w.block).grid
    )


def matmul(x2: jax.Array, w: NF4Weight | FP8Weight) -> jax.Array:
    """``x2 [m, in] @ dequantize(w).T`` in ``x2.dtype`` through :func:`nf4_matmul` or :func:`fp8_matmul`, for
    calls :func:`takes`."""
    return nf4_matmul(x2, w) if isinstance(w, NF4Weight) else fp8_matmul(x2, w)


# False: weights that share x take one launch each (benchmarks time both through this)
_grouped = True


def groupable(x2: jax.Array, ws: Sequence[Any]) -> bool:
    """Whether :func:`matmul_group` multiplies ``x2`` by every weight of ``ws`` in one launch: each one
    :func:`takes`, all of one format with the same ``in`` (4-bit: the same table, all nested or none, one
    nested blocksize)."""
    if not _grouped or len(ws) < 2 or not all(takes(x2, w) for w in ws):
        return False
    first = ws[0]
    same = all(type(w) is type(first) and w.shape[1] == first.shape[1] for w in ws)
    if isinstance(first, NF4Weight):
        same = same and all(
            w.quant_type == first.quant_type
            and (w.nested_absmax is None) == (first.nested_absmax is None)
            and w.nested_blocksize == first.nested_blocksize
            for w in ws
        )
    return same


def matmul_group(x2: jax.Array, ws: Sequence[Any], *, split: int | None = None) -> list[jax.Array]:
    """``[x2 @ dequantize(w).T for w in ws]`` from one kernel launch (calls :func:`groupable` accepts), each
    ``[m, out]`` in ``x2.dtype``: the grid holds every weight's tiles, and each program computes what it
    computes in :func:`matmul` of its weight alone with the same ``split`` (by default the split is chosen
    for the whole grid, so a weight's contraction may be split into fewer parts than alone, and its float32
    sums made in another order)."""
    if isinstance(ws[0], NF4Weight):
        stored = [_stored(w) for w in ws]
        y = kernel(x2, tuple(q for q, _ in stored), tuple(a for _, a in stored),
                   table=standard_code(ws[0].quant_type), split=split)  # fmt: skip
    else:
        rows = [grid_rows(w) for w in ws] if _grid_scales else [None]
        if all(r is not None for r in rows):
            grids = tuple(scale_grid(w) for w in ws)
            y = fp8_kernel(x2, tuple(w.weight for w in ws), grids, scale_rows=tuple(rows), split=split)
        else:
            y = fp8_kernel(x2, tuple(w.weight for w in ws), tuple(fp8_scales_t(w) for w in ws), split=split)
    ends = np.cumsum([w.shape[0] for w in ws])
    return [y[:, end - w.shape[0] : end] for w, end in zip(ws, ends)]


def settings() -> tuple[tuple[str, Any], ...]:
    """This module's settings as they are now (its module-level integers, switches and ``_force``): a key
    for functions whose traces JAX may reuse (``jax_side._fused``'s one-row function), so that a change of
    any setting makes another function."""
    return tuple(
        (name, value)
        for name, value in sorted(globals().items())
        if not name.startswith("__") and (isinstance(value, int) or name == "_force")
    )
