"""bitsandbytes 4-bit dequantization kernels.

Element ``i`` (row-major over the weight) is nibble ``q`` of byte ``i // 2`` (the high nibble when ``i`` is
even) and becomes ``code[q] * absmax[i // blocksize]`` in float32, rounded once to the output dtype. A
nested absmax is ``nested_code[a] * nested_absmax[j // nested_blocksize]`` rounded to float32, then
``+ offset`` rounded again: launch with ``enable_fp_fusion=False`` so that the compiler does not merge
the two into one fused multiply-add. Like bitsandbytes' CUDA kernels (built to flush denormals), every
float32 result below 2**-126 in magnitude becomes a zero of its sign.

The code table arrives as byte pairs: ``pairs[b] = (code[b >> 4], code[b & 15])``, one 8-byte load per
packed byte instead of two lookups.

``SOFT`` selects integer-arithmetic conversions (bf16 rounding, float8 decoding) that give the hardware's
exact bits: Triton's CPU interpreter truncates bf16 and mishandles float8 NaN/inf, so the interpreter
runs those, and the GPU its conversion instructions.
"""

import triton
import triton.language as tl

FLT_MIN = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def flush(x):
    """``x`` with magnitudes below FLT_MIN replaced by a zero of the same sign (flush-to-zero)."""
    sign = (x.to(tl.uint32, bitcast=True) & 0x80000000).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(x) < FLT_MIN, sign, x)


@triton.jit
def to_output(x, out_ptr, SOFT: tl.constexpr):
    """float32 ``x`` rounded to nearest-even in ``out_ptr``'s dtype."""
    if SOFT and out_ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = (bits >> 16) | 0x0040  # a quiet NaN keeps its sign and top payload bits
        bits16 = tl.where(x != x, nan, rounded).to(tl.uint16)
        return bits16.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_ptr.dtype.element_ty)


@triton.jit
def block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, mask,
                NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, OFFSET_TENSOR: tl.constexpr):  # fmt: skip
    """The float32 absmax of blocks ``blk`` (decoding a nested absmax on the fly)."""
    if NESTED:
        a = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        product = flush(
            tl.load(nested_code_ptr + a)
            * tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        )
        if OFFSET_TENSOR:  # a one-element tensor (a QuantState's offset)
            offset = tl.load(offset_ptr)
        else:  # a number, passed as a float32 argument
            offset = offset_ptr
        return flush(product + offset)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def nf4_rows_kernel(packed_ptr, absmax_ptr, pairs_ptr, out_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                    n_bytes, n_elements,
                    BYTES_PER_BLOCK: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, OFFSET_TENSOR: tl.constexpr,
                    ROWS: tl.constexpr, COLS: tl.constexpr, SOFT: tl.constexpr):  # fmt: skip
    """Row-major output. A program decodes ``ROWS x COLS`` packed bytes, each of its rows inside one
    absmax block (``COLS`` divides ``BYTES_PER_BLOCK``, or ``ROWS == 1`` and the block holds the program),
    so the scale is computed once per row."""
    start = tl.program_id(0).to(tl.int64) * (ROWS * COLS)
    row = tl.arange(0, ROWS)[:, None]
    offs = start + row * COLS + tl.arange(0, COLS)[None, :]
    mask = offs < n_bytes
    byte = tl.load(packed_ptr + offs, mask=mask, other=0, eviction_policy="evict_first").to(tl.int32)
    first = start + row * COLS
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, first // BYTES_PER_BLOCK,
                        first < n_bytes, NESTED, NESTED_BLOCKSIZE, OFFSET_TENSOR)  # fmt: skip
    high, low = tl.split(tl.load(pairs_ptr + (byte * 2)[:, :, None] + tl.arange(0, 2)[None, None, :]))
    values = to_output(flush(tl.interleave(high * scale, low * scale)), out_ptr, SOFT)
    elems = 2 * start + row * (2 * COLS) + tl.arange(0, 2 * COLS)[None, :]
    tl.store(out_ptr + elems, values, mask=elems < n_elements)


