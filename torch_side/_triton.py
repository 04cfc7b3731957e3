"""Launchers for the Triton kernels in ``torch_side.kernels``: shapes, tiles, grids and output buffers.

Inputs arrive checked by ``_nf4`` / ``_fp8``. Kernels run on the current stream of the tensors' device (on
CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._backend import triton_interpreting
from ._compile import Addresses, KernelNotReady, StandIn, ask
from ._launch import Launcher, launch
from ._plans import FP8_PLANS, NF4_PLANS, remember
from .kernels._fp8 import fp8_group_kernel, fp8_kernel
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


def _nf4_spec(
    shape: tuple[int, ...],
    blocksize: int,
    transpose: bool,
    nested: bool,
    nested_blocksize: int,
    offset_tensor: bool,
    device: torch.device,
) -> tuple[Any, tuple[int, ...], tuple[int, ...], dict[str, Any]]:
    """The kernel for one 4-bit weight, its grid, integer arguments and constexpr arguments."""
    meta: dict[str, Any] = dict(
        NESTED=nested,
        NESTED_BLOCKSIZE=nested_blocksize,
        OFFSET_TENSOR=offset_tensor,
        SOFT=_soft(device),
        enable_fp_fusion=False,
    )
    if transpose and shape[1] % 2 == 0:
        rows, cols = shape
        tile_r, tile_b = NF4_T_TILE
        row_scale = cols % blocksize == 0 and (blocksize // 2) % tile_b == 0
        meta.update(
            BLOCKSIZE=blocksize, ROW_SCALE=row_scale, TILE_R=tile_r, TILE_B=tile_b, num_warps=NF4_T_WARPS
        )
        grid = (_cdiv(rows, tile_r), _cdiv(cols // 2, tile_b))
        return nf4_transposed_kernel, grid, (rows, cols), meta
    if transpose:
        rows, cols = shape
        meta.update(
            BLOCKSIZE=blocksize, TILE_R=NF4_T_ANY_TILE[0], TILE_C=NF4_T_ANY_TILE[1], num_warps=NF4_T_WARPS
        )
        grid = (_cdiv(rows, NF4_T_ANY_TILE[0]), _cdiv(cols, NF4_T_ANY_TILE[1]))
        return nf4_transposed_any_kernel, grid, (rows, cols), meta
    n = math.prod(shape)
    n_bytes = (n + 1) // 2
    bytes_per_block = blocksize // 2
    cols = min(bytes_per_block, NF4_ROWS_BLOCK)  # each row of a program's tile inside one block
    meta.update(
        BYTES_PER_BLOCK=bytes_per_block, ROWS=NF4_ROWS_BLOCK // cols, COLS=cols, num_warps=NF4_ROWS_WARPS
    )
    return nf4_rows_kernel, (_cdiv(n_bytes, NF4_ROWS_BLOCK),), (n_bytes, n), meta


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
    kernel, grid, ints, meta = _nf4_spec(
        shape, blocksize, transpose, nested, nested_blocksize, isinstance(extra[2], torch.Tensor), device
    )
    launcher = launch(kernel, grid, flat, absmax, pairs, buf, *extra, *ints, wait=wait, **meta)
    if plan_key is not None and launcher is not None and copy_to is None:  # out, when given, is buf
        remember(NF4_PLANS, plan_key, NF4Plan(launcher, result_shape, dtype, ints, pairs, nested))
    return copy_to.copy_(buf) if copy_to is not None else buf


class FP8Plan:
    """A checked FP8 call: allocate the output and launch (see ``_plans``)."""

    __slots__ = ("dtype", "group", "ints", "launcher", "out_shape")

    def __init__(
        self,
        launcher: Launcher,
        out_shape: tuple[int, ...],
        dtype: torch.dtype,
        ints: tuple[int, ...],
        group: dict[str, Any],
    ):
        self.launcher, self.out_shape, self.dtype, self.ints = launcher, out_shape, dtype, ints
        self.group = group  # the keyword arguments of dequantize_fp8_group for weights of this plan

    def __call__(self, W: torch.Tensor, scale: torch.Tensor, device: torch.device) -> torch.Tensor:
        out = torch.empty(self.out_shape, dtype=self.dtype, device=device)
        # W's float8 dtype or its uint8 view: the launcher passes the pointer
        self.launcher(device.index, W, scale, out, *self.ints)
        return out


def _fp8_spec(
    W: torch.Tensor, one_scale: bool, block: tuple[int, int], grid_shape: tuple[int, int], transpose: bool
) -> tuple[tuple[int, ...], tuple[int, ...], dict[str, Any], tuple[int, ...]]:
    """Grid, integer arguments, constexpr arguments and output shape of the FP8 kernel for ``W``."""
    rows, cols = (W.shape[0], W.shape[1]) if W.dim() == 2 else (1, W.numel())
    bo, bi = block if W.dim() == 2 else (1, max(cols, 1))
    if one_scale:
        bo, bi = max(rows, 1), max(cols, 1)
    tile = FP8_T_TILE if transpose else FP8_TILE
    scale_cols = grid_shape[1] if not one_scale else 1
    if bo % tile[0] == 0 and bi % tile[1] == 0:
        mode = 0  # each program inside one scale block
    elif bi >= cols:
        mode = 1  # per-row (or per-tensor) scales
    else:
        mode = 2
    meta = dict(
        E5M2=W.dtype == torch.float8_e5m2, TRANSPOSE=transpose, SCALE_MODE=mode, TILE_R=tile[0], TILE_C=tile[1],
        SOFT=_soft(W.device), num_warps=FP8_T_WARPS if transpose else FP8_WARPS,
    )  # fmt: skip
    out_shape = (cols, rows) if transpose else tuple(W.shape)
    return (_cdiv(rows, tile[0]), _cdiv(cols, tile[1])), (rows, cols, scale_cols, bo, bi), meta, out_shape


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
    grid, ints, meta, out_shape = _fp8_spec(W, scale.numel() == 1, block, grid_shape, transpose)
    out = torch.empty(out_shape, dtype=dtype, device=W.device)
    try:
        launcher = launch(fp8_kernel, grid, W.view(torch.uint8), scale, out, *ints, wait=wait, **meta)
    except KernelNotReady:
        if plan_key is not None:  # weights of a planned kind come many at a time: their grouped kernel too
            grouped = (StandIn(torch.uint8, True), StandIn(scale.dtype, True), StandIn(dtype, True),
                       StandIn(torch.int64, True), *ints)  # fmt: skip
            ask(fp8_group_kernel, grouped, meta, W.device.index)
        raise
    if plan_key is not None and launcher is not None:
        group = dict(block=block, grid_shape=grid_shape, dtype=dtype, transpose=transpose)
        remember(FP8_PLANS, plan_key, FP8Plan(launcher, out_shape, dtype, ints, group))
    return out


MAX_GROUP = 65535  # weights per grouped launch (CUDA's limit on grid axis 2)


def _members(columns: Sequence[Sequence[Any] | torch.Tensor | Addresses]) -> list[torch.Tensor] | None:
    """Per launch of at most :data:`MAX_GROUP` weights, an int64 ``[n, k]`` table of each weight's element
    offsets from the launch's first weight, one column per pointer argument; None when a tensor is not
    contiguous or not 16-byte aligned (the grouped kernel reads each tensor as contiguous, and tells the
    compiler the offsets are multiples of 16 bytes).

    A column is a sequence of tensors (or addresses), an :class:`Addresses`, or one tensor ``[n, ...]`` whose
    rows are the weights' tensors: their offsets are then multiples of its first stride, with no tensor made
    per row.

    Raises:
        ValueError: a column holds another number of tensors than the first.
    """
    first = columns[0]  # tensors: the device to launch on
    device = first.device if isinstance(first, torch.Tensor) else first[0].device  # type: ignore[union-attr]
    n = len(first)
    offsets: list[np.ndarray] = []  # each column's element offsets from its first tensor, int64 [n]
    for k, column in enumerate(columns):
        if len(column) != n:
            raise ValueError(f"{len(column)} tensors in argument {k} of a group of {n}: one per weight")
        if isinstance(column, torch.Tensor):
            size = column.element_size()
            step = column.stride(0) * size
            if column.data_ptr() % 16 or step % 16 or not column[0].is_contiguous():
                return None
            offsets.append(np.arange(n, dtype=np.int64) * (step // size))
            continue
        if isinstance(column, Addresses):
            size = column.element_size()
            ptrs = np.asarray(column.addresses, dtype=np.int64)
        else:
            if not all(t.is_contiguous() for t in column if isinstance(t, torch.Tensor)):
                return None
            size = column[0].element_size()
            ptrs = np.fromiter((t.data_ptr() for t in column), dtype=np.int64, count=n)
        if (ptrs % 16).any():
            return None
        offsets.append((ptrs - ptrs[0]) // size)  # multiples of 16 bytes: whole elements
    table = np.stack(offsets, axis=1)
    tables = []
    for start in range(0, n, MAX_GROUP):
        rows = table[start : min(n, start + MAX_GROUP)]
        tables.append(torch.from_numpy(rows - rows[0]).to(device, non_blocking=True))
    return tables


def _check_outs(
    outs: list[Any] | Addresses, n: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> None:
    """Outputs given to a grouped launch: one per weight, each of the output's dtype, and each tensor
    contiguous, of the output's shape, on the weights' device (an address cannot be checked further)."""
    if len(outs) != n:
        raise ValueError(f"{len(outs)} outputs for {n} weights: one output per weight")
    if isinstance(outs, Addresses):  # addresses of one dtype: nothing more to check
        if outs.dtype != dtype:
            raise ValueError(f"the outputs' addresses are of {outs.dtype}; the outputs are {dtype}")
        return
    for i, out in enumerate(outs):
        if out.dtype != dtype:
            raise ValueError(f"outs[{i}] is {out.dtype}; the outputs are {dtype}")
        if isinstance(out, torch.Tensor) and (
            tuple(out.shape) != shape or not out.is_contiguous() or out.device != device
        ):
            raise ValueError(
                f"outs[{i}] must be a contiguous {shape} tensor on {device}, got "
                f"{tuple(out.shape)} on {out.device}" + ("" if out.is_contiguous() else ", not contiguous")
            )


def dequantize_fp8_group(
    Ws: Sequence[torch.Tensor] | torch.Tensor,
    scales: Sequence[torch.Tensor] | torch.Tensor,
    *,
    block: tuple[int, int],
    grid_shape: tuple[int, int],
    dtype: torch.dtype,
    transpose: bool,
    wait: bool = True,
    outs: Sequence[Any] | Addresses | None = None,
) -> Sequence[Any] | Addresses | None:
    """:func:`dequantize_fp8_triton` of many contiguous weights of one shape, float8 dtype and scale layout
    (scales contiguous, of one shape and dtype) in one launch per :data:`MAX_GROUP`; the same bits.

    ``Ws`` and ``scales`` are each a sequence of tensors, or one tensor ``[n, ...]`` whose rows are the
    weights (or their scales), each row contiguous: then no tensor is made per weight.

    ``outs``: where to write, one per weight (tensors, ``_compile.Address`` of memory torch does not hold,
    or one ``_compile.Addresses`` of them all), each contiguous of the output's shape and ``dtype`` on the
    weights' device; default: new tensors.

    Returns the outputs, or None (nothing launched) when a pointer is not 16-byte aligned or a weight or
    scale is not contiguous.

    Raises:
        KernelNotReady: as in :func:`dequantize_4bit_triton` (nothing launched).
        ValueError: ``scales`` or ``outs`` is not one per weight, or ``outs`` are not of the output's dtype
            (and, for tensors, shape, contiguity and device); nothing launched.
    """
    W0 = Ws[0]
    grid, ints, meta, out_shape = _fp8_spec(W0, scales[0].numel() == 1, block, grid_shape, transpose)
    if outs is None:
        outs = [torch.empty(out_shape, dtype=dtype, device=W0.device) for _ in range(len(Ws))]
    else:
        outs = outs if isinstance(outs, Addresses) else list(outs)
        _check_outs(outs, len(Ws), out_shape, dtype, W0.device)
    raw = Ws.view(torch.uint8) if isinstance(Ws, torch.Tensor) else [W.view(torch.uint8) for W in Ws]
    tables = _members([raw, scales, outs])
    if tables is None:
        return None
    for k, table in enumerate(tables):
        first = k * MAX_GROUP
        launch(
            fp8_group_kernel, (*grid, table.shape[0]), raw[first], scales[first], outs[first], table, *ints,
            wait=wait or k > 0, **meta,
        )  # fmt: skip
    return outs
