"""FP8 dequantization in JAX with per-tensor, per-row or block scales: ``float32(w) * scale`` rounded once.

The scale-layout rule is the same as ``torch_side.fp8_scale_layout`` (a test holds the two to it).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _cpu_kernel
from ._layout import out_dtype, refuse_torch

FP8_DTYPES = tuple(
    jnp.dtype(getattr(jnp, name))
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(jnp, name)
)
# float8_e8m0fnu: power-of-two block scales (MX formats, some FP8 releases), widened to float32 exactly
SCALE_DTYPES = tuple(
    jnp.dtype(getattr(jnp, name))
    for name in ("float32", "bfloat16", "float16", "float8_e8m0fnu")
    if hasattr(jnp, name)
)
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
DEFAULT_BLOCK = 128


class ScaleLayout(NamedTuple):
    """How a scale tensor tiles a weight: every scale covers a ``block[0] x block[1]`` tile of one ``[out, in]``
    matrix (a ``block_size`` past a side of the matrix is read as that side). ``stack`` holds the leading
    dimensions of a stacked weight ``[*stack, out, in]`` (MoE experts in one tensor) whose scales are
    ``[*stack, *grid]``: each matrix has its own tiles, none crosses to the next."""

    kind: str  # "tensor", "row" or "block"
    block: tuple[int, int]
    grid: tuple[int, int]
    stack: tuple[int, ...] = ()

    @property
    def matrix_scale_shape(self) -> tuple[int, int]:
        """The shape of one matrix's scales (``(1, 1)`` for a per-tensor scale)."""
        return (1, 1) if self.kind == "tensor" else self.grid


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# torch_side's reading of integer arguments, shared by file (standard library only: torch is not imported)
_integers = _cpu_kernel._shared("_integers")
_block_pair: Callable[[Any], tuple[int, int]] = _integers.block_pair
_is_int: Callable[[Any], bool] = _integers.is_int


def _fitting_blocks(n: int, s: int) -> tuple[int, float]:
    if s <= 0:
        return (1, 0)
    return (_ceil_div(n, s), math.inf if s == 1 else _ceil_div(n, s - 1) - 1)