@triton.jit
def nf4_transposed_kernel(packed_ptr, absmax_ptr, pairs_ptr, out_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                          rows, cols,
                          BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, OFFSET_TENSOR: tl.constexpr,
                          ROW_SCALE: tl.constexpr, TILE_R: tl.constexpr, TILE_B: tl.constexpr,
                          SOFT: tl.constexpr):  # fmt: skip
    """An even-width ``[rows, cols]`` weight written as its ``[cols, rows]`` transpose. A program reads a
    ``TILE_R x TILE_B`` tile of packed bytes (``2 * TILE_B`` columns), decodes it, and writes it transposed
    as coalesced output rows. ``ROW_SCALE``: each tile row lies inside one absmax block. (Measured on an
    H100, this beat transposing the two nibble planes separately and transposing the packed bytes.)"""
    pid_r = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    r = pid_r * TILE_R + tl.arange(0, TILE_R)[:, None]
    jb = pid_b * TILE_B + tl.arange(0, TILE_B)[None, :]
    half = cols // 2
    mask = (r < rows) & (jb < half)
    byte = tl.load(packed_ptr + r * half + jb, mask=mask, other=0, eviction_policy="evict_first").to(tl.int32)
    if ROW_SCALE:
        blk = (r * cols + 2 * pid_b * TILE_B) // BLOCKSIZE
        scale = block_scale(
            absmax_ptr,
            nested_absmax_ptr,
            nested_code_ptr,
            offset_ptr,
            blk,
            r < rows,
            NESTED,
            NESTED_BLOCKSIZE,
            OFFSET_TENSOR,
        )
    else:
        blk = (r * cols + 2 * jb) // BLOCKSIZE
        scale = block_scale(
            absmax_ptr,
            nested_absmax_ptr,
            nested_code_ptr,
            offset_ptr,
            blk,
            mask,
            NESTED,
            NESTED_BLOCKSIZE,
            OFFSET_TENSOR,
        )
    pair = tl.load(pairs_ptr + (byte * 2)[:, :, None] + tl.arange(0, 2)[None, None, :])  # [TILE_R, TILE_B, 2]
    values = to_output(flush(pair * scale[:, :, None]), out_ptr, SOFT).reshape(TILE_R, 2 * TILE_B)
    r_t = pid_r * TILE_R + tl.arange(0, TILE_R)[None, :]
    c_t = 2 * pid_b * TILE_B + tl.arange(0, 2 * TILE_B)[:, None]
    tl.store(out_ptr + c_t * rows + r_t, tl.trans(values), mask=(r_t < rows) & (c_t < cols))


@triton.jit
def nf4_transposed_any_kernel(packed_ptr, absmax_ptr, pairs_ptr, out_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                              rows, cols,
                              BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, OFFSET_TENSOR: tl.constexpr,
                              TILE_R: tl.constexpr, TILE_C: tl.constexpr, SOFT: tl.constexpr):  # fmt: skip
    """Any ``[rows, cols]`` weight (odd widths too: rows then straddle bytes) written transposed, one element
    at a time (the table's first column is ``code`` itself, read at ``2 * (q << 4)``)."""
    r = tl.program_id(0).to(tl.int64) * TILE_R + tl.arange(0, TILE_R)[:, None]
    c = tl.program_id(1).to(tl.int64) * TILE_C + tl.arange(0, TILE_C)[None, :]
    mask = (r < rows) & (c < cols)
    flat = r * cols + c
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    nibble = (byte >> (((flat & 1) ^ 1) * 4).to(tl.int32)) & 15
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, flat // BLOCKSIZE, mask,
                        NESTED, NESTED_BLOCKSIZE, OFFSET_TENSOR)  # fmt: skip
    values = to_output(flush(tl.load(pairs_ptr + 2 * (nibble << 4)) * scale), out_ptr, SOFT)
    tl.store(out_ptr + c * rows + r, values, mask=mask)
