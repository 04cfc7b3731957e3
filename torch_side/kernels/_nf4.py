"""bitsandbytes 4-bit dequantization kernels.

Element ``i`` (row-major over the weight) is nibble ``q`` of byte ``i // 2`` (the high nibble when ``i`` is
even) and becomes ``code[q] * absmax[i // blocksize]`` in float32, rounded once to the output dtype. A
nested absmax is ``nested_code[a] * nested_absmax[j // nested_blocksize]`` rounded to float32, then
``+ offset`` rounded again: launch with ``enable_fp_fusion=False`` so that the compiler does not merge
the two into one fused multiply-add.
"""

import triton
import triton.language as tl


@triton.jit
def to_output(x, out_ptr):
    """float32 ``x`` rounded to nearest-even in ``out_ptr``'s dtype.

    bfloat16 is rounded with integer arithmetic, exactly what the hardware conversion does, so that
    Triton's CPU interpreter (which truncates) computes the same bits as the GPU.
    """
    if out_ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = (bits >> 16) | 0x0040  # a quiet NaN keeps its sign and top payload bits
        bits16 = tl.where(x != x, nan, rounded).to(tl.uint16)
        return bits16.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_ptr.dtype.element_ty)


@triton.jit
def _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, mask,
                 NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):  # fmt: skip
    """The float32 absmax of blocks ``blk`` (decoding a nested absmax on the fly)."""
    if NESTED:
        a = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        product = tl.load(nested_code_ptr + a) * tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return product + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def nf4_rows_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                    n_bytes, n_elements,
                    BYTES_PER_BLOCK: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                    BLOCK: tl.constexpr):  # fmt: skip
    """Row-major output: each program decodes ``BLOCK`` packed bytes into ``2 * BLOCK`` outputs."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4))
    low = tl.load(code_ptr + (byte & 15))
    # a block holds an even number of elements, so both nibbles of a byte share its scale
    scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, offs // BYTES_PER_BLOCK,
                         mask, NESTED, NESTED_BLOCKSIZE)  # fmt: skip
    values = to_output(tl.interleave(high * scale, low * scale), out_ptr)
    elems = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + elems, values, mask=elems < n_elements)


@triton.jit
def nf4_transposed_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                          rows, cols,
                          BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                          TILE_R: tl.constexpr, TILE_C: tl.constexpr):  # fmt: skip
    """``[rows, cols]`` weight written as its ``[cols, rows]`` transpose, one tile per program."""
    r = tl.program_id(0).to(tl.int64) * TILE_R + tl.arange(0, TILE_R)[:, None]
    c = tl.program_id(1).to(tl.int64) * TILE_C + tl.arange(0, TILE_C)[None, :]
    mask = (r < rows) & (c < cols)
    flat = r * cols + c
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    nibble = (byte >> (((flat & 1) ^ 1) * 4).to(tl.int32)) & 15
    scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, flat // BLOCKSIZE, mask,
                         NESTED, NESTED_BLOCKSIZE)  # fmt: skip
    values = to_output(tl.load(code_ptr + nibble) * scale, out_ptr)
    tl.store(out_ptr + c * rows + r, values, mask=mask)
