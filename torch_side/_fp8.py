"""FP8 dequantization with per-tensor, per-row or block scales (DeepSeek-V3, Qwen-FP8, HF "fp8").

The format: ``W`` float8 ``[out, in]`` and a float32 ``scale_inv`` that multiplies it. Block scales have
shape ``[ceil(out / bo), ceil(in / bi)]`` (``bo = bi = 128`` in the checkpoints seen so far); the last block
row and column may be partial, as in DeepSeek-V3's 576x7168 ``kv_a_proj_with_mqa`` with scales 5x56. The
value is ``float32(W) * scale_inv[block]`` rounded once to the output dtype, as in DeepSeek's and
transformers' references.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.autograd.forward_ad as fwad

from ._backend import choose_fp8_backend
from ._checks import CPU as _CPU
from ._checks import (
    BlockSizeUnknown,
    as_list,
    numbered,
    on_device,
    out_dtype,
    plain,
    require_tensor,
    resolved,
    same_device,
    tracing,
)
from ._checks import check_finite as _check_finite
from ._checks import functorch_wrapped as _functorch_wrapped
from ._compile import Addresses, KernelNotReady, kernels_imported
from ._integers import block_pair as _block_pair
from ._native import CPU_KINDS, cpu_fp8, readable, transposes_well
from ._plans import FP8_CPU_PLANS, FP8_PLANS, remember, tensor_key

FP8_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
# float8_e8m0fnu: power-of-two block scales (MX formats, some FP8 releases), widened to float32 exactly
SCALE_DTYPES = tuple(
    getattr(torch, n) for n in ("float32", "bfloat16", "float16", "float8_e8m0fnu") if hasattr(torch, n)
)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_scale_dtype(dtype: torch.dtype) -> None:
    """Raises TypeError (naming the argument ``scale_inv``) where no decode takes scales of ``dtype``."""
    if dtype not in SCALE_DTYPES:
        raise TypeError(f"scale_inv must be float32, bfloat16, float16 or float8_e8m0fnu, got {dtype}")


DEFAULT_BLOCK = 128
GROUP_CHUNK = 32  # weights per grouped launch of the many-weights functions (launched as soon as gathered)


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


def _fitting_blocks(n: int, s: int) -> tuple[int, float]:
    """The range [lo, hi] of block sizes b with ceil(n / b) == s (hi may be infinite)."""
    if s <= 0:
        return (1, 0)  # empty range
    lo = _ceil_div(n, s)
    hi = math.inf if s == 1 else _ceil_div(n, s - 1) - 1
    return (lo, hi)


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
        ValueError: the shapes do not fit together, or several block sizes fit and they tile differently.
    """
    weight_shape, scale_shape = tuple(weight_shape), tuple(scale_shape)
    if block_size is not None:  # checked whatever the scale's shape (one scale ignores it)
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
        raise BlockSizeUnknown(
            f"scale_inv has shape {scale_shape}, which fits no square block of a [{rows}, {cols}] weight "
            f"(block 128 needs {grid128})",
            "pass block_size=(rows_per_block, cols_per_block) if the blocks are not square",
        )
    if lo != hi:
        top = "any larger" if hi == math.inf else int(hi)
        raise BlockSizeUnknown(
            f"scale_inv has shape {scale_shape}: square blocks from {lo} to {top} all fit a [{rows}, {cols}] "
            "weight and cut it differently",
            "pass block_size= (the checkpoint's quantization_config.weight_block_size)",
        )
    return ScaleLayout("block", (lo, lo), scale_shape)


@functools.lru_cache(maxsize=4096)
def _layout(
    weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], block_size: int | tuple[int, int] | None
) -> ScaleLayout:
    """:func:`fp8_scale_layout`, remembered per shape pair (a checkpoint has few distinct ones)."""
    return fp8_scale_layout(weight_shape, scale_shape, block_size)


