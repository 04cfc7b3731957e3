"""FP8 dequantization kernel: ``float32(w) * float32(scale[tile])`` rounded once to the output dtype.

Every scale covers a ``BO x BI`` tile of the ``[rows, cols]`` weight (per-tensor: the whole weight; per-row:
``1 x cols``); the last tile row and column may be partial. One kernel writes row-major or transposed.
The float8 bytes are decoded with integer arithmetic (exact, NaN and e5m2's infinities included), so that
Triton's CPU interpreter, whose float8 conversion mishandles those codes, computes the GPU's bits.
"""

import triton
import triton.language as tl

from ._nf4 import to_output


@triton.jit
def fp8_to_float32(raw, E5M2: tl.constexpr):
    """float8_e5m2 (``E5M2``) or float8_e4m3fn bytes as exact float32 values."""
    b = raw.to(tl.uint32)
    if E5M2:  # e5m2 is the top byte of a float16
        return (b << 8).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        sign = (b & 0x80) << 24
        exponent = (b >> 3) & 0xF
        mantissa = b & 0x7
        normal = (sign | ((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
        subnormal = mantissa.to(tl.float32) * 0.001953125  # m * 2**-9, exact
        subnormal = tl.where(sign != 0, -subnormal, subnormal)
        value = tl.where(exponent == 0, subnormal, normal)
        return tl.where((b & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def fp8_kernel(w_ptr, scale_ptr, out_ptr, rows, cols, scale_cols, bo, bi,
               E5M2: tl.constexpr, TRANSPOSE: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr):  # fmt: skip
    """``w_ptr`` points at the weight's bytes (uint8)."""
    r = tl.program_id(0).to(tl.int64) * TILE_R + tl.arange(0, TILE_R)[:, None]
    c = tl.program_id(1).to(tl.int64) * TILE_C + tl.arange(0, TILE_C)[None, :]
    mask = (r < rows) & (c < cols)
    w = fp8_to_float32(tl.load(w_ptr + r * cols + c, mask=mask, other=0), E5M2)
    s = tl.load(scale_ptr + (r // bo) * scale_cols + c // bi, mask=mask, other=0.0).to(tl.float32)
    values = to_output(w * s, out_ptr)
    if TRANSPOSE:
        tl.store(out_ptr + c * rows + r, values, mask=mask)
    else:
        tl.store(out_ptr + r * cols + c, values, mask=mask)