def fp8_scale_layout(
    weight_shape: tuple[int, ...],
    scale_shape: tuple[int, ...],
    block_size: int | tuple[int, int] | None = None,
) -> ScaleLayout:
    """Decides how ``scale_shape`` tiles ``weight_shape``.

    One element (any shape, whatever ``block_size`` says): a per-tensor scale. ``[out, 1]`` or ``[out]``: per
    row. Otherwise ``[ceil(out / bo), ceil(in / bi)]`` blocks, with ``(bo, bi)`` from ``block_size``, else
    128 if the scale shape agrees with 128, else the one square block size that fits both sides. A stacked
    weight ``[E, out, in]`` (experts) takes ``[E]`` (one scale per matrix) or ``[E, ...]`` with one of
    these forms per matrix.

    Raises:
        ValueError: the shapes do not fit together, or several block sizes fit and they tile differently;
            ``block_size`` is neither a positive int nor a pair of them (whatever the scale's shape).
    """
    weight_shape, scale_shape = tuple(weight_shape), tuple(scale_shape)
    if block_size is not None:  # read before a per-tensor scale answers, as torch_side's dequantize_fp8 does
        block_size = _block_pair(block_size)
    if math.prod(scale_shape) == 1:
        whole = (weight_shape[0], math.prod(weight_shape[1:])) if weight_shape else (1, 1)
        return ScaleLayout("tensor", whole, (1, 1))
    if len(weight_shape) == 3 and len(scale_shape) in (1, 3) and scale_shape[0] == weight_shape[0]:
        matrix = fp8_scale_layout(
            weight_shape[1:], (1, 1) if len(scale_shape) == 1 else scale_shape[1:], block_size
        )
        return matrix._replace(stack=weight_shape[:1])
    if len(weight_shape) != 2:
        raise ValueError(
            f"scale_inv of shape {scale_shape} does not fit a weight of shape {weight_shape}: a 2-D [out, in] "
            "weight takes one scale, per-row [out, 1] or block scales; a stacked [experts, out, in] weight takes "
            "[experts] or [experts, ...] of those; other ranks take one (per-tensor) scale"
        )
    rows, cols = weight_shape
    if block_size is not None:
        bo, bi = block_size
        grid = (_ceil_div(rows, bo), _ceil_div(cols, bi))
        if grid == scale_shape:  # a block past a side is that side: the same tiles, no size beyond the matrix
            return ScaleLayout("block", (min(bo, max(rows, 1)), min(bi, max(cols, 1))), grid)
    if scale_shape in ((rows, 1), (rows,)):
        return ScaleLayout("row", (1, max(cols, 1)), (rows, 1))
    if len(scale_shape) != 2 or block_size is not None:
        blocks = f"block scales {grid} (block_size {(bo, bi)})" if block_size is not None else (
            f"block scales [ceil({rows}/b), ceil({cols}/b)]")  # fmt: skip
        raise ValueError(
            f"scale_inv has shape {scale_shape}; a [{rows}, {cols}] weight takes a per-tensor scale (one element, "
            f"any shape), per-row scales [{rows}, 1] or {blocks}"
        )
    grid128 = (_ceil_div(rows, DEFAULT_BLOCK), _ceil_div(cols, DEFAULT_BLOCK))
    if grid128 == scale_shape:
        return ScaleLayout("block", (DEFAULT_BLOCK, DEFAULT_BLOCK), grid128)
    lo0, hi0 = _fitting_blocks(rows, scale_shape[0])
    lo1, hi1 = _fitting_blocks(cols, scale_shape[1])
    lo, hi = max(lo0, lo1), min(hi0, hi1)
    if lo > hi:
        raise ValueError(
            f"scale_inv has shape {scale_shape}, which fits no square block of a [{rows}, {cols}] weight "
            f"(block 128 needs {grid128}); pass block_size=(rows_per_block, cols_per_block) if the blocks "
            "are not square"
        )
    if lo != hi:
        top = "any larger" if hi == math.inf else int(hi)
        raise ValueError(
            f"scale_inv has shape {scale_shape}: square blocks from {lo} to {top} all fit a [{rows}, {cols}] "
            "weight and cut it differently; pass block_size= (the checkpoint's "
            "quantization_config.weight_block_size)"
        )
    return ScaleLayout("block", (lo, lo), scale_shape)


@functools.partial(jax.jit, static_argnames=("layout", "dtype", "transpose"))
def _decode(w: jax.Array, scale: jax.Array, *, layout: ScaleLayout, dtype: Any, transpose: bool) -> jax.Array:
    if layout.stack:  # one matrix at a time: no tile crosses from one expert to the next
        matrix = layout._replace(stack=())
        per = scale.reshape(*layout.stack, *layout.matrix_scale_shape)
        return jax.vmap(lambda a, b: _decode_matrix(a, b, layout=matrix, dtype=dtype, transpose=transpose))(
            w, per
        )
    return _decode_matrix(w, scale, layout=layout, dtype=dtype, transpose=transpose)


def _decode_matrix(
    w: jax.Array, scale: jax.Array, *, layout: ScaleLayout, dtype: Any, transpose: bool
) -> jax.Array:
    wf = w.astype(jnp.float32)
    s = scale.astype(jnp.float32)
    if layout.kind == "tensor":
        out = (wf * s.reshape(())).astype(dtype)
    else:
        rows, cols = w.shape
        (bo, bi), (so, si) = layout.block, layout.grid
        s = s.reshape(so, si)
        if rows % bo == 0 and cols % bi == 0:
            out = (wf.reshape(so, bo, si, bi) * s[:, None, :, None]).reshape(rows, cols)
        else:
            expanded = jnp.repeat(jnp.repeat(s, bo, axis=0, total_repeat_length=so * bo)[:rows], bi, axis=1,
                                  total_repeat_length=si * bi)[:, :cols]  # fmt: skip
            out = wf * expanded
        out = out.astype(dtype)
    return jnp.swapaxes(out, -1, -2) if transpose else out


