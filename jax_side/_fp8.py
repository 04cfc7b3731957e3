"""FP8 dequantization in JAX with per-tensor, per-row or block scales: ``float32(w) * scale`` rounded once.

The scale-layout rule is the same as ``torch_side.fp8_scale_layout`` (a test holds the two to it).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

FP8_DTYPES = tuple(
    jnp.dtype(getattr(jnp, name))
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(jnp, name)
)
SCALE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
DEFAULT_BLOCK = 128


class ScaleLayout(NamedTuple):
    """How a scale tensor tiles a weight: every scale covers a ``block[0] x block[1]`` tile."""

    kind: str  # "tensor", "row" or "block"
    block: tuple[int, int]
    grid: tuple[int, int]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _fitting_blocks(n: int, s: int) -> tuple[int, float]:
    if s <= 0:
        return (1, 0)
    return (_ceil_div(n, s), math.inf if s == 1 else _ceil_div(n, s - 1) - 1)


def fp8_scale_layout(
    weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], block_size: int | tuple[int, int] | None = None
) -> ScaleLayout:
    """Decides how ``scale_shape`` tiles ``weight_shape``: one element per tensor, ``[out, 1]`` per row,
    else blocks of ``block_size``, else 128 if it agrees, else the one square size that fits.

    Raises:
        ValueError: the shapes do not fit, or several block sizes fit and tile differently.
    """
    weight_shape, scale_shape = tuple(weight_shape), tuple(scale_shape)
    if math.prod(scale_shape) == 1 and block_size is None:
        whole = (weight_shape[0], math.prod(weight_shape[1:])) if weight_shape else (1, 1)
        return ScaleLayout("tensor", whole, (1, 1))
    if len(weight_shape) != 2:
        raise ValueError(
            f"scale_inv of shape {scale_shape} needs a 2-D [out, in] weight, got shape {weight_shape}; "
            "only a one-element (per-tensor) scale fits other ranks"
        )
    rows, cols = weight_shape
    if block_size is None and scale_shape in ((rows, 1), (rows,)):
        return ScaleLayout("row", (1, max(cols, 1)), (rows, 1))
    if len(scale_shape) != 2:
        raise ValueError(
            f"scale_inv has shape {scale_shape}; a [{rows}, {cols}] weight takes a one-element scale, "
            f"a per-row scale [{rows}, 1] or block scales [ceil({rows}/b), ceil({cols}/b)]"
        )
    if block_size is not None:
        pair = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
        if len(pair) != 2 or not all(isinstance(b, int) and b > 0 for b in pair):
            raise ValueError(f"block_size must be a positive int or a pair of them, got {block_size!r}")
        grid = (_ceil_div(rows, pair[0]), _ceil_div(cols, pair[1]))
        if grid != scale_shape:
            raise ValueError(
                f"scale_inv has shape {scale_shape}; a [{rows}, {cols}] weight with block_size {pair} needs {grid}"
            )
        return ScaleLayout("block", pair, grid)  # type: ignore[arg-type]
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
    return out.T if transpose else out


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
        w: float8_e4m3fn or float8_e5m2, ``[out, in]`` (any shape with a per-tensor scale).
        scale_inv: per block ``[ceil(out / b), ceil(in / b)]``, per row ``[out, 1]``, or one element;
            float32 (bfloat16/float16 widen exactly).
        block_size: the block edge or ``(rows, cols)``; default 128 if the scale shape agrees with it,
            else the single square size that fits.
        dtype: bfloat16, float16 or float32.
        transpose: return the ``[in, out]`` (Flax ``kernel``) layout.

    Returns:
        A new ``jax.Array``; jit-compatible (shapes decide the layout statically).

    Raises:
        TypeError: ``w`` is not float8 (uint8 bytes: ``jax.lax.bitcast_convert_type(w, jnp.float8_e4m3fn)``),
            or an unsupported scale or output dtype.
        ValueError: the scale shape does not fit ``w`` (see :func:`fp8_scale_layout`).
    """
    w = jnp.asarray(w)
    if w.dtype not in FP8_DTYPES:
        hint = ""
        if w.dtype == jnp.uint8:
            hint = " If these are FP8 bytes, view them back: jax.lax.bitcast_convert_type(w, jnp.float8_e4m3fn)."
        raise TypeError(f"dequantize_fp8 takes a float8 weight, got {w.dtype}.{hint}")
    scale_inv = jnp.asarray(scale_inv)
    if scale_inv.dtype not in SCALE_DTYPES:
        raise TypeError(f"scale_inv must be float32, bfloat16 or float16, got {scale_inv.dtype}")
    if jnp.dtype(dtype) not in OUT_DTYPES:
        raise TypeError(f"output dtype must be bfloat16, float16 or float32, got {jnp.dtype(dtype)}")
    layout = fp8_scale_layout(w.shape, scale_inv.shape, block_size)
    if transpose and w.ndim != 2:
        raise ValueError(f"transpose=True needs a 2-D weight, got shape {w.shape}")
    if w.size == 0:
        return jnp.zeros(w.shape[::-1] if transpose else w.shape, dtype)
    return _decode(w, scale_inv, layout=layout, dtype=jnp.dtype(dtype), transpose=transpose)