def dequantize_fp8_reference(
    W: torch.Tensor, scale: torch.Tensor, layout: ScaleLayout, dtype: torch.dtype
) -> torch.Tensor:
    """Plain-torch FP8 decode: ``float32(W) * float32(scale[tile])``, one rounding to ``dtype``.

    The oracle for the other backends. Returns a new tensor of ``W``'s shape.
    """
    if layout.stack:  # one matrix at a time: no tile crosses from one expert to the next
        matrix = layout._replace(stack=())
        per = scale.reshape(*layout.stack, *layout.matrix_scale_shape)
        return torch.stack([dequantize_fp8_reference(W[e], per[e], matrix, dtype) for e in range(W.shape[0])])
    wf = W.to(torch.float32)
    s = scale.to(torch.float32)
    if layout.kind == "tensor":
        return (wf * s.reshape(())).to(dtype)
    rows, cols = W.shape
    (bo, bi), (so, si) = layout.block, layout.grid
    s = s.reshape(so, si)
    if rows % bo == 0 and cols % bi == 0:
        return (wf.view(so, bo, si, bi) * s[:, None, :, None]).view(rows, cols).to(dtype)
    expanded = s.repeat_interleave(bo, dim=0)[:rows].repeat_interleave(bi, dim=1)[:, :cols]
    return (wf * expanded).to(dtype)


# elements from which float8_e5m2 takes the C kernel; measured on a 2-core x86-64 machine (AVX-512),
# benchmarks/cpu_decode.py
E5M2_NATIVE_FROM = 1 << 20


@functools.cache
def _byte_values(dtype: torch.dtype) -> torch.Tensor:
    """The float32 value torch gives each of the 256 bytes of a float8 ``dtype``: the C kernel's table."""
    return torch.arange(256, dtype=torch.uint8, device="cpu").view(dtype).to(torch.float32)


def dequantize_fp8_native(
    W: torch.Tensor, scale: torch.Tensor, layout: ScaleLayout, dtype: torch.dtype, transpose: bool = False
) -> torch.Tensor | None:
    """:func:`dequantize_fp8_reference`'s values, bit for bit, from the C kernel (``_native``) on the CPU:
    each byte's float32 value from a table, times its tile's float32 scale, rounded once to ``dtype``.

    Returns a new tensor of ``W``'s shape, or with ``transpose`` (a 2-D ``W``) a new contiguous tensor of its
    transpose, written transposed in the same pass; or None when the kernel is not built yet (or cannot be
    had) or a piece is not as it reads it (CPU, contiguous, no lazy negation, one matrix): the caller takes
    the torch path.
    """
    fn = cpu_fp8()
    kind = CPU_KINDS.get(dtype)
    if fn is None or kind is None or layout.stack or not W.numel():
        return None
    if W.dtype == torch.float8_e5m2 and W.numel() < E5M2_NATIVE_FROM:
        return None  # torch widens e5m2 (a float16's high byte) about as fast as the table below this size
    if W.dtype not in FP8_DTYPES or scale.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if not readable(W, scale):  # the torch path carries vmap, tangents and the graph to the scale
        return None
    scale = scale.to(torch.float32)  # exact: the reference widens the same way
    if layout.kind == "tensor":  # any shape: rows of its last dimension (split over threads), one scale
        if scale.numel() != 1:
            return None
    elif W.dim() != 2 or scale.numel() != layout.grid[0] * layout.grid[1] or min(layout.block) < 1:
        return None
    if transpose and W.dim() != 2:
        return None
    shape = (W.shape[1], W.shape[0]) if transpose else W.shape
    out = torch.empty(shape, dtype=dtype, device="cpu")  # not the default device: the kernel writes here
    table = _byte_values(W.dtype)  # held through the call (another thread may replace the cached one)
    fn(W.view(torch.uint8).data_ptr(), table.data_ptr(), scale.data_ptr(), *_native_args(W, layout), out.data_ptr(),
       kind, torch.get_num_threads(), int(transpose))  # fmt: skip
    return out


def _exact_block_size(block_size: Any) -> bool:
    """Whether ``block_size`` is None, an int or a tuple of ints, exactly: 128.0 hashes as 128 does, so
    only exact ints may skip the checks a plan's key stands for."""
    return (
        block_size is None
        or type(block_size) is int
        or (type(block_size) is tuple and all(type(b) is int for b in block_size))
    )


