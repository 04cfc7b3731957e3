"""``x @ dequantize(W).T`` without a dense ``W``: each weight tile is decoded in registers inside the matmul.

Kept-quantized layers (``jax_side.QuantLinear``, ``QuantDense``) call :func:`quantized_matmul`. On NVIDIA
GPUs it runs a Pallas kernel (the Triton lowering) that reads the stored pieces (4-bit bytes and absmax,
or FP8 values and scales), decodes one tile at a time as ``jax_side.dequantize_nf4`` /
``jax_side.dequantize_fp8`` do (``code[q] * absmax`` or ``float32(w) * scale`` in float32, rounded to the
weight's dtype, then cast to the computation dtype) and feeds it to the tensor cores with float32
accumulation. A single row of x (one token) is multiplied without Pallas: as a product and a sum along
``in``, which XLA compiles into one reduction that decodes each weight element where it reads it, with the
same roundings, float32 products and sums (faster than the kernel at one row on an H200; see
``benchmarks/RESULTS.md``). On Hopper GPUs, 2 to 128 rows of bfloat16 or float16 x times a 4-bit or FP8
weight that fits it go to a kernel in Pallas' Mosaic GPU lowering instead (``jax_side._mosaic``; at 16 to 128
tokens on an H200, 0.50-0.85x the Triton kernel's time for 4-bit weights, 0.62-0.98x for FP8). On these
paths no dense weight exists in memory at any point. :func:`quantized_matmuls` multiplies weights that share
x (q/k/v, gate/up) in one launch of that kernel where it takes each of them.

The choice between this kernel and expanding the weight then multiplying (the only path on CPU and other
backends) is made in one place, :func:`matmul_path`:

* ``"auto"`` (default): the kernel on CUDA GPUs where the weight fits it, else expand-then-matmul.
  The platform is chosen when the computation is compiled (``jax.lax.platform_dependent``).
* ``"expand"``: always expand-then-matmul.
* ``"interpret"``: the kernel through Pallas' interpreter, on any backend (slow; for tests); one row of x
  runs the XLA reduction above, as under ``"auto"`` on a GPU.

Set it with ``jax_side.set_matmul_path(...)``, the ``jax_side.matmul_path(...)`` context manager, or the
``QBRIDGE_MATMUL`` environment variable (read when jax_side is imported; empty or unset means ``"auto"``).
The path is part of JAX's tracing context, so jitted functions are traced again when it changes.

Results equal expand-then-matmul up to the order of the float32 accumulation (and, for a nested absmax,
the one rounding the compiler may merge; see ``jax_side._nf4``). Gradients flow to ``x`` (computed with
the expanded weight in the backward pass, as bitsandbytes' ``MatMul4Bit`` does); the stored pieces get
none. Forward-mode differentiation (``jax.jvp``) needs the ``"expand"`` path.

Which weights the kernel takes: 2-D ``[out, in]`` NF4/FP4 weights whose ``in`` is a multiple of the
blocksize (no absmax block crosses a row), and 2-D float8_e4m3fn / float8_e5m2 weights with per-tensor,
per-row or block scales. Others use expand-then-matmul under every setting but ``"interpret"``, which
raises for them. The kernel is written for Pallas' Triton lowering, which JAX 0.11 deprecated in favour
of Mosaic GPU: under a JAX without it, ``"auto"`` expands the weight in calls whose x has more than one
row, warning once (a ``RuntimeWarning``), and ``"interpret"`` raises ValueError. Sharded weights reach
the kernel whole: XLA gathers them for it. On meshes with explicit
axes (``jax.sharding.AxisType.Explicit``) the matmul runs with the axes made automatic around it
(``jax.sharding.auto_axes``); its result keeps ``x``'s placement along the leading axes and is whole along
the output features. Inside ``jax.shard_map`` with ``check_vma=True`` (its default) the kernel's result is
declared to vary along the mesh axes its inputs vary along (and a replicated weight is made to vary alike);
Pallas' interpreter (``"interpret"``) cannot run there where x varies, and needs ``check_vma=False``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax._src import config as jax_config  # enum_state: a setting that is part of jit's cache key

from . import _cpu_kernel, _mosaic
from ._casts import cast_exactly, exact_f32
from ._codes import standard_code
from ._fp8 import OUT_DTYPES, dequantize_fp8, fp8_scale_layout
from ._layout import refuse_torch
from ._nf4 import _bytes as _packed_bytes
from ._nf4 import _decode_nested, _is_traced
from ._quantized import FP8Weight, NF4Weight, explicit_mesh, is_quantized, with_auto_axes
from ._varying import _varying_axes, vary_alike

PATHS = ("auto", "expand", "interpret")


def _validated(path: str) -> str:
    if path not in PATHS:
        raise ValueError(f"matmul path must be one of {PATHS}, got {path!r}")
    return path


def _from_environment() -> str:
    try:
        return _validated(os.environ.get("QBRIDGE_MATMUL", "") or "auto")  # empty: as if unset
    except ValueError as e:
        raise ValueError(f"QBRIDGE_MATMUL: {e}") from None


# A JAX configuration state, so that the path is part of jit's cache key: a function traced under one path
# is traced again under another instead of replaying the old choice. JAX also reads a state's default from
# the environment variable of its name in capitals; this name is not QBRIDGE_MATMUL, so that JAX does not
# read that variable without the reading above (an empty value means unset).
_FLAG = "qbridge_matmul_path"
_STATE = jax_config.enum_state(
    _FLAG, PATHS, default=_from_environment(), include_in_jit_key=True, include_in_trace_context=True,
    help="qbridge: how kept-quantized layers multiply (auto, expand or interpret)",
)  # fmt: skip


def get_matmul_path() -> str:
    """The current path for kept-quantized matmuls: ``"auto"``, ``"expand"`` or ``"interpret"``."""
    return str(_STATE.value)


def set_matmul_path(path: str) -> None:
    """Sets the path for kept-quantized matmuls from now on (see the module docstring for the choices).

    Raises:
        ValueError: an unknown path.
    """
    jax.config.update(_FLAG, _validated(path))


@contextlib.contextmanager
def matmul_path(path: str) -> Iterator[None]:
    """Context manager: kept-quantized matmuls traced inside it use ``path`` (this thread only)."""
    with _STATE(_validated(path)):
        yield


def _held(weight: Any) -> Any:
    """The NF4Weight/FP8Weight a flax ``nnx.Variable`` holds (a kept layer's ``.weight``), else ``weight``."""
    if is_quantized(weight):
        return weight
    get = getattr(weight, "get_value", None)  # an nnx Variable
    inner = get() if callable(get) else getattr(weight, "value", None)
    return inner if is_quantized(inner) else weight


def fits_kernel(weight: NF4Weight | FP8Weight | Any) -> str | None:
    """None if the fused kernel takes ``weight``, else the reason it does not.

    ``weight`` is an NF4Weight or FP8Weight, or a flax ``nnx.Variable`` holding one (a kept layer's
    ``.weight``).

    Raises:
        TypeError: ``weight`` is neither.
    """
    weight = _held(weight)
    if not is_quantized(weight):
        raise TypeError(
            "fits_kernel takes an NF4Weight or FP8Weight (or an nnx Variable holding one), got "
            f"{type(weight).__name__}"
        )
    if len(weight.shape) != 2:
        return f"a {len(weight.shape)}-D weight (the kernel takes 2-D [out, in])"
    out, inp = weight.shape
    if out == 0 or inp == 0:
        return "an empty weight"
    if isinstance(weight, NF4Weight):
        if inp % weight.blocksize:
            return (
                f"in={inp} is not a multiple of the blocksize {weight.blocksize} (absmax blocks cross rows)"
            )
        return None
    if weight.weight.dtype not in (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2)):
        return f"{weight.weight.dtype} weights (the kernel takes float8_e4m3fn and float8_e5m2)"
    layout = fp8_scale_layout(weight.weight.shape, weight.scale_inv.shape, weight.block)
    if layout.stack:
        return "stacked weights"
    return None


