"""Launchers for the Triton kernels in ``torch_side.kernels``: shapes, tiles, grids and output buffers.

Inputs arrive checked by ``_nf4`` / ``_fp8``. Kernels run on the current stream of the tensors' device (on
CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._backend import triton_interpreting
from ._launch import Launcher, launch
from ._plans import FP8_PLANS, NF4_PLANS, remember
from .kernels._fp8 import fp8_kernel
from .kernels._nf4 import nf4_rows_kernel, nf4_transposed_any_kernel, nf4_transposed_kernel

# Tile and launch choices, measured on an H100 (benchmarks/RESULTS.md).
NF4_ROWS_BLOCK = 4096  # packed bytes per program
NF4_ROWS_WARPS = 4
NF4_T_TILE = (128, 32)  # rows x packed bytes (128 x 64 elements)
NF4_T_WARPS = 4
NF4_T_ANY_TILE = (32, 64)
FP8_TILE = (64, 128)
FP8_T_TILE = (128, 128)
FP8_WARPS = 4
FP8_T_WARPS = 8


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _output(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A contiguous buffer to launch into, and the ``out`` to copy it to afterwards (None if it is ``out``)."""
    if out is not None and out.is_contiguous():
        return out, None
    return torch.empty(shape, dtype=dtype, device=device), out


def _soft(device: torch.device) -> bool:
    """Integer-arithmetic conversions where the hardware's are missing (Triton's CPU interpreter)."""
    return device.type != "cuda" or triton_interpreting()


class NF4Plan:
    """A checked 4-bit call: allocate the output and launch (see ``_plans``)."""

    __slots__ = ("dtype", "ints", "launcher", "nested", "out_shape", "pairs")

    def __init__(
        self,
        launcher: Launcher,
        out_shape: tuple[int, ...],
        dtype: torch.dtype,
        ints: tuple[int, ...],
        pairs: torch.Tensor,
        nested: bool,
    ) -> None:
        self.launcher, self.out_shape, self.dtype, self.ints = launcher, out_shape, dtype, ints
        self.pairs, self.nested = pairs, nested

    def __call__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        nested_absmax: torch.Tensor | None,
        nested_code: torch.Tensor | None,
        offset: Any,
        device: torch.device,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if out is None:
            out = torch.empty(self.out_shape, dtype=self.dtype, device=device)
        # the arguments dequantize_4bit_triton builds, without its conversions: _nf4._plan_ready made
        # plans only for pieces that need none (contiguous, a float32 offset tensor on the device)
        if self.nested:
            extra = (
                nested_absmax,
                nested_code,
                offset if isinstance(offset, torch.Tensor) else float(offset),
            )
        else:
            extra = (absmax, absmax, absmax)
        # packed in its quant_storage dtype or as bytes: the launcher passes the pointer
        self.launcher(device.index, packed, absmax, self.pairs, out, *extra, *self.ints)
        return out


