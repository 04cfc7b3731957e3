"""Casts that keep a rounding XLA would otherwise skip.

XLA removes a narrowing conversion followed by a widening one (``f32 -> bf16 -> f32``) where it allows
excess precision (its default). A weight decoded in float32, rounded to bfloat16 (as bitsandbytes decodes)
and then used in float32 must keep that rounding to equal expand-then-matmul and the producer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ._fp8 import OUT_DTYPES


def exact_f32(v: jax.Array) -> jax.Array:
    """``v`` (bfloat16, float16 or float32) as float32, widened with integer operations.

    XLA removes a narrowing conversion followed by a widening one (``f32 -> bf16 -> f32``) where it allows
    excess precision (its default), which would skip the rounding to the weight's and x's dtypes that
    expand-then-matmul makes. Bit operations are not conversions, so the rounding stays. Only the last
    operation makes floats, so no NaN appears that ``v`` does not hold (``jax_debug_nans``)."""
    if v.dtype == jnp.float32:
        return v
    if v.dtype not in OUT_DTYPES:
        raise TypeError(f"exact_f32 widens bfloat16 and float16, got {v.dtype}")
    bits = jax.lax.bitcast_convert_type(v, jnp.uint16).astype(jnp.uint32)
    if v.dtype == jnp.bfloat16:  # a bfloat16 is a float32's high half
        return jax.lax.bitcast_convert_type(bits << 16, jnp.float32)
    # float16: exponent and mantissa moved into float32's fields and the exponent rebased (normal values),
    # the mantissa times 2**-24 (subnormal values and zero), the top exponent for infinities and NaNs;
    # then the sign
    exponent = bits & 0x7C00
    normal = ((bits & 0x7FFF) << 13) + (112 << 23)
    small = jax.lax.bitcast_convert_type(
        (bits & 0x3FF).astype(jnp.float32) * jnp.float32(2.0**-24), jnp.uint32
    )
    special = ((bits & 0x3FF) << 13) | 0x7F800000
    magnitude = jnp.where(exponent == 0, small, jnp.where(exponent == 0x7C00, special, normal))
    return jax.lax.bitcast_convert_type(magnitude | ((bits & 0x8000) << 16), jnp.float32)


def cast_exactly(v: jax.Array, dtype: Any) -> jax.Array:
    """``v.astype(dtype)``, keeping ``v``'s rounding: a bfloat16 or float16 ``v`` is widened with bit
    operations first (see :func:`exact_f32`), so that XLA cannot merge the narrowing conversion that made
    ``v`` with this one and skip a rounding (a weight decoded in float32 and rounded to bfloat16, as
    bitsandbytes decodes, then used in float32)."""
    if v.dtype == jnp.dtype(dtype):
        return v
    if v.dtype in OUT_DTYPES:
        return exact_f32(v).astype(dtype)
    return v.astype(dtype)