def _plan_key(
    W: Any, scale_inv: Any, dtype: Any, block_size: Any, transpose: Any, backend: Any, check_finite: Any
) -> tuple[Any, ...] | None:
    """The key of this call's plan (``_plans``), or None when it cannot have one (CPU tensors, a number
    as the scale, ``check_finite``, an unhashable argument, a call ``torch.compile`` traces)."""
    if (
        check_finite
        or tracing()
        or not isinstance(W, torch.Tensor)
        or not isinstance(scale_inv, torch.Tensor)
        or not W.is_cuda
        or W.is_neg()
        or scale_inv.is_neg()  # a lazy negation: the pointer holds other values (resolved by the full path)
    ):
        return None
    if not _exact_block_size(block_size):
        return None
    try:
        key = (tensor_key(W), tensor_key(scale_inv), dtype, block_size, transpose, backend)
        hash(key)
    except TypeError:  # an unhashable argument (a block_size list): no plan
        return None
    return key


def _cpu_plan_key(
    W: torch.Tensor,
    scale_inv: Any,
    dtype: Any,
    block_size: Any,
    transpose: Any,
    backend: Any,
    check_finite: Any,
) -> tuple[Any, ...] | None:
    """The key of a CPU call's plan (``_plans.FP8_CPU_PLANS``), or None when it cannot have one: a number as
    the scale, ``check_finite``, a backend other than ``"auto"``, a call ``torch.compile`` traces, forward-mode
    AD, a piece that is lazily negated, wrapped by a functorch transform or in need of a graph (the torch
    path carries those), an unhashable argument."""
    if check_finite or backend != "auto" or not isinstance(scale_inv, torch.Tensor) or not scale_inv.is_cpu:
        return None
    if not _exact_block_size(block_size):
        return None
    if tracing() or fwad._current_level >= 0:
        return None
    grad = torch.is_grad_enabled()
    for t in (W, scale_inv):
        if _functorch_wrapped(t) or t.is_neg() or t.is_conj() or (grad and t.requires_grad):
            return None
    try:
        key = (tensor_key(W), tensor_key(scale_inv), dtype, block_size, transpose)
        hash(key)
    except TypeError:  # an unhashable argument (a block_size list): no plan
        return None
    return key