def dequantize_4bit_triton(
    flat: torch.Tensor,
    absmax: torch.Tensor,
    pairs: torch.Tensor,
    *,
    blocksize: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    transpose: bool,
    out: torch.Tensor | None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    offset: float | torch.Tensor = 0.0,
    plan_key: tuple[Any, ...] | None = None,
    wait: bool = True,
) -> torch.Tensor:
    """One fused pass: unpack, look up, scale (a nested absmax decoded on the way), convert, and write
    row-major or transposed. ``flat`` holds the packed bytes; ``absmax`` is float32, or uint8 when nested;
    ``pairs`` is the byte-pair table of the code (``_codes.pairs_of``). With ``plan_key``, the launch is
    remembered under it (``_plans``). With ``wait`` false, raises ``KernelNotReady`` (writing nothing) while
    the kernel is compiled in the background (``_compile``)."""
    n = math.prod(shape)
    device = flat.device
    nested = nested_absmax is not None and nested_code is not None
    absmax = absmax.contiguous()  # the kernels read flat memory: any contiguous shape will do
    if nested_absmax is not None and nested_code is not None:
        # a tensor is read on the device; a number goes in as a float32 argument (no host-to-device copy),
        # except under the interpreter, which would keep a Python float (float64 where float32 cannot hold it)
        if isinstance(offset, torch.Tensor):
            offset_t: torch.Tensor | float = offset.to(device=device, dtype=torch.float32).contiguous()
        elif _soft(device):
            offset_t = torch.tensor(float(offset), dtype=torch.float32, device=device)
        else:
            offset_t = float(offset)
        extra = (nested_absmax.contiguous(), nested_code.contiguous(), offset_t)
    else:
        extra = (absmax, absmax, absmax)  # unused pointers
    result_shape = (shape[1], shape[0]) if transpose else shape
    buf, copy_to = _output(result_shape, dtype, device, out)
    common = dict(
        NESTED=nested,
        NESTED_BLOCKSIZE=nested_blocksize,
        OFFSET_TENSOR=isinstance(extra[2], torch.Tensor),
        SOFT=_soft(device),
        enable_fp_fusion=False,
    )
    ints: tuple[int, ...]
    if transpose and shape[1] % 2 == 0:
        rows, cols = shape
        ints = (rows, cols)
        tile_r, tile_b = NF4_T_TILE
        row_scale = cols % blocksize == 0 and (blocksize // 2) % tile_b == 0
        grid: tuple[int, ...] = (_cdiv(rows, tile_r), _cdiv(cols // 2, tile_b))
        launcher = launch(
            nf4_transposed_kernel, grid, flat, absmax, pairs, buf, *extra, *ints, BLOCKSIZE=blocksize, ROW_SCALE=row_scale,
            TILE_R=tile_r, TILE_B=tile_b, num_warps=NF4_T_WARPS, wait=wait, **common,
        )  # fmt: skip
    elif transpose:
        rows, cols = shape
        ints = (rows, cols)
        grid = (_cdiv(rows, NF4_T_ANY_TILE[0]), _cdiv(cols, NF4_T_ANY_TILE[1]))
        launcher = launch(
            nf4_transposed_any_kernel, grid, flat, absmax, pairs, buf, *extra, *ints, BLOCKSIZE=blocksize,
            TILE_R=NF4_T_ANY_TILE[0], TILE_C=NF4_T_ANY_TILE[1], num_warps=NF4_T_WARPS, wait=wait, **common,
        )  # fmt: skip
    else:
        n_bytes = (n + 1) // 2
        ints = (n_bytes, n)
        bytes_per_block = blocksize // 2
        cols = min(bytes_per_block, NF4_ROWS_BLOCK)  # each row of a program's tile inside one block
        grid = (_cdiv(n_bytes, NF4_ROWS_BLOCK),)
        launcher = launch(
            nf4_rows_kernel, grid, flat, absmax, pairs, buf, *extra, *ints, BYTES_PER_BLOCK=bytes_per_block,
            ROWS=NF4_ROWS_BLOCK // cols, COLS=cols, num_warps=NF4_ROWS_WARPS, wait=wait, **common,
        )  # fmt: skip
    if plan_key is not None and launcher is not None and copy_to is None:  # out, when given, is buf
        remember(NF4_PLANS, plan_key, NF4Plan(launcher, result_shape, dtype, ints, pairs, nested))
    return copy_to.copy_(buf) if copy_to is not None else buf


class FP8Plan:
    """A checked FP8 call: allocate the output and launch (see ``_plans``)."""

    __slots__ = ("dtype", "ints", "launcher", "out_shape")

    def __init__(
        self, launcher: Launcher, out_shape: tuple[int, ...], dtype: torch.dtype, ints: tuple[int, ...]
    ):
        self.launcher, self.out_shape, self.dtype, self.ints = launcher, out_shape, dtype, ints

    def __call__(self, W: torch.Tensor, scale: torch.Tensor, device: torch.device) -> torch.Tensor:
        out = torch.empty(self.out_shape, dtype=self.dtype, device=device)
        # W's float8 dtype or its uint8 view: the launcher passes the pointer
        self.launcher(device.index, W, scale, out, *self.ints)
        return out


def dequantize_fp8_triton(
    W: torch.Tensor,
    scale: torch.Tensor,
    *,
    block: tuple[int, int],
    grid_shape: tuple[int, int],
    dtype: torch.dtype,
    transpose: bool,
    plan_key: tuple[Any, ...] | None = None,
    wait: bool = True,
) -> torch.Tensor:
    """FP8 ``W`` (float8_e4m3fn or float8_e5m2; 2-D, or any shape with a one-element scale) times its
    tiled scales, in one pass. With ``plan_key``, the launch is remembered under it (``_plans``). ``wait``:
    as in :func:`dequantize_4bit_triton`."""
    W = W.contiguous()
    scale = scale.contiguous()
    rows, cols = (W.shape[0], W.shape[1]) if W.dim() == 2 else (1, W.numel())
    bo, bi = block if W.dim() == 2 else (1, max(cols, 1))
    if scale.numel() == 1:
        bo, bi = max(rows, 1), max(cols, 1)
    out_shape = (cols, rows) if transpose else tuple(W.shape)
    out = torch.empty(out_shape, dtype=dtype, device=W.device)
    tile = FP8_T_TILE if transpose else FP8_TILE
    scale_cols = grid_shape[1] if scale.numel() != 1 else 1
    if bo % tile[0] == 0 and bi % tile[1] == 0:
        mode = 0  # each program inside one scale block
    elif bi >= cols:
        mode = 1  # per-row (or per-tensor) scales
    else:
        mode = 2
    grid = (_cdiv(rows, tile[0]), _cdiv(cols, tile[1]))
    ints = (rows, cols, scale_cols, bo, bi)
    launcher = launch(
        fp8_kernel, grid, W.view(torch.uint8), scale, out, *ints,
        E5M2=W.dtype == torch.float8_e5m2, TRANSPOSE=transpose, SCALE_MODE=mode, TILE_R=tile[0], TILE_C=tile[1],
        SOFT=_soft(W.device), num_warps=FP8_T_WARPS if transpose else FP8_WARPS, wait=wait,
    )  # fmt: skip
    if plan_key is not None and launcher is not None:
        remember(FP8_PLANS, plan_key, FP8Plan(launcher, out_shape, dtype, ints))
    return out
