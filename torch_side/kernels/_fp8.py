"""FP8 dequantization kernel: ``float32(w) * float32(scale[tile])`` rounded once to the output dtype.

Every scale covers a ``bo x bi`` tile of the ``[rows, cols]`` weight (per-tensor: the whole weight; per-row:
``1 x cols``); the last tile row and column may be partial. One kernel writes row-major or transposed.
``SOFT``: decode float8 with integer arithmetic (the CPU interpreter's conversion mishandles NaN/inf);
on the GPU the conversion instructions give the same exact values.

``SCALE_MODE`` says how a program finds its scales: 0, its tile lies in one scale block (one load);
1, scales depend on the row only (one load per row); 2, any layout (one load per element).
"""

import triton
import triton.language as tl

from ._nf4 import to_output


@triton.jit
def fp8_to_float32(raw, E5M2: tl.constexpr, SOFT: tl.constexpr):
    """float8_e5m2 (``E5M2``) or float8_e4m3fn bytes as exact float32 values."""
    if not SOFT:
        if E5M2:
            return raw.to(tl.float8e5, bitcast=True).to(tl.float32)
        else:
            return raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    b = raw.to(tl.uint32)
    if E5M2:  # e5m2 is the top byte of a float16
        return (b << 8).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        sign = (b & 0x80) << 24
        exponent = (b >> 3) & 0xF
        mantissa = b & 0x7
        normal = sign | ((exponent + 120) << 23) | (mantissa << 20)
        subnormal = (mantissa.to(tl.float32) * 0.001953125).to(tl.uint32, bitcast=True) | sign  # m * 2**-9
        value = tl.where(exponent == 0, subnormal, normal).to(tl.float32, bitcast=True)
        return tl.where((b & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def fp8_tile(w_ptr, scale_ptr, out_ptr, rows, cols, scale_cols, bo, bi, pid_r, pid_c,
             E5M2: tl.constexpr, TRANSPOSE: tl.constexpr, SCALE_MODE: tl.constexpr,
             TILE_R: tl.constexpr, TILE_C: tl.constexpr, SOFT: tl.constexpr):  # fmt: skip
    """Decodes tile ``(pid_r, pid_c)`` of one weight."""
    r0 = pid_r.to(tl.int64) * TILE_R
    c0 = pid_c.to(tl.int64) * TILE_C
    r = r0 + tl.arange(0, TILE_R)[:, None]
    c = c0 + tl.arange(0, TILE_C)[None, :]
    mask = (r < rows) & (c < cols)
    raw = tl.load(w_ptr + r * cols + c, mask=mask, other=0, eviction_policy="evict_first")
    w = fp8_to_float32(raw, E5M2, SOFT)
    if SCALE_MODE == 0:
        s = tl.load(scale_ptr + (r0 // bo) * scale_cols + c0 // bi).to(tl.float32)
    elif SCALE_MODE == 1:
        s = tl.load(scale_ptr + (r // bo) * scale_cols, mask=r < rows, other=0.0).to(tl.float32)
    else:
        s = tl.load(scale_ptr + (r // bo) * scale_cols + c // bi, mask=mask, other=0.0).to(tl.float32)
    values = to_output(w * s, out_ptr, SOFT)
    if TRANSPOSE:
        r_t = r0 + tl.arange(0, TILE_R)[None, :]
        c_t = c0 + tl.arange(0, TILE_C)[:, None]
        tl.store(out_ptr + c_t * rows + r_t, tl.trans(values), mask=(r_t < rows) & (c_t < cols))
    else:
        tl.store(out_ptr + r * cols + c, values, mask=mask)


@triton.jit
def fp8_kernel(w_ptr, scale_ptr, out_ptr, rows, cols, scale_cols, bo, bi,
               E5M2: tl.constexpr, TRANSPOSE: tl.constexpr, SCALE_MODE: tl.constexpr,
               TILE_R: tl.constexpr, TILE_C: tl.constexpr, SOFT: tl.constexpr):  # fmt: skip
    """``w_ptr`` points at the weight's bytes (uint8)."""
    fp8_tile(w_ptr, scale_ptr, out_ptr, rows, cols, scale_cols, bo, bi, tl.program_id(0), tl.program_id(1),
             E5M2, TRANSPOSE, SCALE_MODE, TILE_R, TILE_C, SOFT)  # fmt: skip


@triton.jit
def member(ptr, members_ptr, i):
    """``ptr`` moved by the element offset ``members_ptr[i]``, a multiple of 16 bytes (grouped launches)."""
    return ptr + tl.multiple_of(
        tl.load(members_ptr + i), 16 // (ptr.dtype.element_ty.primitive_bitwidth // 8)
    )


@triton.jit
def fp8_group_kernel(w_ptr, scale_ptr, out_ptr, members_ptr, rows, cols, scale_cols, bo, bi,
                     E5M2: tl.constexpr, TRANSPOSE: tl.constexpr, SCALE_MODE: tl.constexpr,
                     TILE_R: tl.constexpr, TILE_C: tl.constexpr, SOFT: tl.constexpr):  # fmt: skip
    """Many weights of one shape and layout in one launch: grid axis 2 is the weight. The pointers are the
    first weight's; ``members_ptr`` holds, per weight, the element offsets of its weight, scales and output
    from them (int64 ``[n, 3]``, each a multiple of 16 bytes)."""
    g = tl.program_id(2).to(tl.int64) * 3
    fp8_tile(member(w_ptr, members_ptr, g), member(scale_ptr, members_ptr, g + 1),
             member(out_ptr, members_ptr, g + 2), rows, cols, scale_cols, bo, bi, tl.program_id(0),
             tl.program_id(1), E5M2, TRANSPOSE, SCALE_MODE, TILE_R, TILE_C, SOFT)  # fmt: skip
