"""Baseline kernels for ``qbridge bench`` (not used by the library itself)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _one_tile_kernel(w_ptr, s_ptr, out_ptr, rows, cols, scale_cols, TILE: tl.constexpr):
    """The common FP8 layout: one program per 128x128 scale tile, as DeepSeek's reference kernel does."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    r = i * TILE + tl.arange(0, TILE)[:, None]
    c = j * TILE + tl.arange(0, TILE)[None, :]
    mask = (r < rows) & (c < cols)
    w = tl.load(w_ptr + r * cols + c, mask=mask).to(tl.float32)
    s = tl.load(s_ptr + i * scale_cols + j)
    tl.store(out_ptr + r * cols + c, (w * s).to(out_ptr.dtype.element_ty), mask=mask)


def one_tile_per_program_fp8(w: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    grid = (triton.cdiv(rows, 128), triton.cdiv(cols, 128))
    _one_tile_kernel[grid](w, s, out, rows, cols, s.shape[1], TILE=128)
    return out