class _Tiles(NamedTuple):
    bm: int  # rows of x per program
    bn: int  # rows of W (outputs) per program
    bk: int  # elements of the contraction per step
    split: int  # programs along the contraction (float32 partial sums, added after)
    warps: int
    stages: int  # software pipelining depth; 1 where the loop gathers (deeper pipelines stall on gathers)


_SMS = 132  # H100/H200 multiprocessors: the grid aims at about one wave of programs
_tiles_override: Any = None  # benchmarks/fused_matmul.py tries other tiles through this
_one_row_in_xla = True  # benchmarks/fused_matmul.py times the tensor-core kernel at one row through this
_fp8_two_scales = True  # benchmarks/fused_matmul.py times the per-element scales they replaced through this
_fp8_wide_tiles = True  # benchmarks/keep_quantized.py times the 128x64 tiles they replaced through this


def _tiles(m: int, n: int, k: int, step: int, *, gathers: bool, wide: bool = False) -> _Tiles:
    """Tile sizes for ``[m, k] @ [k, n]``; ``step`` is the contraction's granularity (a power of two).
    ``wide``: above 64 rows of x, 64x128 output tiles instead of 128x64 (FP8 with one scale per tile:
    0.86-0.96x the time at 128 tokens on an H200, ``results/fused-matmul-fp8-128-sweep-h200.json``)."""
    if _tiles_override is not None:
        return _tiles_override(m, n, k, step, gathers)
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128  # each block of x decodes W once more
    bn = 32 if m <= 16 else 64
    if wide and m > 64 and _fp8_wide_tiles:
        bm, bn = 64, 128
    bk = max(step, 256 if m <= 16 else 128)
    programs = -(-m // bm) * -(-n // bn)
    steps = -(-k // bk)
    split = 1 if programs >= _SMS else max(1, min(steps, -(-_SMS // programs)))
    return _Tiles(bm, bn, bk, split, 4, 1 if gathers else 3)


def _compiler_params(t: _Tiles) -> Any:
    from jax.experimental.pallas import triton as plt

    return plt.CompilerParams(num_warps=t.warps, num_stages=t.stages)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` with float32 accumulation (full float32 products for float32 inputs)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


class _Program(NamedTuple):
    """Where one program of the grid ``(output tiles, contraction splits, row blocks of x)`` works."""

    pn: Any  # which tile of W's rows (the output's columns)
    ps: Any  # which part of the contraction
    pm: Any  # which block of x's rows
    rows: jax.Array  # [bn] rows of W
    row_ok: jax.Array  # [bn] those inside W
    x_ok: jax.Array  # [bm] rows of x inside x


def _program(m: int, n: int, t: _Tiles) -> _Program:
    from jax.experimental import pallas as pl

    pn, ps, pm = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pn * t.bn + jnp.arange(t.bn)
    return _Program(pn, ps, pm, rows, rows < n, (pm * t.bm + jnp.arange(t.bm)) < m)


def _store(out_ref: Any, acc: jax.Array, p: _Program, t: _Tiles) -> None:
    """Writes a program's ``[bm, bn]`` result: the output itself, or its slot of the partial sums."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    ok = p.x_ok[:, None] & p.row_ok[None, :]
    tile = (pl.ds(p.pm * t.bm, t.bm), pl.ds(p.pn * t.bn, t.bn))
    if t.split == 1:
        plt.store(out_ref.at[tile], acc.astype(out_ref.dtype), mask=ok)
    else:
        plt.store(out_ref.at[p.ps, tile[0], tile[1]], acc, mask=ok)


def _varying_alike(args: tuple) -> tuple[tuple, dict[str, Any]]:
    """``args`` made to vary alike (:func:`vary_alike`), and the ``ShapeDtypeStruct`` keyword that says the
    kernel's result varies so too (Pallas cannot infer it)."""
    args = vary_alike(args)
    mat = getattr(jax.typeof(args[0]), "manual_axis_type", None)
    return args, {} if mat is None else {"manual_axis_type": mat}


def _call(
    kernel: Any, args: tuple, *, m: int, n: int, dtype: Any, t: _Tiles, interpret: bool, name: str
) -> jax.Array:
    from jax.experimental import pallas as pl

    shape = (m, n) if t.split == 1 else (t.split, m, n)
    args, varying = _varying_alike(args)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(shape, dtype if t.split == 1 else jnp.float32, **varying),
        grid=(pl.cdiv(n, t.bn), t.split, pl.cdiv(m, t.bm)),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(t),
        name=name,
    )(*args)
    return out if t.split == 1 else out.sum(0).astype(dtype)


def _split_steps(k_steps: int, t: _Tiles) -> tuple[int, _Tiles]:
    """Steps per program along the contraction, and the tiles with the split that leaves none idle."""
    steps = -(-k_steps // t.split)
    return steps, t._replace(split=-(-k_steps // steps))


def _rounded(v: jax.Array, wdtypes: tuple, cdtype: Any) -> jax.Array:
    """A tile's decoded float32 values rounded to each of ``wdtypes`` (the weight's ``roundings``), then
    cast to the computation dtype ``cdtype``."""
    for dt in wdtypes:
        v = v.astype(dt)
    return v.astype(cdtype)


# ------------------------------------------------------------------------------------------- NF4 / FP4


def _nf4_step(
    packed_ref, absmax_ref, nabs_ref, ncode_ref, offset_ref, code_ref, p: _Program, i: Any, *, groups: int,
    half: int, bg: int, steps: int, nested_blocksize: int, nested: bool, wdtypes: tuple, cdtype: Any, bn: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """Step ``i`` of a program's contraction: its ``bg`` absmax blocks of ``bn`` weight rows decoded, as
    ``(hi, lo, g0)``: the high and low nibbles' values ``[bn, bg * half]`` in ``cdtype`` (the weight's even
    and odd columns) and the first block's index along the row."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    g0 = (p.ps * steps + i) * bg
    gs = g0 + jnp.arange(bg)
    ok = p.row_ok[:, None] & (gs < groups)[None, :]
    q = plt.load(packed_ref.at[pl.ds(p.pn * bn, bn), pl.ds(g0, bg), :], mask=ok[:, :, None], other=0)
    a = plt.load(absmax_ref.at[pl.ds(p.pn * bn, bn), pl.ds(g0, bg)], mask=ok, other=0)
    if nested:  # nested_code[a] * nested_absmax[block // nested_blocksize] + offset, as bitsandbytes decodes
        block = jnp.minimum(
            (p.rows[:, None] * groups + gs[None, :]) // nested_blocksize, nabs_ref.shape[0] - 1
        )
        scale = ncode_ref[a.astype(jnp.int32)] * nabs_ref[block] + offset_ref[0]
    else:
        scale = a
    scale = scale[:, :, None]
    kb = bg * half
    hi = _rounded(code_ref[(q >> 4).astype(jnp.int32)] * scale, wdtypes, cdtype).reshape(bn, kb)
    lo = _rounded(code_ref[(q & 15).astype(jnp.int32)] * scale, wdtypes, cdtype).reshape(bn, kb)
    return hi, lo, g0


def _nf4_kernel(
    x_ref, xo_ref, packed_ref, absmax_ref, nabs_ref, ncode_ref, offset_ref, code_ref, out_ref,
    *, m: int, n: int, groups: int, half: int, bg: int, steps: int, nested_blocksize: int, nested: bool,
    wdtypes: tuple, t: _Tiles, split_x: bool,
):  # fmt: skip
    """``[bm, kb] @ [kb, bn]`` tiles on the tensor cores. ``split_x``: ``x_ref``/``xo_ref`` hold x's even and
    odd columns (read as tiles); else ``x_ref`` holds x, read with a stride of 2 (cheaper up to 16 rows)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    p = _program(m, n, t)
    kb = bg * half  # bytes of a weight row per step; twice as many elements
    decode = functools.partial(
        _nf4_step, packed_ref, absmax_ref, nabs_ref, ncode_ref, offset_ref, code_ref, p, groups=groups,
        half=half, bg=bg, steps=steps, nested_blocksize=nested_blocksize, nested=nested, wdtypes=wdtypes,
        cdtype=x_ref.dtype, bn=t.bn,
    )  # fmt: skip
    row0 = p.pm * t.bm

    def body(i, acc):
        hi, lo, g0 = decode(i)
        # the even elements of x meet the high nibbles, the odd ones the low nibbles
        k_ok = (g0 * half + jnp.arange(kb)) < groups * half
        x_mask = p.x_ok[:, None] & k_ok[None, :]
        if split_x:
            tile = (pl.ds(row0, t.bm), pl.ds(g0 * half, kb))
            xe = plt.load(x_ref.at[tile], mask=x_mask, other=0)
            xo = plt.load(xo_ref.at[tile], mask=x_mask, other=0)
        else:
            even = jnp.broadcast_to(2 * (g0 * half + jnp.arange(kb))[None, :], (t.bm, kb))
            xrows = jnp.broadcast_to((row0 + jnp.arange(t.bm))[:, None], (t.bm, kb))
            xe = plt.load(x_ref.at[xrows, even], mask=x_mask, other=0)
            xo = plt.load(x_ref.at[xrows, even + 1], mask=x_mask, other=0)
        return acc + _dot(xe, hi) + _dot(xo, lo)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((t.bm, t.bn), jnp.float32))
    _store(out_ref, acc, p, t)


def _nf4_matmul(x: jax.Array, w: NF4Weight, *, interpret: bool) -> jax.Array:
    """``x [m, k] @ dequantize(w).T`` in ``x.dtype`` through the tensor-core kernel (x's even and odd
    columns split before it above 16 rows)."""
    n, k = w.shape
    m = x.shape[0]
    bs = w.blocksize
    half, groups = bs // 2, k // bs
    t = _tiles(m, n, k, bs, gathers=True)
    bg = t.bk // bs
    steps, t = _split_steps(-(-groups // bg), t)

    flat, _ = _packed_bytes(w.packed)  # quant_storage wider than a byte: its bytes
    packed = flat[: n * k // 2].reshape(n, groups, half)
    absmax = w.absmax.reshape(n, groups)
    nested = w.nested_absmax is not None
    nabs = w.nested_absmax.reshape(-1) if w.nested_absmax is not None else jnp.zeros((1,), jnp.float32)
    ncode = jnp.asarray(w.nested_table()).reshape(-1) if nested else jnp.zeros((1,), jnp.float32)
    offset = jnp.asarray(0.0 if w.offset is None else w.offset, jnp.float32).reshape(1)  # None: not nested
    code = _nf4_code(w)
    split_x = m > 16
    xs = (x[:, 0::2], x[:, 1::2]) if split_x else (x, x[:1, :1])  # the second: an unread placeholder
    kernel = functools.partial(
        _nf4_kernel, m=m, n=n, groups=groups, half=half, bg=bg, steps=steps, nested_blocksize=w.nested_blocksize,
        nested=nested, wdtypes=w.roundings, t=t, split_x=split_x,
    )  # fmt: skip
    return _call(kernel, (*xs, packed, absmax, nabs, ncode, offset, code), m=m, n=n, dtype=x.dtype, t=t,
                 interpret=interpret, name="qbridge_nf4_matmul")  # fmt: skip


# ------------------------------------------------------------------------------------------------- FP8


def _fp8_step(
    w_ref, s_ref, p: _Program, i: Any, *, k: int, bo: int, bi: int, steps: int, wdtypes: tuple, cdtype: Any,
    tile_scales: int, t: _Tiles,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """Step ``i`` of a program's contraction: ``bn`` weight rows by ``bk`` columns decoded, as
    ``(w [bn, bk] in cdtype, zero outside the weight; the columns' mask [bk])``."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    so, si = s_ref.shape
    k0 = (p.ps * steps + i) * t.bk
    cols = k0 + jnp.arange(t.bk)
    col_ok = cols < k
    ok = p.row_ok[:, None] & col_ok[None, :]
    wq = plt.load(w_ref.at[pl.ds(p.pn * t.bn, t.bn), pl.ds(k0, t.bk)], mask=ok)  # float8 has no fill value
    if tile_scales:  # one scale covers the whole tile, or each of its halves along the contraction
        srow = jnp.minimum((p.pn * t.bn) // bo, so - 1)
        s = plt.load(s_ref.at[srow, jnp.minimum(k0 // bi, si - 1)])
        if tile_scales == 2:
            s2 = plt.load(s_ref.at[srow, jnp.minimum(k0 // bi + 1, si - 1)])
            s = jnp.where(jnp.arange(t.bk) < bi, s, s2)[None, :]
    else:
        srow = jnp.minimum(p.rows // bo, so - 1)
        scol = jnp.minimum(cols // bi, si - 1)
        s = s_ref[
            jnp.broadcast_to(srow[:, None], (t.bn, t.bk)), jnp.broadcast_to(scol[None, :], (t.bn, t.bk))
        ]
    # zero outside the weight: float8 loads have no fill value
    w = _rounded(wq.astype(jnp.float32) * s, wdtypes, cdtype)
    return jnp.where(ok, w, jnp.zeros((), cdtype)), col_ok


def _fp8_kernel(
    x_ref, w_ref, s_ref, out_ref, *, m: int, n: int, k: int, bo: int, bi: int, steps: int, wdtypes: tuple,
    tile_scales: int, t: _Tiles,
):  # fmt: skip
    """``[bm, bk] @ [bk, bn]`` tiles on the tensor cores."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    p = _program(m, n, t)
    decode = functools.partial(
        _fp8_step, w_ref, s_ref, p, k=k, bo=bo, bi=bi, steps=steps, wdtypes=wdtypes, cdtype=x_ref.dtype,
        tile_scales=tile_scales, t=t,
    )  # fmt: skip

    def body(i, acc):
        wt, col_ok = decode(i)
        k0 = (p.ps * steps + i) * t.bk
        xt = plt.load(
            x_ref.at[pl.ds(p.pm * t.bm, t.bm), pl.ds(k0, t.bk)],
            mask=p.x_ok[:, None] & col_ok[None, :],
            other=0,
        )
        return acc + _dot(xt, wt)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((t.bm, t.bn), jnp.float32))
    _store(out_ref, acc, p, t)


def _fp8_tiles(m: int, n: int, k: int, block: tuple[int, int]) -> tuple[_Tiles, int]:
    """The FP8 kernel's tiles for ``x [m, k] @ W.T`` (``W [n, k]``, scales per ``block``), and how many scales
    each tile takes along the contraction: 1 (one covers the tile), 2 (one per half), or 0 (a scale gathered
    per element; the loop is then not pipelined)."""
    bo, bi = block
    for t in (_tiles(m, n, k, 128, gathers=False, wide=True), _tiles(m, n, k, 128, gathers=False)):
        if bo % t.bn == 0 and (bi % t.bk == 0 or bi >= k):  # per tensor, per row with one row a tile, 128x128
            return t, 1
    if bo % t.bn == 0 and t.bk == 2 * bi and _fp8_two_scales:  # 128x128 blocks under 256-element steps
        return t, 2
    return _tiles(m, n, k, 128, gathers=True), 0


def _fp8_matmul(x: jax.Array, w: FP8Weight, *, interpret: bool) -> jax.Array:
    """``x [m, k] @ dequantize(w).T`` in ``x.dtype`` through the tensor-core kernel."""
    n, k = w.shape
    m = x.shape[0]
    layout = fp8_scale_layout(w.weight.shape, w.scale_inv.shape, w.block)
    bo, bi = layout.block
    scale = w.scale_inv.astype(jnp.float32).reshape(layout.matrix_scale_shape)
    t, tile_scales = _fp8_tiles(m, n, k, (bo, bi))
    steps, t = _split_steps(-(-k // t.bk), t)
    kernel = functools.partial(
        _fp8_kernel, m=m, n=n, k=k, bo=bo, bi=bi, steps=steps, wdtypes=w.roundings,
        tile_scales=tile_scales, t=t,
    )  # fmt: skip
    return _call(kernel, (x, w.weight, scale), m=m, n=n, dtype=x.dtype, t=t, interpret=interpret,
                 name="qbridge_fp8_matmul")  # fmt: skip


# --------------------------------------------------------------------------------------------- one row


def _nf4_rows(w: NF4Weight, code: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The high and low nibbles' decoded values, float32 ``[n, groups, blocksize // 2]`` each (the weight's
    even and odd columns): ``code[q] * absmax`` in float32, as ``jax_side.dequantize_nf4`` computes them
    before its final rounding, except that products below FLT_MIN in magnitude are not flushed to zero (as
    in the tensor-core kernel; flushing cost 6-27 % of the one-row time on an H200, and such a product moves
    a sum by less than FLT_MIN times an element of x). Laid out by absmax block so that XLA fuses the
    decode into its consumer (the dense weight's interleaved layout would be materialized first)."""
    n, k = w.shape
    bs = w.blocksize
    flat, _ = _packed_bytes(w.packed)
    q = flat[: n * k // 2].reshape(n, k // bs, bs // 2)
    if w.nested_absmax is not None:
        absmax = _decode_nested(w.absmax, w.nested_absmax, w.nested_table(), w.nested_blocksize, w.offset)
    else:
        absmax = w.absmax
    scale = absmax.reshape(n, k // bs, 1)

    def value(nibble: jax.Array) -> jax.Array:
        return code.at[nibble.astype(jnp.int32)].get(mode="promise_in_bounds") * scale

    return value(q >> 4), value(q & 15)


def _nf4_code(w: NF4Weight) -> jax.Array:
    """A 4-bit weight's 16-entry table (the standard one where it has none)."""
    return jnp.asarray(standard_code(w.quant_type)) if w.code is None else w.code.reshape(-1)


def _code(w: NF4Weight | FP8Weight) -> jax.Array | None:
    """:func:`_nf4_code` for a 4-bit weight; None for FP8."""
    return _nf4_code(w) if isinstance(w, NF4Weight) else None


def _one_row_sums(x: jax.Array, w: NF4Weight | FP8Weight, code: jax.Array | None = None) -> jax.Array:
    """``x [1, k] @ dequantize(w).T`` as float32 ``[n]``: a product and a sum along ``in``, which XLA
    compiles into one reduction that decodes each weight element where it reads it (no dense weight in
    memory). The decoded weight is rounded to each of ``w.roundings`` and then to ``x.dtype``; products and
    sums are float32. ``code``: a 4-bit weight's table (default :func:`_code`)."""

    def rounded(v: jax.Array) -> jax.Array:  # float32 -> the weight's roundings -> x's dtype, as float32
        last = jnp.dtype(jnp.float32)  # widening to float32 is exact: a value rounded to last stays so
        for dt in (*w.roundings, x.dtype):
            if dt not in (jnp.float32, last):
                v, last = exact_f32(v.astype(dt)), dt
        return v

    xf = exact_f32(x)
    if isinstance(w, NF4Weight):
        hi, lo = _nf4_rows(w, _nf4_code(w) if code is None else code)
        _, groups, half = hi.shape
        xe = xf[0, 0::2].reshape(1, groups, half)  # the even elements of x meet the high nibbles
        xo = xf[0, 1::2].reshape(1, groups, half)
        return jnp.sum(rounded(hi) * xe + rounded(lo) * xo, axis=(1, 2))
    layout = fp8_scale_layout(w.weight.shape, w.scale_inv.shape, w.block)
    products = dequantize_fp8(w.weight, w.scale_inv, block_size=layout.block, dtype=jnp.float32)
    return jnp.sum(rounded(products) * xf, axis=1)  # x [1, k] broadcast over the rows


def _one_row(x: jax.Array, w: NF4Weight | FP8Weight, code: jax.Array | None = None) -> jax.Array:
    """``x [1, k] @ dequantize(w).T`` in ``x.dtype`` ``[1, n]`` through :func:`_one_row_sums`. Measured on an
    H200 against the tensor-core kernel at one token (``benchmarks/RESULTS.md``): 1.3-1.7x faster for NF4
    and FP8 at every Llama-3-8B projection shape, and faster than the vector-unit Pallas kernel it replaced."""
    return _one_row_sums(x, w, code).astype(x.dtype)[None, :]


@functools.cache
def _one_row_batchable(interpret: bool, mosaic: tuple | None) -> Any:
    """:func:`_one_row` (taking the 4-bit table as an argument: a custom batching rule takes no batched
    constants) whose ``jax.vmap`` over x alone multiplies the batch's rows together through the kernel
    (``B`` rows of x against one weight). A batched reduction would decode the weight once per row, and XLA
    then materializes the dense weight (measured on an H200: 33 MB of temporaries and 3-4x the time of the
    kernel for 8 rows of a 4096x4096 weight). With the weight or table batched too, each row meets its own
    weight: the one-row form, batched. ``mosaic``: None, or the row goes to the Mosaic kernel instead (see
    ``_mosaic._one_row``), ``_mosaic.settings()`` as they are. One function per setting: JAX 0.11 reuses a
    custom_vmap function's trace for the same arguments, so a setting read inside it would be read once."""

    @jax.custom_batching.custom_vmap
    def one_row(x: jax.Array, w: Any, code: Any) -> jax.Array:
        return _mosaic.matmul(x, w) if mosaic is not None else _one_row(x, w, code)

    @one_row.def_vmap
    def _(axis_size: int, in_batched: Any, x: jax.Array, w: Any, code: Any) -> tuple[jax.Array, bool]:
        x_batched, w_batched, code_batched = in_batched
        if any(jax.tree_util.tree_leaves((w_batched, code_batched))):
            axes = jax.tree_util.tree_map(lambda b: 0 if b else None, (w_batched, code_batched))
            return jax.vmap(_one_row, in_axes=(0 if x_batched else None, *axes))(x, w, code), True
        n, k = w.shape
        if axis_size == 0:
            return jnp.zeros((0, 1, n), x.dtype), True
        rows = x.reshape(axis_size, k)  # x [B, 1, k]
        # a batch of one stays batchable, for a vmap around this one
        y = _rows(rows, w, interpret) if axis_size > 1 else one_row(rows, w, code)
        return y.reshape(axis_size, 1, n), True

    return one_row


_TRITON_LOWERING = "jax.experimental.pallas.triton"


@functools.cache
def _kernel_unavailable() -> str | None:
    """None where this JAX has Pallas' Triton lowering, which the kernel is written for; else why not (JAX
    0.11 deprecated that lowering in favour of Mosaic GPU)."""
    try:
        importlib.import_module(_TRITON_LOWERING)
    except ImportError as e:
        return f"this JAX ({jax.__version__}) has no {_TRITON_LOWERING} ({e})"
    return None


@functools.cache
def _warn_expanding(reason: str) -> None:
    warnings.warn(
        f"jax_side.quantized_matmul: {reason}, which its fused kernel needs; kept-quantized weights are "
        "expanded before multiplying instead (slower, and a dense weight is made in each call; one row of x "
        "still takes the XLA reduction)",
        RuntimeWarning,
        stacklevel=2,
    )


def _rows(x2: jax.Array, w: NF4Weight | FP8Weight, interpret: bool) -> jax.Array:
    """``x2 [m, k] @ dequantize(w).T`` through a kernel, or the one-row form (``m == 1``; through the Mosaic
    kernel where ``_mosaic._one_row`` is on); expanded where this JAX cannot build the kernel
    (``"interpret"`` then raises ValueError)."""
    # 2-128 rows of x on Hopper (1 with _mosaic._one_row): faster (see jax_side._mosaic)
    mosaic = not interpret and _mosaic.takes(x2, w)
    if x2.shape[0] == 1 and x2.dtype in OUT_DTYPES and _one_row_in_xla:  # others: the kernel, as before
        return _one_row_batchable(interpret, _mosaic.settings() if mosaic else None)(x2, w, _code(w))
    if mosaic:
        return _mosaic.matmul(x2, w)
    reason = _kernel_unavailable()
    if reason is not None:
        if interpret:
            raise ValueError(
                f"matmul_path('interpret') runs the fused kernel, which cannot be built: {reason}"
            )
        _warn_expanding(reason)  # traced for the GPU branch on every platform: the warning is the GPU's
        return _expand(x2, w)
    if isinstance(w, NF4Weight):
        return _nf4_matmul(x2, w, interpret=interpret)
    return _fp8_matmul(x2, w, interpret=interpret)


# --------------------------------------------------------------------------------------------- public


def _expand(x: jax.Array, w: NF4Weight | FP8Weight) -> jax.Array:
    # [out, in], contracted along in (a transposed copy of the dense weight cost more than the rest of the
    # call on CPUs), decoded by XLA's operations: on CPUs XLA fuses them into the float32 operand of its dot,
    # where the C kernel's result would be converted in a pass of its own (one token, two cores: 4096x4096
    # 23 ms against 29 ms, 14336x4096 78 against 94 ms)
    with _cpu_kernel.set_aside():
        dense = cast_exactly(w.dequantize(), x.dtype)
    return jax.lax.dot_general(x, dense, (((x.ndim - 1,), (1,)), ((), ())))


def _fused(x: jax.Array, w: NF4Weight | FP8Weight, interpret: bool) -> jax.Array:
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, w.shape[0]), x.dtype)
    return _rows(x2, w, interpret).reshape(*lead, w.shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kernel_matmul(x: jax.Array, w: Any, path: str) -> jax.Array:
    if path == "interpret":
        return _fused(x, w, True)
    return jax.lax.platform_dependent(x, w, default=_expand, cuda=lambda x, w: _fused(x, w, False))


def _kernel_matmul_fwd(x: jax.Array, w: Any, path: str) -> tuple[jax.Array, Any]:
    return _kernel_matmul(x, w, path), (w, _x_type(x))


def _x_type(x: jax.Array) -> jax.Array:
    """None of x's elements, only its type: x's mesh axes of variation for the backward pass (no memory)."""
    return x[..., :0]


def _like_x(dx: jax.Array, x_type: jax.Array) -> jax.Array:
    """``dx`` summed over the ``jax.shard_map`` axes it varies along and x does not (weights split over a mesh
    axis, x the same on each: each device holds part of x's gradient), as JAX's own transpose sums them."""
    extra = tuple(sorted(_varying_axes(dx) - _varying_axes(x_type)))
    return jax.lax.psum(dx, extra) if extra else dx


def _kernel_matmul_bwd(path: str, res: Any, dy: jax.Array) -> tuple[jax.Array, Any]:
    w, x_type = res
    dx, (none,) = _backward((w,), x_type, (dy,))
    return dx, none


def _backward(ws: tuple, x_type: jax.Array, dys: tuple) -> tuple[jax.Array, Any]:
    """x's gradient, the weights expanded again: for a group, one product over them side by side (the sum
    over the weights accumulates in the dot, rounded once); none for the pieces."""
    dtype = dys[0].dtype
    with _cpu_kernel.set_aside():  # XLA's decode fuses into the dot's operand (see _expand)
        dense = [cast_exactly(w.dequantize(), dtype) for w in ws]  # [out, in] each
    dense_all = dense[0] if len(ws) == 1 else jnp.concatenate(dense)  # [sum of out, in]
    dy = dys[0] if len(ws) == 1 else jnp.concatenate(dys, axis=-1)
    dx = jax.lax.dot_general(dy, dense_all, (((dy.ndim - 1,), (0,)), ((), ())))
    return _like_x(dx, x_type), tuple(_no_gradient(w) for w in ws)


def _no_gradient(w: Any) -> Any:
    """The stored pieces' cotangent: zeros (float0 for integer pieces)."""
    return jax.tree_util.tree_map(
        lambda a: (
            jnp.zeros(a.shape, jax.dtypes.float0)
            if not jnp.issubdtype(a.dtype, jnp.inexact)
            else jnp.zeros_like(a)
        ),
        w,
    )


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


@functools.lru_cache(maxsize=256)
def _checked(fields: str, treedef: Any, leaves: tuple[tuple[tuple[int, ...], Any], ...]) -> None:
    # fields (the static fields as written) tells 64 from 64.0, which compare and hash equal in treedef
    weight = jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])
    jax.eval_shape(lambda w: w.dequantize(), weight)


def _check_pieces(weight: NF4Weight | FP8Weight) -> None:
    """Every check ``weight.dequantize()`` makes of the pieces (dtypes, sizes, tables, the offset), without
    decoding; once per kind of weight (the checks see only shapes, dtypes and the static fields)."""
    leaves, treedef = jax.tree_util.tree_flatten(weight)
    _checked(str(treedef), treedef, tuple((tuple(jnp.shape(a)), jnp.result_type(a)) for a in leaves))


def _validate(x: jax.Array, weight: Any, who: str = "quantized_matmul") -> None:
    """:func:`quantized_matmul`'s checks of its arguments (see its Raises)."""
    if not is_quantized(weight):
        raise TypeError(
            f"{who} takes an NF4Weight or FP8Weight (or an nnx Variable holding one), got {type(weight).__name__}"
        )
    if len(weight.shape) != 2:
        raise ValueError(f"{who} takes a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    for leaf in jax.tree_util.tree_leaves(weight):  # the pieces (and x, below) as dequantize() asks for them
        refuse_torch(leaf, f"a piece of the {type(weight).__name__}")
    refuse_torch(x, "x")
    if (
        not hasattr(x, "shape")
        or not hasattr(x, "dtype")
        or x.ndim == 0
        or not jnp.issubdtype(x.dtype, jnp.floating)
    ):
        raise TypeError(f"x must be a floating-point array of shape [..., in], got {type(x).__name__} "
                        f"{getattr(x, 'dtype', '')}{tuple(getattr(x, 'shape', ()))}")  # fmt: skip
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"x has {x.shape[-1]} features, the weight {tuple(weight.shape)} takes {weight.shape[-1]}"
        )


def quantized_matmul(x: jax.Array, weight: NF4Weight | FP8Weight) -> jax.Array:
    """``x @ dequantize(weight).T``: ``x [..., in]`` times a kept-quantized ``[out, in]`` weight.

    ``weight`` is an NF4Weight or FP8Weight, or a flax ``nnx.Variable`` holding one (a kept layer's
    ``.weight``).

    The dense weight is rounded to ``weight.roundings`` (its ``decode_dtype``, if set, then its ``dtype``) and
    cast to ``x.dtype``, as expand-then-matmul does;
    products accumulate in float32 and the result is ``x.dtype`` ``[..., out]``. The path (the fused
    kernel or expand-then-matmul) follows :func:`get_matmul_path`; see the module docstring.

    Differentiable in reverse mode (``jax.grad``, ``jax.vjp``) with respect to ``x``; forward mode
    (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) needs ``matmul_path("expand")``, because the kernel's
    gradient is a custom VJP that recomputes the dense weight in the backward pass instead of keeping it.

    Raises:
        TypeError: ``weight`` is not an NF4Weight/FP8Weight (nor a Variable holding one), or ``x`` is not a
            floating-point array.
        TypeError, ValueError: the weight's pieces do not make a weight (dtypes, sizes, tables, a nested
            absmax without its offset: what ``weight.dequantize()`` refuses), on every path.
        ValueError: the weight is not 2-D; ``x``'s last dimension is not the weight's ``in``; the path is
            ``"interpret"`` and the kernel does not take ``weight``.
    """
    weight = _held(weight)
    _validate(x, weight)
    mesh = explicit_mesh(x, weight)
    if mesh is not None:  # the kernel and the expansion run with the mesh's axes automatic around them
        from jax.sharding import PartitionSpec as P

        spec = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
        return with_auto_axes(quantized_matmul, (x, weight), P(*spec[: x.ndim - 1], None), mesh)
    _check_pieces(weight)
    path = get_matmul_path()
    reason = fits_kernel(weight)
    if path == "expand" or (reason is not None and path == "auto"):
        return _expand(x, jax.lax.stop_gradient(weight))  # the stored pieces get no gradient on any path
    if reason is not None:
        raise ValueError(
            f"matmul_path('interpret') runs the fused kernel, which does not take this weight: {reason}; "
            "use matmul_path('auto') or matmul_path('expand') for it"
        )
    if path == "auto" and not _is_traced(*jax.tree.leaves((x, weight))):
        return _auto_on_concrete(x, weight)
    try:
        return _kernel_matmul(x, weight, path)
    except TypeError as e:  # JAX's own words for forward mode through a custom VJP
        if "forward-mode" not in str(e):
            raise
        raise TypeError(
            f"quantized_matmul on matmul_path({path!r}) has reverse-mode derivatives only (jax.grad, jax.vjp); "
            "for forward mode (jax.jvp, jax.jacfwd, jax.hessian) run it under jax_side.matmul_path('expand')"
        ) from e


@jax.jit
def _auto_on_concrete(x: jax.Array, w: Any) -> jax.Array:
    """``"auto"`` on concrete arrays, jitted: outside a jit ``platform_dependent`` picks the default backend's
    branch, not the arrays' platform (CPU arrays on a GPU machine reached the Pallas kernel and failed)."""
    return _kernel_matmul(x, w, "auto")


def _grouped(x: jax.Array, ws: tuple) -> tuple[jax.Array, ...]:
    """``x @ dequantize(w).T`` for each of ``ws`` on a CUDA device: one Mosaic launch for the group where the
    kernel takes each call (:func:`_mosaic.groupable`), else one call per weight as :func:`_fused` makes it."""
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    if x2.shape[0] > 1 and _mosaic.groupable(x2, ws):
        return tuple(y.reshape(*lead, w.shape[0]) for y, w in zip(_mosaic.matmul_group(x2, ws), ws))
    return tuple(_fused(x, w, False) for w in ws)


@jax.custom_vjp
def _kernel_matmuls(x: jax.Array, ws: tuple) -> tuple[jax.Array, ...]:
    # new functions for the branches in each trace: JAX reuses a branch's trace for the same function, and
    # the kernel's settings are read while it is traced
    return jax.lax.platform_dependent(
        x, ws, default=lambda x, ws: tuple(_expand(x, w) for w in ws), cuda=lambda x, ws: _grouped(x, ws)
    )


def _kernel_matmuls_fwd(x: jax.Array, ws: tuple) -> tuple[tuple[jax.Array, ...], Any]:
    return _kernel_matmuls(x, ws), (ws, _x_type(x))


def _kernel_matmuls_bwd(res: tuple, dys: tuple) -> tuple[jax.Array, Any]:
    ws, x_type = res
    return _backward(ws, x_type, dys)


_kernel_matmuls.defvjp(_kernel_matmuls_fwd, _kernel_matmuls_bwd)


def quantized_matmuls(x: jax.Array, weights: Sequence[NF4Weight | FP8Weight]) -> tuple[jax.Array, ...]:
    """``tuple(quantized_matmul(x, w) for w in weights)`` with one kernel launch for weights that share
    ``x`` (a layer's q/k/v or gate/up projections). Each of ``weights`` may be a flax ``nnx.Variable``
    holding the weight (a kept layer's ``.weight``).

    Each result is what :func:`quantized_matmul` gives for its weight (``x.dtype``, ``[..., out]``), up to the
    order of the float32 accumulation: on a Hopper GPU under ``matmul_path("auto")``, inside a trace (``jax.jit``),
    weights of one format and ``in`` that the Mosaic kernel takes (2 to 128 rows of x; 4-bit weights all
    nested or all plain, one table) are multiplied in one launch whose grid holds
    every weight's tiles, the contraction split for the whole grid (fewer parts than for a small weight
    alone). Elsewhere (one row of x, other paths and backends, weights the kernel does not take, meshes with
    explicit axes, arrays outside a trace) each weight is multiplied as :func:`quantized_matmul` does.
    Gradients to ``x`` (the sum over the weights, from one product over their expansions side by side: rounded
    once, where separate calls' gradients are rounded each and then added), none to the pieces.
    Where the kernel decodes a nested absmax itself alone but a group's split leaves it no room (``in`` of
    8192 or more at 128 rows, say), XLA decodes it before the call, which may round once where the kernel
    rounds twice (see ``jax_side._nf4``).

    Raises:
        TypeError, ValueError: as :func:`quantized_matmul`, for any of ``weights`` (the message names its
            index); TypeError: ``weights`` is not a sequence (one weight alone); ValueError: no weights.
    """
    if is_quantized(_held(weights)) or not isinstance(weights, Sequence):
        hint = " (one weight: quantized_matmul(x, weight))" if is_quantized(_held(weights)) else ""
        raise TypeError(f"quantized_matmuls takes a sequence of weights, got {type(weights).__name__}{hint}")
    weights = tuple(map(_held, weights))
    if not weights:
        raise ValueError("quantized_matmuls takes at least one weight")
    for i, w in enumerate(weights):
        try:
            _validate(x, w, "quantized_matmuls")
            _check_pieces(w)
        except (TypeError, ValueError) as e:
            if str(e).startswith(("x must", "x is")):  # about x itself, whichever weight it met first
                raise
            raise type(e)(f"weights[{i}]: {e}") from e
    separate = (
        len(weights) == 1
        or get_matmul_path() != "auto"
        or any(fits_kernel(w) is not None for w in weights)
        or any(explicit_mesh(x, w) is not None for w in weights)
        or not _is_traced(*jax.tree.leaves((x, weights)))
    )
    if separate:
        return tuple(quantized_matmul(x, w) for w in weights)
    try:
        return _kernel_matmuls(x, weights)
    except TypeError as e:  # JAX's own words for forward mode through a custom VJP
        if "forward-mode" not in str(e):
            raise
        raise TypeError(
            "quantized_matmuls on matmul_path('auto') has reverse-mode derivatives only (jax.grad, jax.vjp); "
            "for forward mode (jax.jvp, jax.jacfwd, jax.hessian) run it under jax_side.matmul_path('expand')"
        ) from e