def dequantize_fp8(
    w: Any,
    scale_inv: Any,
    *,
    block_size: int | tuple[int, int] | None = None,
    dtype: Any = jnp.bfloat16,
    transpose: bool = False,
) -> jax.Array:
    """Dequantizes an FP8 weight in JAX: ``float32(w) * scale_inv[tile]``, one rounding to ``dtype``.

    The same rules and values as ``torch_side.dequantize_fp8`` (there ``dtype`` is the third positional
    argument; here it is keyword-only).

    Args:
        w: float8_e4m3fn or float8_e5m2, ``[out, in]``, or stacked ``[experts, out, in]`` (any shape with a
            per-tensor scale).
        scale_inv: per block ``[ceil(out / b), ceil(in / b)]``, per row ``[out, 1]``, or one element
            (stacked weights: ``[experts, ...]`` of those, or ``[experts]``); float32 (bfloat16, float16 and
            float8_e8m0fnu widen exactly).
        block_size: the block edge or ``(rows, cols)``; default 128 if the scale shape agrees with it,
            else the single square size that fits.
        dtype: bfloat16, float16 or float32.
        transpose: return the ``[in, out]`` (Flax ``kernel``) layout (``[experts, in, out]`` for a 3-D weight,
            stacked, with one scale per expert or one for all).

    Returns:
        A new ``jax.Array``; jit-compatible (shapes decide the layout statically).

    Raises:
        TypeError: ``w`` is not float8 (uint8 bytes: ``jax.lax.bitcast_convert_type(w, jnp.float8_e4m3fn)``),
            or an unsupported scale or output dtype.
        ValueError: the scale shape does not fit ``w`` (see :func:`fp8_scale_layout`).
    """
    refuse_torch(w, "w")
    refuse_torch(scale_inv, "scale_inv")
    w = jnp.asarray(w)
    if w.dtype not in FP8_DTYPES:
        hint = ""
        if w.dtype == jnp.uint8:
            hint = (
                " If these are FP8 bytes, view them back: jax.lax.bitcast_convert_type(w, jnp.float8_e4m3fn)."
            )
        raise TypeError(f"dequantize_fp8 takes a float8 weight, got {w.dtype}.{hint}")
    if isinstance(scale_inv, numbers.Real) and not isinstance(scale_inv, bool):  # a number: its float32, as
        scale_inv = np.float32(scale_inv)  # torch_side reads it (also under jax_enable_x64)
    elif not hasattr(scale_inv, "shape"):  # None, a string, a list: not read as an array of some dtype
        raise TypeError(
            f"scale_inv must be an array or a real number, got {type(scale_inv).__name__} {scale_inv!r}"
        )
    scale_inv = jnp.asarray(scale_inv)
    if scale_inv.dtype not in SCALE_DTYPES:
        raise TypeError(
            f"scale_inv must be float32, bfloat16, float16 or float8_e8m0fnu, got {scale_inv.dtype}"
        )
    out_dtype(dtype, OUT_DTYPES, TypeError)
    layout = fp8_scale_layout(w.shape, scale_inv.shape, block_size)
    if transpose and w.ndim == 3 and layout.kind == "tensor" and not layout.stack:
        # one scale for a stacked [experts, out, in] weight: the same decode as that scale for each expert
        scale_inv = jnp.broadcast_to(scale_inv.reshape(1), (w.shape[0],))
        layout = fp8_scale_layout(w.shape[1:], (1, 1), None)._replace(stack=tuple(w.shape[:1]))
    if transpose and w.ndim != 2 + len(layout.stack):
        raise ValueError(
            f"transpose=True needs a 2-D weight (or a stacked [experts, out, in] one), got shape {w.shape}"
        )
    if w.size == 0:
        return jnp.zeros((*w.shape[:-2], w.shape[-1], w.shape[-2]) if transpose else w.shape, dtype)
    return _decode(w, scale_inv, layout=layout, dtype=jnp.dtype(dtype), transpose=transpose)