class FP8CpuPlan:
    """A checked FP8 call on the CPU through the C kernel (``_plans``): allocate the output and call, with the
    arguments :func:`dequantize_fp8_native` computed for the call that made the plan."""

    __slots__ = ("args", "dtype", "fn", "kind", "out_size", "table", "transpose", "transposed_view")

    def __init__(
        self, W: torch.Tensor, layout: ScaleLayout, dtype: torch.dtype, transpose: bool, written_t: bool
    ) -> None:
        self.fn, self.table, self.dtype, self.kind = cpu_fp8(), _byte_values(W.dtype), dtype, CPU_KINDS[dtype]
        self.args = _native_args(W, layout)
        self.transpose = int(written_t)  # the kernel writes the transpose itself
        self.transposed_view = transpose and not written_t
        out_shape = (W.shape[1], W.shape[0]) if written_t else tuple(W.shape)
        self.out_size = out_shape if out_shape else ((),)  # torch.empty(*sizes): 0.3 us less than a tuple

    def __call__(self, W: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if scale.dtype != torch.float32:
            scale = scale.to(torch.float32)  # exact: the reference widens the same way
        out = torch.empty(*self.out_size, dtype=self.dtype, device=_CPU)  # not the default device
        self.fn(W.data_ptr(), self.table.data_ptr(), scale.data_ptr(), *self.args, out.data_ptr(), self.kind,
                torch.get_num_threads(), self.transpose)  # fmt: skip
        return out.t() if self.transposed_view else out


class FP8TorchPlan:
    """A checked FP8 call on the CPU that takes the torch path by choice (float8_e5m2 under
    ``E5M2_NATIVE_FROM`` elements, which torch widens as fast as the C kernel's table): the reference's
    operations without the checks before them."""

    __slots__ = ("dtype", "layout", "transpose")

    def __init__(self, layout: ScaleLayout, dtype: torch.dtype, transpose: bool) -> None:
        self.layout, self.dtype, self.transpose = layout, dtype, transpose

    def __call__(self, W: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        result = dequantize_fp8_reference(W, scale, self.layout, self.dtype)
        return result.t() if self.transpose else result


def _native_args(W: torch.Tensor, layout: ScaleLayout) -> tuple[int, int, int, int, int]:
    """The C kernel's ``rows, cols, block_rows, block_cols, scale_cols`` for ``W`` (a per-tensor scale: rows
    of ``W``'s last dimension, any shape)."""
    if layout.kind == "tensor":
        cols = W.shape[-1] if W.dim() else 1
        return W.numel() // cols, cols, W.numel() // cols, cols, 1
    (rows, cols), (block_rows, block_cols) = W.shape, layout.block
    return rows, cols, block_rows, block_cols, layout.grid[1]


def dequantize_fp8(
    W: torch.Tensor,
    scale_inv: torch.Tensor | float,
    dtype: torch.dtype = torch.bfloat16,
    *,
    block_size: int | tuple[int, int] | None = None,
    transpose: bool = False,
    backend: str = "auto",
    check_finite: bool = False,
) -> torch.Tensor:
    """Dequantizes an FP8 weight with per-tensor, per-row or block scales.

    Args:
        W: float8_e4m3fn or float8_e5m2 weight, ``[out, in]``, or stacked ``[experts, out, in]`` (any shape
            with a per-tensor scale).
        scale_inv: the multiplier (a checkpoint's ``weight_scale_inv``, or ``weight_scale`` where that
            multiplies): per block ``[ceil(out / b), ceil(in / b)]``, per row ``[out, 1]``, or one element
            (stacked weights: ``[experts, ...]`` of those, or ``[experts]``). float32 (bfloat16, float16 and
            float8_e8m0fnu are widened exactly).
        dtype: bfloat16 (default), float16 or float32 (a torch.dtype, or its name: ``"bfloat16"``).
        block_size: the block edge, or ``(rows, cols)`` for non-square blocks. Default: 128 if the scale
            shape agrees with 128, else the single square block size consistent with both shapes.
        transpose: return the ``[in, out]`` transpose (``[experts, in, out]`` for a 3-D weight, stacked, with one
            scale per expert or one for all): written transposed
            in the same pass by the Triton backend and by qbridge's CPU kernel (where that beats copying:
            ``_native.transposes_well``), else a transposed view of the row-major result.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``. ``"auto"``: Triton on CUDA; on the CPU qbridge's C
            kernel (``torch_side/_native.py``; the torch path's bits) once it is built, except float8_e5m2
            weights under ``E5M2_NATIVE_FROM`` elements, and the torch path until then.
        check_finite: raise ValueError if a scale is NaN or Inf (a host sync on a GPU). By default they
            propagate, as in the reference.

    Returns:
        A new tensor of ``W``'s shape (its transpose with ``transpose``) and ``dtype`` on ``W``'s device,
        computed on that device's current stream. Never aliases ``W``.

    Raises:
        TypeError: ``W`` is not float8 (uint8 bytes must be viewed back with ``W.view(torch.float8_e4m3fn)``),
            or the scale or output dtype is unsupported.
        ValueError: the scale shape does not fit ``W``, or several block sizes fit ambiguously; tensors on
            different devices; non-finite scales with ``check_finite``.

    Example:
        >>> w = torch.randn(576, 7168).to(torch.float8_e4m3fn); s = torch.rand(5, 56)
        >>> torch_side.dequantize_fp8(w, s).shape
        torch.Size([576, 7168])
    """
    if type(dtype) is not torch.dtype:
        dtype = out_dtype(dtype)
    plan_key = _plan_key(W, scale_inv, dtype, block_size, transpose, backend, check_finite)
    cpu_key = None
    if plan_key is not None:
        plan = FP8_PLANS.get(plan_key)
        if plan is not None and W.device.index == torch.cuda.current_device():
            return plan(plain(W), plain(scale_inv), W.device)  # type: ignore[arg-type]  # a key: a tensor
    elif isinstance(W, torch.Tensor) and W.is_cpu:
        cpu_key = _cpu_plan_key(W, scale_inv, dtype, block_size, transpose, backend, check_finite)
        if cpu_key is not None:
            cpu_plan = FP8_CPU_PLANS.get(cpu_key)
            if cpu_plan is not None:
                return cpu_plan(plain(W), plain(scale_inv))  # type: ignore[arg-type]  # a key: a tensor
    W = resolved(plain(require_tensor(W, "W")))
    if W.dtype not in FP8_DTYPES:
        hint = ""
        if W.dtype == torch.uint8:
            hint = " If these are FP8 bytes, view them back: W.view(torch.float8_e4m3fn)."
        raise TypeError(
            f"dequantize_fp8 takes a float8 weight ({', '.join(map(str, FP8_DTYPES))}), got {W.dtype}.{hint}"
        )
    if not isinstance(scale_inv, torch.Tensor):
        if hasattr(scale_inv, "__array__") and not isinstance(scale_inv, numbers.Real):  # 0-d numpy or JAX
            held = np.asarray(scale_inv)
            if held.ndim == 0 and held.dtype.kind not in "bcUSOM":  # not bool, complex, text, objects, times
                try:  # numeric kinds, and bfloat16/float8 (numpy sees those as kind "V")
                    scale_inv = float(held)
                except (TypeError, ValueError):
                    pass
        if isinstance(scale_inv, bool) or not isinstance(scale_inv, numbers.Real):  # numpy scalars are Real
            raise TypeError(
                f"scale_inv must be a tensor or a real number, got {type(scale_inv).__name__} {scale_inv!r}"
            )
        scale_inv = torch.tensor(float(scale_inv), dtype=torch.float32, device=W.device)
    scale_inv = resolved(plain(scale_inv))
    check_scale_dtype(scale_inv.dtype)
    if dtype not in OUT_DTYPES:
        raise TypeError(
            f"output dtype must be bfloat16, float16 or float32 (a torch.dtype or its name), got {dtype!r}"
        )
    same_device(W.device, scale_inv=scale_inv)
    if block_size is not None:  # checked before the remembered layouts (128.0 hashes as 128 does)
        block_size = _block_pair(block_size)
    try:
        layout = _layout(W.shape, scale_inv.shape, block_size)
    except TypeError:  # an unhashable block_size (a list): the same rules, not remembered
        layout = fp8_scale_layout(tuple(W.shape), tuple(scale_inv.shape), block_size)
    if transpose and W.dim() == 3 and layout.kind == "tensor" and not layout.stack:
        # one scale for a stacked [experts, out, in] weight: the same decode as that scale for each expert
        scale_inv = scale_inv.reshape(1).expand(W.shape[0]).contiguous()
        layout = _layout(tuple(W.shape[1:]), (1, 1), None)._replace(stack=tuple(W.shape[:1]))
    if transpose and W.dim() != 2 + len(layout.stack):
        raise ValueError(
            f"transpose=True needs a 2-D weight (or a stacked [experts, out, in] one), got shape {tuple(W.shape)}"
        )
    if check_finite:
        _check_finite(scale_inv, "scale_inv")
    if scale_inv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        scale_inv = scale_inv.to(torch.float32)  # power-of-two e8m0 scales: exact
        plan_key = cpu_key = None
    chosen = choose_fp8_backend(W.device, backend, W.dtype)
    if (
        layout.stack
        or W.device.type != "cuda"
        or W.device.index != torch.cuda.current_device()
        or not (W.is_contiguous() and scale_inv.is_contiguous())  # the kernel reads them where they lie
    ):
        plan_key = None
    with on_device(W.device):
        if layout.stack:  # one matrix at a time: no tile crosses from one expert to the next
            matrix = layout._replace(stack=())
            per = scale_inv.reshape(*layout.stack, *layout.matrix_scale_shape)
            return torch.stack(
                [
                    _decode_matrix(
                        W[e],
                        per[e],
                        matrix,
                        dtype,
                        transpose,
                        chosen,
                        wait=backend == "triton",
                        native=backend == "auto",
                    )
                    for e in range(W.shape[0])
                ]
            )
        return _decode_matrix(
            W, scale_inv, layout, dtype, transpose, chosen, plan_key, wait=backend == "triton",
            native=backend == "auto", cpu_key=cpu_key,
        )  # fmt: skip


def _decode_matrix(
    W: torch.Tensor,
    scale: torch.Tensor,
    layout: ScaleLayout,
    dtype: torch.dtype,
    transpose: bool,
    chosen: str,
    plan_key: tuple[Any, ...] | None = None,
    wait: bool = True,
    native: bool = False,
    cpu_key: tuple[Any, ...] | None = None,
) -> torch.Tensor:
    if native and W.device.type == "cpu":
        # the kernel writes the transpose itself where that beats a transposed view of its row-major result
        written_t = transpose and W.dim() == 2 and transposes_well(W.shape[0], W.shape[1], nibbles=False)
        decoded = dequantize_fp8_native(W, scale, layout, dtype, written_t)
        if decoded is not None:
            if cpu_key is not None:  # the next call of this kind calls the kernel straight away
                remember(FP8_CPU_PLANS, cpu_key, FP8CpuPlan(W, layout, dtype, transpose, written_t))
            return decoded.t() if transpose and not written_t else decoded
        if (
            cpu_key is not None
            and W.dtype == torch.float8_e5m2
            and 0 < W.numel() < E5M2_NATIVE_FROM
            and not layout.stack
            and cpu_fp8() is not None  # the torch path by choice, not while the kernel is being built
        ):
            remember(FP8_CPU_PLANS, cpu_key, FP8TorchPlan(layout, dtype, transpose))
    if W.numel() == 0:
        result = torch.empty(W.shape, dtype=dtype, device=W.device)
    elif chosen == "triton":
        try:
            kernels_imported(wait)
            from ._triton import dequantize_fp8_triton

            return dequantize_fp8_triton(
                W, scale, block=layout.block, grid_shape=layout.grid, dtype=dtype, transpose=transpose,
                plan_key=plan_key, wait=wait,
            )  # fmt: skip
        except KernelNotReady:  # compiling in the background (_compile): the same bits another way
            result = dequantize_fp8_reference(W, scale, layout, dtype)
            return result.t().contiguous() if transpose else result  # the layout the kernel writes
    else:
        result = dequantize_fp8_reference(W, scale, layout, dtype)
    return result.t() if transpose else result


def dequantize_fp8_many(
    weights: Sequence[torch.Tensor],
    scale_invs: Sequence[torch.Tensor | float],
    dtype: torch.dtype = torch.bfloat16,
    *,
    block_size: int | tuple[int, int] | None = None,
    transpose: bool = False,
    backend: str = "auto",
    check_finite: bool = False,
) -> list[torch.Tensor]:
    """Dequantizes many FP8 weights: ``[dequantize_fp8(W, s, dtype, ...) for W, s in zip(weights,
    scale_invs)]``, the same values, in few launches.

    On a CUDA device, weights that share a kind with one already dequantized in this process (shape, float8
    dtype, scale shape and dtype, device, contiguity and 16-byte alignment: a model's experts, or one
    projection of every layer) are decoded together, one launch per kind, instead of one per weight. The
    first weight of each kind, and every weight elsewhere, takes :func:`dequantize_fp8`'s own path.

    Args:
        weights: float8 weights, as :func:`dequantize_fp8` takes them.
        scale_invs: their scales, one per weight.
        dtype, block_size, transpose, backend, check_finite: as in :func:`dequantize_fp8`, for every weight.

    Returns:
        A list of new tensors, one per weight, as :func:`dequantize_fp8` returns them (written on the current
        stream of their device). Never aliases an input.

    Raises:
        ValueError: ``weights`` and ``scale_invs`` differ in length; and as :func:`dequantize_fp8`, naming the
            weight's index (``weights[i]: ...``).
        TypeError: ``weights`` or ``scale_invs`` is a single tensor instead of a list (or another iterable);
            and as :func:`dequantize_fp8`, naming the weight's index.
    """
    if type(dtype) is not torch.dtype:
        dtype = out_dtype(dtype)
    weights = as_list(weights, "weights")
    scale_invs = as_list(scale_invs, "scale_invs")
    if len(weights) != len(scale_invs):
        raise ValueError(f"got {len(weights)} weights and {len(scale_invs)} scale_invs: one scale per weight")
    results: list[torch.Tensor | None] = [None] * len(weights)
    kinds: dict[tuple[Any, ...], list[int]] = {}

    def flush(key: tuple[Any, ...]) -> None:
        members = kinds.pop(key)
        plan = FP8_PLANS.get(key)
        Ws = [plain(weights[i]) for i in members]
        scales = [plain(scale_invs[i]) for i in members]  # tensors: they have a plan
        outs = None
        if plan is not None and len(members) > 1:
            from ._triton import dequantize_fp8_group

            try:
                outs = dequantize_fp8_group(Ws, scales, wait=backend == "triton", **plan.group)
            except KernelNotReady:  # the grouped kernel compiles in the background: one launch per weight
                outs = None
        if outs is None:
            outs = [plan(W, s, W.device) if plan is not None else numbered(i, dequantize_fp8, W, s, dtype,
                    block_size=block_size, transpose=transpose, backend=backend)
                    for i, W, s in zip(members, Ws, scales, strict=True)]  # fmt: skip
        for i, out in zip(members, outs, strict=True):
            results[i] = out

    for i, (W, s) in enumerate(zip(weights, scale_invs, strict=True)):
        key = _plan_key(W, s, dtype, block_size, transpose, backend, check_finite)
        if key is not None and key in FP8_PLANS and W.device.index == torch.cuda.current_device():
            kinds.setdefault(key, []).append(i)
            if len(kinds[key]) == GROUP_CHUNK:  # launched now: the GPU decodes while the rest is checked
                flush(key)
        else:
            results[i] = numbered(i, dequantize_fp8, W, s, dtype, block_size=block_size, transpose=transpose,
                                  backend=backend, check_finite=check_finite)  # fmt: skip
    for key in list(kinds):
        flush(key)
    return results  # type: ignore[return-value]


def fp8_planned(
    W: torch.Tensor,
    scale_inv: torch.Tensor,
    dtype: torch.dtype,
    *,
    block_size: int | tuple[int, int] | None,
    transpose: bool,
) -> bool:
    """Whether a call of this process already checked ``dequantize_fp8(W, scale_inv, dtype, block_size=...,
    transpose=...)``'s kind of arguments (``_plans``): then :func:`dequantize_fp8_group_into` can decode
    weights of that kind without a first call."""
    key = _plan_key(W, scale_inv, dtype, block_size, transpose, "auto", False)
    return key is not None and key in FP8_PLANS


def dequantize_fp8_group_into(
    weights: Sequence[torch.Tensor] | torch.Tensor,
    scale_invs: Sequence[torch.Tensor] | torch.Tensor,
    outs: Sequence[int],
    dtype: torch.dtype,
    *,
    block_size: int | tuple[int, int] | None,
    transpose: bool,
) -> bool:
    """``dequantize_fp8(weights[i], scale_invs[i], dtype, block_size=..., transpose=...)`` written to the
    device memory at address ``outs[i]``, for every ``i``, in one launch: the same bits (qbridge's loader
    writes a checkpoint's weights straight into arrays XLA allocated).

    Every weight must be of one kind (shape, float8 dtype, contiguity; views of one ``[n, ...]`` tensor are),
    every scale too, on the current CUDA device; each address holds a contiguous output of that call's shape
    and ``dtype`` on that device, written on its current stream. ``weights`` (and ``scale_invs``) may be that
    ``[n, ...]`` tensor itself, each row contiguous, 16-byte aligned: no tensor is then made per weight.

    Returns:
        True when written; False, with nothing written, when no earlier call of this process checked a
        weight of this kind (``_plans``), the grouped kernel is still being compiled in the background, or a
        pointer is not 16-byte aligned. The caller then decodes them one by one.
    """
    W, scale = weights[0], scale_invs[0]
    key = _plan_key(W, scale, dtype, block_size, transpose, "auto", False)
    plan = FP8_PLANS.get(key) if key is not None else None
    if plan is None or W.device.index != torch.cuda.current_device():
        return False
    from ._triton import dequantize_fp8_group

    try:
        addresses = Addresses(np.asarray(outs, dtype=np.int64), dtype)
        return dequantize_fp8_group(weights, scale_invs, wait=False, outs=addresses, **plan.group) is not None
    except KernelNotReady:  # the grouped kernel compiles in the background
        return False
