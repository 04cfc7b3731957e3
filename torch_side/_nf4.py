"""bitsandbytes 4-bit (NF4 / FP4) dequantization.

The format: a weight of ``n`` elements in row-major order is cut into flat blocks of ``blocksize``
elements (the last block may be short). Element ``i`` is stored as a nibble ``q`` (the high nibble of byte
``i // 2`` when ``i`` is even) and decodes to ``code[q] * absmax[i // blocksize]``, computed in float32 and
rounded once to the output dtype. A nested (double-quant) absmax is itself stored as uint8 and decodes
to ``nested_code[a] * nested_absmax[j // nested_blocksize]`` rounded to float32, then ``+ offset``
rounded again: two roundings, no fused multiply-add. These are the semantics of bitsandbytes' CUDA
kernels and of its pure-torch reference; its native CPU kernel departs from them for some shapes on
AVX-512 CPUs, where ``backend="bnb"`` refuses them (see ``_backend.bnb_cpu_kernel_restarts_blocks``).
"""

from __future__ import annotations

import ctypes
import math
import numbers
import operator
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwad

from ._backend import choose_4bit_backend
from ._checks import CPU as _CPU
from ._checks import (
    as_list,
    numbered,
    on_device,
    out_dtype,
    plain,
    quantized_otherwise,
    raise_out_mismatch,
    require_tensor,
    resolved,
    same_device,
    tracing,
)
from ._checks import check_finite as _check_finite
from ._checks import functorch_wrapped as _functorch_wrapped
from ._codes import is_standard_code, pairs_of, standard_code, standard_pairs
from ._compile import KernelNotReady, kernels_imported
from ._integers import is_int
from ._native import (
    CPU_KINDS,
    PLAN_FIELDS,
    carries,
    cpu_4bit,
    cpu_4bit_planned,
    cpu_4bit_t,
    readable,
    transposes_well,
    wrapped,
)
from ._plans import NF4_PLANS, remember, tensor_key
from ._quant_state import BLOCKSIZES, OUT_DTYPES, PACKED_DTYPES, QUANT_TYPES, _shape, quant_state_pieces

NESTED_CODE_SIZE = 256


def _packed_bytes(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The packed weight as a flat uint8 tensor of ``ceil(n / 2)`` bytes (a view where possible)."""
    if packed.dtype not in PACKED_DTYPES:
        hint = (
            " That is FP8 data: use dequantize_fp8."
            if packed.dtype.is_floating_point and packed.itemsize == 1
            else ""
        )
        raise TypeError(
            f"packed 4-bit weight must hold its bytes as uint8 (or a bitsandbytes quant_storage dtype: "
            f"{', '.join(str(d) for d in PACKED_DTYPES)}); got {packed.dtype}.{hint}"
        )
    n = math.prod(shape)
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.contiguous().view(torch.uint8)
    need = (n + 1) // 2
    # quant_storage wider than a byte rounds the byte count up to whole storage elements.
    allowed = need if packed.dtype == torch.uint8 else -(-need // packed.itemsize) * packed.itemsize
    if flat.numel() != allowed:
        raise ValueError(
            f"packed 4-bit weight holds {flat.numel()} bytes (shape {tuple(packed.shape)}, {packed.dtype}); "
            f"a weight of shape {shape} needs {need} bytes (two 4-bit values per byte). "
            "Check that the quant state belongs to this weight"
        )
    return flat if flat.numel() == need else flat[:need]


def _check_pieces(
    flat: torch.Tensor,
    absmax: torch.Tensor,
    *,
    shape: tuple[int, ...],
    blocksize: int,
    code: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_blocksize: int,
    offset: float | torch.Tensor | None,
    quant_type: str,
    dtype: torch.dtype,
) -> None:
    where = f"4-bit weight of shape {shape}"
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must not have negative sizes, got {shape}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if (
        isinstance(blocksize, bool)
        or not isinstance(blocksize, numbers.Integral)
        or blocksize not in BLOCKSIZES
    ):
        raise ValueError(
            f"blocksize must be one of the ints {BLOCKSIZES} (what bitsandbytes writes), got {blocksize!r}"
        )
    if dtype not in OUT_DTYPES:
        raise ValueError(
            f"output dtype must be float16, bfloat16 or float32 (a torch.dtype or its name), got {dtype!r}"
        )
    n = math.prod(shape)
    nblocks = -(-n // blocksize)
    nested = nested_absmax is not None or nested_code is not None
    require_tensor(absmax, "absmax")
    if nested:
        if nested_absmax is None or nested_code is None:
            raise ValueError("a nested absmax needs both nested_absmax and nested_code")
        require_tensor(nested_absmax, "nested_absmax")
        require_tensor(nested_code, "nested_code")
        if absmax.dtype != torch.uint8:
            raise TypeError(f"{where}: a nested (double-quant) absmax is uint8, got {absmax.dtype}")
        if nested_absmax.dtype != torch.float32 or nested_code.dtype != torch.float32:
            raise TypeError(
                f"{where}: nested_absmax and nested_code must be float32, "
                f"got {nested_absmax.dtype} and {nested_code.dtype}"
            )
        if not is_int(nested_blocksize) or nested_blocksize <= 0:  # numpy's ints too, not bools
            raise ValueError(f"nested_blocksize must be a positive int, got {nested_blocksize!r}")

        def not_one_number() -> TypeError:  # made only when raised: a tensor's repr is costly
            return TypeError(
                f"{where}: offset must be one real number (a float, or a one-element tensor), got {offset!r}"
            )

        if isinstance(offset, bool):
            raise not_one_number()
        n_nested = -(-nblocks // nested_blocksize)
        if nested_absmax.numel() != n_nested:
            raise ValueError(
                f"{where}: nested_absmax has {nested_absmax.numel()} entries; {nblocks} absmax blocks in "
                f"nested blocks of {nested_blocksize} need {n_nested}"
            )
        if nested_code.numel() != NESTED_CODE_SIZE:
            raise ValueError(
                f"{where}: nested_code must have {NESTED_CODE_SIZE} entries, got {nested_code.numel()}"
            )
        if offset is None:
            raise ValueError(
                f"{where}: a nested absmax needs its offset: pass offset= (the checkpoint's nested_offset, a "
                "QuantState's .offset); every decoded scale is shifted by it"
            )
        if isinstance(offset, torch.Tensor) and offset.numel() != 1:
            raise ValueError(
                f"{where}: offset must be one number, got a tensor of shape {tuple(offset.shape)}"
            )
        if isinstance(offset, torch.Tensor) and offset.is_complex():
            raise TypeError(f"{where}: offset must be a real number, got a {offset.dtype} tensor")
        if not isinstance(offset, (torch.Tensor, numbers.Real)):  # a one-element array or list is one number
            try:
                as_tensor = torch.as_tensor(offset)
            except (TypeError, ValueError, RuntimeError, OverflowError) as e:
                raise not_one_number() from e
            if as_tensor.is_complex() or as_tensor.dtype == torch.bool:
                raise not_one_number()
            if as_tensor.numel() != 1:
                raise ValueError(
                    f"{where}: offset must be one number, got {as_tensor.numel()} values: {offset!r}"
                )
        elif isinstance(offset, numbers.Real):  # a Python or numpy number (a tensor is none)
            try:
                float(offset)
            except OverflowError as e:
                shown = r if len(r := repr(offset)) <= 40 else r[:37] + "..."
                raise ValueError(f"{where}: offset {shown} is beyond the range of a float") from e
    elif absmax.dtype == torch.uint8:
        raise TypeError(
            f"{where}: absmax is uint8, which is a nested (double-quant) absmax: pass nested_absmax, "
            "nested_code and offset (the checkpoint's .nested_absmax, .nested_quant_map and nested_offset)"
        )
    elif absmax.dtype != torch.float32:
        raise TypeError(f"{where}: absmax must be float32 (or uint8 when nested), got {absmax.dtype}")
    if absmax.numel() != nblocks:
        raise ValueError(
            f"{where}: absmax has {absmax.numel()} entries; {n} elements in blocks of {blocksize} need {nblocks}"
        )
    if code is not None:
        require_tensor(code, "code")
        if code.dtype != torch.float32 or code.numel() != 16:
            raise ValueError(
                f"code must be a float32 table of 16 entries, got {code.dtype} with {code.numel()}"
            )
    same_device(
        flat.device, absmax=absmax, code=code, nested_absmax=nested_absmax, nested_code=nested_code,
        offset=offset if isinstance(offset, torch.Tensor) and offset.device.type != "cpu" else None,
    )  # fmt: skip


FLT_MIN = torch.finfo(torch.float32).tiny


def flush_denormals_(x: torch.Tensor) -> torch.Tensor:
    """Replaces float32 values below FLT_MIN in magnitude by zeros of their sign, in place.

    bitsandbytes' CUDA kernels are built to flush denormals, so their products never are denormal. Every
    other value keeps its bits; a NaN stays a NaN, with the payload a float32 multiply leaves it (a GPU's
    canonical NaN, as the products this flushes already have).
    """
    return x.mul_(x.abs() >= FLT_MIN)  # x * 0 keeps x's sign; NaN stays NaN; three operations, not eight


def _offset_float32(offset: Any) -> float:
    """A host offset (a number, a one-element CPU tensor or array) as the float32 the decode adds."""
    return torch.as_tensor(offset, dtype=torch.float32).reshape(()).item()


def _add_offset_(x: torch.Tensor, offset: float | torch.Tensor) -> torch.Tensor:
    """``x += offset`` in float32, in place, with ``offset`` rounded to float32 first (one number).

    A number on the host is added as a scalar (the same float32 addition): copying it to the GPU first
    would make the host wait for the GPU at every weight.
    """
    if isinstance(offset, torch.Tensor) and offset.device == x.device:
        return x.add_(offset.to(torch.float32).reshape(()))
    if isinstance(offset, torch.Tensor) and offset.device.type != "cpu":  # on another device: copied
        return x.add_(torch.as_tensor(offset, dtype=torch.float32, device=x.device).reshape(()))
    return x.add_(_offset_float32(offset))


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values[i] * scales[i // blocksize]`` in float32, one rounding, without expanding ``scales``."""
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty_like(values)
    if full:
        torch.mul(
            values[:full].view(-1, blocksize),
            scales[: full // blocksize, None],
            out=out[:full].view(-1, blocksize),
        )
    if full < n:
        torch.mul(values[full:], scales[full // blocksize], out=out[full:])
    return out


def decode_nested_absmax_reference(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    nested_blocksize: int,
    offset: float | torch.Tensor,
) -> torch.Tensor:
    """Plain-torch decode of a nested absmax: ``nested_code[a] * nested_absmax[j // b]``, then ``+ offset``.

    Two float32 roundings, in that order, as bitsandbytes does (each flushed to zero below FLT_MIN, as
    its CUDA kernels do). Returns a new float32 tensor.
    """
    scaled = flush_denormals_(
        _scale_blocks(nested_code[absmax.reshape(-1).long()], nested_absmax.reshape(-1), nested_blocksize)
    )
    return flush_denormals_(_add_offset_(scaled, offset))


def _needs_flush(absmax: torch.Tensor, code: torch.Tensor, n: int) -> bool:
    """Whether some ``code[q] * absmax`` product may be denormal (then flushed to zero, as bitsandbytes'
    CUDA kernel does): only scales below ``FLT_MIN / smallest nonzero |code|`` can make one."""
    magnitudes = code.abs()[(code != 0) & ~code.isnan()]  # a NaN entry makes NaN products, never denormal
    smallest = magnitudes.min() if magnitudes.numel() else torch.ones(())
    # in float64, with a margin: FLT_MIN / smallest is itself denormal (and rounded) when smallest > 1
    return bool(n) and bool((absmax.double().abs() * smallest.double() < 2 * FLT_MIN).any())


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """``[256, 2]`` float32: packed byte ``b`` -> ``(code[b >> 4], code[b & 15])``, as bitsandbytes packs an
    even element in the high nibble."""
    c = code.to(torch.float32).reshape(-1)
    return torch.stack((c.repeat_interleave(16), c.repeat(16)), dim=-1)


def dequantize_4bit_reference(
    flat: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """Plain-torch 4-bit decode of ``n`` elements from packed bytes ``flat`` with float32 ``absmax``.

    The oracle for every other backend: ``code[q] * absmax[i // blocksize]`` in float32 (flushed to zero
    below FLT_MIN, as bitsandbytes' CUDA kernel does), then one rounding to ``dtype``. Returns a new flat
    tensor of ``n`` elements.
    """
    # a byte-pair table: one lookup per packed byte gives both of its values (high nibble first)
    values = torch.nn.functional.embedding(flat.reshape(-1).to(torch.int32), pair_table(code)).reshape(-1)[:n]
    scales = absmax.reshape(-1)
    full = n - n % blocksize
    if carries(flat, absmax, code):  # out of place: vmap cannot write batched scales into unbatched values
        parts = [(values[:full].view(-1, blocksize) * scales[: full // blocksize, None]).reshape(-1)]
        if full < n:
            parts.append(values[full:] * scales[full // blocksize])
        values = torch.cat(parts) if len(parts) > 1 else parts[0]
    else:
        if full:
            values[:full].view(-1, blocksize).mul_(scales[: full // blocksize, None])
        if full < n:
            values[full:].mul_(scales[full // blocksize])
    # a GPU flushes without asking (no sync), as do a functorch transform (whose tensors cannot be asked:
    # vmap refuses data-dependent control flow) and a tracer (FakeTensorMode cannot answer; make_fx would
    # record the answer of its example inputs); flushing where nothing is denormal changes nothing
    if values.device.type != "cpu" or wrapped(absmax, code) or tracing() or _needs_flush(absmax, code, n):
        flush_denormals_(values)
    return values.to(dtype)


CPU_CHUNK = 1 << 18  # elements per step of the CPU decode: its temporaries stay in a core's L2 cache


def dequantize_4bit_cpu(
    flat: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`dequantize_4bit_reference`'s values, bit for bit, computed in cache-sized steps on the CPU.

    Each step of ``CPU_CHUNK`` elements (whole blocks) looks every packed byte up in the byte-pair table
    once (both of its float32 values as one 64-bit entry), multiplies by the block scales in float32 and
    rounds once to ``dtype`` while storing, so no temporary larger than a step exists. Scales small enough
    to make denormal products take the reference itself. Returns a new flat tensor of ``n`` elements.
    """
    absmax = absmax.reshape(-1)
    # a graph to build, a tangent to carry or a functorch wrapper (no storage of its own): the reference's
    # operations carry them; this path writes through out=, which autograd and functorch refuse
    if n == 0 or not readable(flat, absmax, code) or _needs_flush(absmax, code, n):
        return dequantize_4bit_reference(flat, absmax, code, blocksize, n, dtype)
    pairs = pair_table(code).contiguous().view(torch.int64).reshape(256)  # byte -> (code[hi], code[lo])
    flat = flat.reshape(-1)
    out = torch.empty(n, dtype=dtype, device="cpu")
    step = max(CPU_CHUNK - CPU_CHUNK % blocksize, blocksize)  # whole blocks (blocksize is even)
    index = torch.empty(step // 2, dtype=torch.int32, device="cpu")
    values = torch.empty(step // 2, dtype=torch.int64, device="cpu")
    for start in range(0, n, step):
        stop = min(n, start + step)
        nbytes = (stop - start + 1) // 2
        torch.index_select(
            pairs, 0, index[:nbytes].copy_(flat[start // 2 : start // 2 + nbytes]), out=values[:nbytes]
        )
        got = values[:nbytes].view(torch.float32)[: stop - start]
        full = (stop - start) - (stop - start) % blocksize
        first = start // blocksize
        if full:
            blocks = full // blocksize
            torch.mul(
                got[:full].view(blocks, blocksize),
                absmax[first : first + blocks, None],
                out=out[start : start + full].view(blocks, blocksize),
            )
        if full < stop - start:  # the weight's last, short block
            torch.mul(got[full:], absmax[first + full // blocksize], out=out[start + full : stop])
    return out


def dequantize_4bit_native(
    flat: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    n: int,
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    offset: float | torch.Tensor = 0.0,
    *,
    wait: bool = False,
    transposed: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """:func:`dequantize_4bit_reference`'s values, bit for bit, from the C kernel (``_native``) on the CPU.

    Decodes a nested absmax itself (``absmax`` uint8 with ``nested_absmax``, ``nested_code`` and
    ``offset``) or takes float32 ``absmax``. Returns a new flat tensor of ``n`` elements and ``dtype``, or
    ``out`` itself, written in place, when :func:`writable_in_place` allows (the caller checked its shape and
    dtype; else the caller fills ``out`` with ``copy_``, which keeps torch's checks); with ``transposed``
    ``(rows, cols)`` (``rows * cols == n``), the ``[cols, rows]`` transpose of the ``[rows, cols]`` weight,
    written transposed in the same pass. Returns None when the kernel is not built yet (``wait`` waits for
    it) or cannot be had, or when a piece is not as the kernel reads it (CPU, contiguous, the checked dtypes,
    no lazy negation): the caller takes the torch path.
    """
    fn = cpu_4bit(wait) if transposed is None else cpu_4bit_t(wait)
    if fn is None or flat.device.type != "cpu":
        return None
    kind = CPU_KINDS.get(dtype)
    pieces = [flat, absmax, code] + ([nested_absmax, nested_code] if nested_absmax is not None else [])
    if kind is None or not readable(*pieces):
        return None
    if code.dtype != torch.float32 or code.numel() != 16:
        return None
    if nested_absmax is None:
        if absmax.dtype != torch.float32:
            return None
        nested: dict[str, Any] = {}
    else:
        assert nested_code is not None  # _check_pieces requires both
        if (
            absmax.dtype != torch.uint8
            or nested_absmax.dtype != torch.float32
            or nested_code.dtype != torch.float32
        ):
            return None
        if nested_code.numel() != NESTED_CODE_SIZE:
            return None
        if isinstance(offset, torch.Tensor) and (
            offset.device.type != "cpu" or offset.is_neg() or offset.is_conj()
        ):
            return None
        nested = dict(
            nested_absmax=nested_absmax,
            nested_code=nested_code,
            nested_blocksize=nested_blocksize,
            offset=offset,
        )
    shape = (n,) if transposed is None else (transposed[1], transposed[0])
    return _kernel_into(fn, out, shape, dtype, pieces, kind, flat, absmax, code, blocksize, n, **nested,
                        rows_cols=transposed)  # fmt: skip


def writable_in_place(out: torch.Tensor, pieces: Sequence[torch.Tensor | None]) -> bool:
    """Whether the C kernel may write ``out`` (already checked for shape and dtype) through its pointer with
    the effect torch's in-place copy would have: a plain strided, contiguous CPU tensor with memory of its
    own, outside autograd (torch refuses in-place writes to a leaf that requires grad; a forward-mode
    tangent would have to be zeroed), not an inference tensor (refused outside inference mode), a zero
    tensor (immutable) or a functorch wrapper (no storage of its own), not lazily negated (its memory holds
    the negated values), and sharing no memory with the ``pieces`` the kernel reads. Else the result goes to
    new memory and ``out.copy_`` keeps torch's checks, errors and autograd."""
    # readable(): on the CPU, contiguous, not lazily negated, no functorch wrapper, no forward-mode tangent
    if type(out) is not torch.Tensor or out.layout != torch.strided or not readable(out):
        return False
    return _owns_writable_memory(out, pieces)


def _owns_writable_memory(out: torch.Tensor, pieces: Sequence[torch.Tensor | None]) -> bool:
    """The rest of :func:`writable_in_place`'s rule, for an ``out`` on the CPU, strided, and neither lazily
    negated, wrapped by a transform nor carrying a tangent (a plan's key and its per-call checks hold that):
    contiguous (the key holds whether it is, not that it is), a plain ``torch.Tensor`` (no Parameter or
    other subclass), no grad, not an inference or zero tensor, memory of its own, shared with none of
    ``pieces``."""
    if (
        type(out) is not torch.Tensor
        or not out.is_contiguous()
        or out.requires_grad
        or out.is_inference()
        or out._is_zerotensor()
    ):
        return False
    start = out.data_ptr()
    if not start:
        return False
    end = start + out.numel() * out.element_size()
    for t in pieces:
        if t is not None and t.data_ptr() < end and start < t.data_ptr() + t.numel() * t.element_size():
            return False
    return True


def _kernel_into(
    fn: Any, out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
    pieces: Sequence[torch.Tensor | None], *args: Any, **kwargs: Any,
) -> torch.Tensor:  # fmt: skip
    """:func:`_kernel_call` (``args``, ``kwargs``) into ``out`` where :func:`writable_in_place` allows it
    (with ``out``'s version counter moved on, as torch's in-place operations do: autograd checks saved
    tensors against it), else into new CPU memory of ``shape`` and ``dtype`` (not the default device: the
    kernel writes here); returns what it wrote."""
    into = out if out is not None and writable_in_place(out, pieces) else None
    target = into if into is not None else torch.empty(shape, dtype=dtype, device=_CPU)
    _kernel_call(fn, target, *args, **kwargs)
    if into is not None:
        torch.autograd.graph.increment_version(into)
    return target


def _kernel_call(
    fn: Any,
    out: torch.Tensor,
    kind: int,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    n: int,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_blocksize: int = 1,
    offset: Any = 0.0,
    rows_cols: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One call of the C kernel into ``out`` (new memory of ``n`` elements), on torch's thread count. With
    ``rows_cols``, the weight is ``[rows, cols]`` and ``out`` (``[cols, rows]``) gets it written transposed
    (``fn`` is then the transposed entry point)."""
    threads = torch.get_num_threads()
    size: tuple[int, ...] = (n,) if rows_cols is None else rows_cols
    if nested_absmax is None:
        fn(packed.data_ptr(), absmax.data_ptr(), None, None, None, 1, 0.0, code.data_ptr(), *size, blocksize,
           out.data_ptr(), kind, threads)  # fmt: skip
        return out
    assert nested_code is not None
    if type(offset) is not float:  # rounded to float32 (and refused unless one number) as the reference does;
        offset = _offset_float32(offset)  # a float rounds in the call
    # entries past the last absmax block never read another nested scale: the same decode, in C's int64
    nested_blocksize = min(nested_blocksize, max(1, -(-n // blocksize)))
    fn(packed.data_ptr(), None, absmax.data_ptr(), nested_code.data_ptr(), nested_absmax.data_ptr(),
       nested_blocksize, offset, code.data_ptr(), *size, blocksize, out.data_ptr(), kind, threads)  # fmt: skip
    return out


class NF4CpuPlan:
    """A checked 4-bit call on the CPU through the C kernel: allocate the output and call (see ``_plans``).

    What the call's key fixed is kept in an int64 array the kernel's planned entry point reads
    (``qb_dequantize_4bit_planned``), so a call converts only the pointers it brings (eight arguments
    where the kernel's own entry point takes thirteen: 0.4 us of a 64x64 call's 7)."""

    __slots__ = ("code", "dtype", "fields", "fn", "out_size", "plan", "transposed_view")

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        code: torch.Tensor,
        blocksize: int,
        n: int,
        transpose: bool,
        nested_blocksize: int,
        written_t: bool,
    ) -> None:
        self.dtype, self.code = dtype, code  # held: the kernel reads the table through its address
        # the kernel writes contiguous memory: allocated in the shape returned (a reshape costs 1 us a call);
        # with written_t it writes the transpose itself, else a transposed request gets a view of its result
        out_shape = (shape[1], shape[0]) if written_t else shape
        # torch.empty(64, 64) takes 0.3 us less than torch.empty((64, 64)); a 0-d result needs its ()
        self.out_size = out_shape if out_shape else ((),)
        self.transposed_view = transpose and not written_t
        self.fn = cpu_4bit_planned()  # loaded: a plan is made after a call of the same library's kernel
        values = {
            "code": code.data_ptr(), "n": n, "rows": shape[0] if written_t else 0,
            "cols": shape[1] if written_t else 0, "blocksize": blocksize,
            # entries past the last absmax block never read another nested scale (as _kernel_call)
            "nested_blocksize": min(nested_blocksize, max(1, -(-n // blocksize))), "kind": CPU_KINDS[dtype],
            "transposed": int(written_t),
        }  # fmt: skip
        self.fields = (ctypes.c_int64 * len(PLAN_FIELDS))(*(values[f] for f in PLAN_FIELDS))
        self.plan = ctypes.addressof(self.fields)

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
        # the key held every piece's type, dtype, shape, contiguity and device, and _plan_key checked them
        # as readable() does (out's too: plans with out= exist where the kernel writes out's layout); the
        # same call as _kernel_into's
        into = (
            out
            if out is not None
            and _owns_writable_memory(out, (packed, absmax, nested_absmax, nested_code, self.code))
            else None
        )
        target = into if into is not None else torch.empty(*self.out_size, dtype=self.dtype, device=_CPU)
        if nested_absmax is None:
            self.fn(self.plan, packed.data_ptr(), absmax.data_ptr(), None, None, 0.0, target.data_ptr(),
                    torch.get_num_threads())  # fmt: skip
        else:
            assert nested_code is not None
            # rounded to float32 as the reference does (a float rounds in the call)
            if type(offset) is not float:
                offset = _offset_float32(offset)
            self.fn(self.plan, packed.data_ptr(), absmax.data_ptr(), nested_code.data_ptr(),
                    nested_absmax.data_ptr(), offset, target.data_ptr(), torch.get_num_threads())  # fmt: skip
        if into is not None:
            torch.autograd.graph.increment_version(into)
            return into
        if out is not None:
            return out.copy_(target)
        return target.t() if self.transposed_view else target


def _decode_absmax(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_blocksize: int,
    offset: float | torch.Tensor,
    backend: str,
) -> torch.Tensor:
    if nested_absmax is None:
        return absmax.reshape(-1)
    assert nested_code is not None  # _check_pieces requires both
    if backend == "bnb":
        decoded = torch.ops.bitsandbytes.dequantize_blockwise.default(
            absmax.reshape(-1), nested_absmax.reshape(-1), nested_code, nested_blocksize, torch.float32
        )
        return _add_offset_(decoded, offset)
    return decode_nested_absmax_reference(absmax, nested_absmax, nested_code, nested_blocksize, offset)


def _result_shape(shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
    if not transpose:
        return shape
    if len(shape) != 2:
        raise ValueError(f"transpose=True needs a 2-D weight, got shape {shape}")
    return (shape[1], shape[0])


def _plan_key(
    packed: Any,
    absmax: Any,
    shape: Any,
    blocksize: Any,
    code: Any,
    nested_absmax: Any,
    nested_code: Any,
    nested_blocksize: Any,
    offset: Any,
    quant_type: Any,
    dtype: Any,
    transpose: Any,
    out: Any,
    backend: Any,
    check_finite: Any,
) -> tuple[Any, ...] | None:
    """The key of this call's plan (``_plans``), or None when it has none: only CUDA and CPU calls without
    ``code`` or ``check_finite`` have one, outside ``torch.compile``'s tracing."""
    if (
        code is not None
        or check_finite
        or not isinstance(packed, torch.Tensor)
        or not isinstance(absmax, torch.Tensor)
        or type(blocksize) is not int
        or type(nested_blocksize) is not int
    ):
        return None  # 64.0 hashes as 64: only exact types may skip the checks
    if type(shape) is not torch.Size and (type(shape) is not tuple or not all(type(d) is int for d in shape)):
        return None  # (64.0, 128) hashes as (64, 128), an iterator would be used up
    if not (offset is None or type(offset) is float or isinstance(offset, torch.Tensor)):
        return None  # a list, an array (its length) or an int (10**400): checked each call (the key holds its type)
    cpu = packed.is_cpu
    if not (cpu or packed.is_cuda) or tracing():
        return None
    if out is not None and isinstance(out, torch.Tensor) and out.layout != torch.strided:
        return None  # sparse: the full checks refuse it
    if cpu and fwad._current_level >= 0:
        return None  # forward-mode AD: the torch path carries tangents; the kernel's result would drop them
    grad = cpu and torch.is_grad_enabled()
    for t in (packed, absmax, nested_absmax, nested_code, offset, out):  # a loop: any() of a generator: 1 us
        if (
            t is not None
            and isinstance(t, torch.Tensor)
            and (
                _functorch_wrapped(t)  # vmap, grad: no storage of its own
                or t.is_neg()  # a lazy negation: the pointers hold other values (resolved by the full path)
                or t.is_conj()
                or (
                    grad and t.requires_grad
                )  # the CPU torch path builds a graph; the kernel's result would not
            )
        ):
            return None
    try:
        key = (
            tensor_key(packed), tensor_key(absmax), tuple(shape), blocksize,
            None if nested_absmax is None and nested_code is None
            else (tensor_key(nested_absmax), tensor_key(nested_code), nested_blocksize),
            tensor_key(offset) if isinstance(offset, torch.Tensor) else type(offset), quant_type, dtype, transpose,
            backend, tensor_key(out) if out is not None else None,
        )  # fmt: skip
        hash(key)
    except (TypeError, AttributeError):  # not tensors, unhashable values: the full checks will say
        return None
    return key


def _plan_ready(
    packed: torch.Tensor,
    flat: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: float | torch.Tensor,
    device: torch.device,
) -> bool:
    """Whether the kernel reads every piece where it lies (no copy or conversion on the way), so that a
    plan can pass the next call's pieces straight to it."""
    pieces = [absmax] + ([nested_absmax, nested_code] if nested_absmax is not None else [])
    if isinstance(offset, torch.Tensor) and nested_absmax is not None:
        if offset.dtype != torch.float32 or offset.device != device:
            return False
        pieces.append(offset)
    where = packed.is_contiguous() and flat.data_ptr() == packed.data_ptr()
    return where and all(p is not None and p.is_contiguous() for p in pieces)


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    *,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int = 64,
    code: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    offset: float | torch.Tensor | None = None,
    quant_type: str = "nf4",
    dtype: torch.dtype = torch.bfloat16,
    transpose: bool = False,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    check_finite: bool = False,
) -> torch.Tensor:
    """Dequantizes a bitsandbytes 4-bit weight (NF4 or FP4) from the pieces a checkpoint stores.

    The same verb, arguments and values as ``jax_side.dequantize_nf4``.

    Args:
        packed: the packed weight, ``ceil(n / 2)`` bytes (uint8, or a ``quant_storage`` dtype viewed as
            bytes), any shape (bitsandbytes writes ``[ceil(n / 2), 1]``); high nibble = even element.
        absmax: ``ceil(n / blocksize)`` float32 block scales, or uint8 codes when nested.
        shape: the dequantized weight's shape (``n`` = its element count).
        blocksize: elements per absmax block: 32, 64, ..., 4096.
        code: the 16-entry float32 table; None, or a table equal to the standard one (a checkpoint's
            ``quant_map``), decodes exactly as bitsandbytes' CUDA kernel does; any other table is applied as given.
        nested_absmax: float32 scales of a nested absmax (the checkpoint's ``.nested_absmax``).
        nested_code: its 256-entry float32 table (``.nested_quant_map``).
        nested_blocksize: absmax entries per nested block (``nested_blocksize``, 256 in bitsandbytes).
        offset: added after decoding a nested absmax (``nested_offset``); required with one (bitsandbytes
            stores it with every nested absmax), ignored without.
        quant_type: ``"nf4"`` or ``"fp4"``.
        dtype: float16, bfloat16 or float32 (a torch.dtype, or its name: ``"bfloat16"``).
        transpose: return the ``[in, out]`` transpose of a 2-D ``[out, in]`` weight (possibly a
            transposed view of a row-major result).
        out: where to write the result; must have the result's shape (after ``transpose``) and ``dtype``.
        backend: ``"auto"``, ``"bnb"``, ``"torch"`` or ``"triton"`` (see ``torch_side._backend``).
        check_finite: raise ValueError if a scale (``absmax``, ``nested_absmax``, ``offset``) or a table
            entry (``code``, ``nested_code``) is NaN or Inf (a host sync on a GPU). By default
            non-finite values propagate as they do in bitsandbytes.

    Returns:
        A new tensor of ``shape`` (``[in, out]`` with ``transpose``) and ``dtype`` on ``packed``'s device,
        written on that device's current stream; ``out`` itself when given. Never aliases ``packed``.

    Raises:
        AssertionError: ``out`` has the wrong shape or dtype.
        TypeError: a piece has the wrong dtype (e.g. FP8 bytes, a float absmax for a nested state), ``out``
            is not a dense (strided) tensor.
        ValueError: pieces that do not fit together, unknown quant type or block size, pieces on
            different devices, non-finite scales with ``check_finite``.
    """
    if type(dtype) is not torch.dtype:
        dtype = out_dtype(dtype, ValueError)
    plan_key = _plan_key(
        packed, absmax, shape, blocksize, code, nested_absmax, nested_code, nested_blocksize, offset,
        quant_type, dtype, transpose, out, backend, check_finite,
    )  # fmt: skip
    if plan_key is not None:
        plan = NF4_PLANS.get(plan_key)
        if plan is not None and (packed.is_cpu or packed.device.index == torch.cuda.current_device()):
            return plan(plain(packed), absmax, nested_absmax, nested_code, offset, packed.device, out)
    packed = resolved(plain(require_tensor(packed, "packed")))
    absmax, code, offset = resolved(absmax), resolved(code), resolved(offset)
    nested_absmax, nested_code = resolved(nested_absmax), resolved(nested_code)
    shape = _shape(shape, "dequantize_nf4")
    if is_int(nested_blocksize):  # numpy's ints as Python's (a bool is refused with the pieces)
        nested_blocksize = operator.index(nested_blocksize)
    n = math.prod(shape)
    flat = _packed_bytes(packed, shape)
    _check_pieces(
        flat, absmax, shape=shape, blocksize=blocksize, code=code, nested_absmax=nested_absmax,
        nested_code=nested_code, nested_blocksize=nested_blocksize, offset=offset, quant_type=quant_type,
        dtype=dtype,
    )  # fmt: skip
    if offset is None:  # no nested absmax (checked): nothing reads it
        offset = 0.0
    result_shape = _result_shape(shape, transpose)
    if out is not None:
        require_tensor(out, "out")
        if out.layout != torch.strided:  # torch's own errors for these name storage or is_contiguous
            raise TypeError(f"out must be a dense (strided) tensor, got layout {out.layout}")
        raise_out_mismatch(result_shape, dtype, out)
        same_device(flat.device, out=out)
    if check_finite:
        pieces = (("absmax", absmax), ("nested_absmax", nested_absmax), ("nested_code", nested_code),
                  ("code", code))  # fmt: skip
        for name, t in pieces:
            if isinstance(t, torch.Tensor):
                _check_finite(t, name)
        # the offset as the decode adds it: rounded to float32 (1e39 is finite, its float32 is not)
        if isinstance(offset, torch.Tensor):
            _check_finite(offset.to(torch.float32), "offset")
        elif not math.isfinite(added := _offset_float32(offset)):
            raise ValueError(
                f"offset is {offset!r} (as float32, which the decode adds: {added}); pass check_finite=False "
                "to let it propagate"
            )
    device = flat.device
    # (a table that carries a graph, a tangent or a transform is used as given, even with the standard values)
    standard = code is None or (not carries(code) and is_standard_code(code, quant_type))
    chosen = choose_4bit_backend(
        device, backend, shape=shape, blocksize=blocksize, quant_type=quant_type, standard_code=standard
    )
    if plan_key is not None and not (
        n
        and _plan_ready(packed, flat, absmax, nested_absmax, nested_code, offset, device)
        and (
            chosen == "triton" and device.index == torch.cuda.current_device()
            if device.type == "cuda"
            else chosen == "torch" and backend == "auto"
        )
    ):
        plan_key = None
    with on_device(device):
        if n == 0:
            result = torch.empty(shape, dtype=dtype, device=device)
        elif chosen == "triton":
            try:
                kernels_imported(backend == "triton")
                from ._triton import dequantize_4bit_triton

                pairs = (
                    pairs_of(code.reshape(-1))
                    if code is not None and not standard
                    else standard_pairs(quant_type, device)
                )
                return dequantize_4bit_triton(
                    flat.contiguous(), absmax, pairs, blocksize=blocksize, shape=shape, dtype=dtype,
                    transpose=transpose, out=out, nested_absmax=nested_absmax, nested_code=nested_code,
                    nested_blocksize=nested_blocksize, offset=offset, plan_key=plan_key, wait=backend == "triton",
                )  # fmt: skip
            except KernelNotReady:  # compiling in the background (_compile): the same bits another way
                # bitsandbytes' kernels when it is imported already (exact on CUDA), else the torch path
                fallback: torch.Tensor | None = None
                if standard and sys.modules.get("bitsandbytes") is not None:
                    try:
                        absmax_f32 = _decode_absmax(
                            absmax, nested_absmax, nested_code, nested_blocksize, offset, "bnb"
                        )
                        fallback = torch.ops.bitsandbytes.dequantize_4bit.default(
                            flat, absmax_f32, blocksize, quant_type, list(shape), dtype
                        )
                    except Exception:  # a bitsandbytes without its CUDA ops (or half imported): torch
                        fallback = None
                if fallback is None:
                    absmax_f32 = _decode_absmax(
                        absmax, nested_absmax, nested_code, nested_blocksize, offset, "torch"
                    )
                    table = (
                        code.reshape(-1)
                        if code is not None and not standard
                        else standard_code(quant_type, device)
                    )
                    fallback = dequantize_4bit_reference(flat, absmax_f32, table, blocksize, n, dtype)
                result = fallback.reshape(shape)
                if transpose:
                    result = result.t().contiguous()  # the layout the kernel writes
                return out.copy_(result) if out is not None else result
        elif chosen == "bnb":
            absmax_f32 = _decode_absmax(absmax, nested_absmax, nested_code, nested_blocksize, offset, "bnb")
            if device.type == "cuda" and out is not None and not transpose and out.is_contiguous():
                torch.ops.bitsandbytes.dequantize_4bit.out(
                    flat, absmax_f32, blocksize, quant_type, list(shape), dtype, out=out
                )
                return out
            result = torch.ops.bitsandbytes.dequantize_4bit.default(
                flat, absmax_f32, blocksize, quant_type, list(shape), dtype
            ).reshape(shape)
        else:
            # a table equal to the standard one decodes as bitsandbytes' CUDA kernel does (its -0.0 for FP4)
            table = (
                code.reshape(-1) if code is not None and not standard else standard_code(quant_type, device)
            )
            native = None
            # the kernel writes the transpose itself where that beats a transposed copy of its result
            written_t = transpose and transposes_well(shape[0], shape[1], nibbles=True)
            # out= takes the kernel's writes where its layout is the one written (not a transposed view)
            direct = transpose == written_t
            if device.type == "cpu" and backend == "auto":
                native = dequantize_4bit_native(
                    flat, absmax, table, blocksize, n, dtype, nested_absmax, nested_code, nested_blocksize,
                    offset, transposed=(shape[0], shape[1]) if written_t else None, out=out if direct else None,
                )  # fmt: skip
                if native is not None and plan_key is not None and (out is None or direct):
                    plan = NF4CpuPlan(
                        shape, dtype, table, blocksize, n, transpose, nested_blocksize, written_t
                    )
                    remember(NF4_PLANS, plan_key, plan)
            if native is not None and out is not None and native is out:
                return out  # written in place
            if native is not None and written_t:
                return out.copy_(native) if out is not None else native
            if native is not None:
                result = native.reshape(shape)
            else:
                absmax_f32 = _decode_absmax(
                    absmax, nested_absmax, nested_code, nested_blocksize, offset, "torch"
                )
                decode = dequantize_4bit_cpu if device.type == "cpu" else dequantize_4bit_reference
                result = decode(flat, absmax_f32, table, blocksize, n, dtype).reshape(shape)
        if transpose:
            result = result.t()
        if out is not None:
            return out.copy_(result)
        return result


def dequantize(
    W: torch.Tensor,
    quant_state: Any = None,
    out: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    check_finite: bool = False,
) -> torch.Tensor:
    """Dequantizes a bitsandbytes 4-bit weight (NF4 or FP4, nested absmax or plain).

    Args:
        W: the packed weight as bitsandbytes holds it: ``[ceil(n / 2), 1]`` bytes (uint8 or another
            ``quant_storage`` dtype), or a ``Params4bit``. Passed transposed, as ``[1, ceil(n / 2)]``
            (bitsandbytes' convention for ``W.t()``), a 2-D result is transposed back; like bitsandbytes,
            this includes a one-byte ``[1, 1]`` weight.
        quant_state: a ``bitsandbytes.functional.QuantState`` or the legacy list of bitsandbytes <= 0.41,
            ``[absmax, shape, dtype, blocksize, [offset, state2] | None, quant_type, code]``. None takes a
            ``Params4bit``'s own ``quant_state``; for a weight without one (nothing quantized) it returns
            ``W`` itself, and for a weight quantized otherwise (a torchao subclass, a bitsandbytes
            ``Int8Params``, a torch-quantized tensor) it raises TypeError, pointing to
            :func:`torch_side.dequantize_weight`. Like bitsandbytes, only ``quant_type`` chooses the table;
            ``code`` is not read.
        out: optional tensor to write into; must have exactly the quant state's shape and dtype (also for a
            ``[1, n]`` W, whose result is then ``out.t()``).
        backend: ``"auto"`` (fastest exact backend for the device), ``"bnb"``, ``"torch"`` or ``"triton"``.
        check_finite: raise ValueError on NaN/Inf scales (a host sync on a GPU); by default they
            propagate, as in bitsandbytes.

    Returns:
        A tensor of the quant state's ``shape`` and ``dtype`` (fp16, bf16 or fp32) on ``W``'s device —
        its transpose when ``W`` arrives as ``[1, n]``. It is new memory (or ``out``, or for a ``[1, n]`` W
        ``out.t()``), never an alias of
        ``W``, except that a weight without a quant state comes back as it is. On CUDA the work is queued on the current stream of ``W``'s device, so a consumer
        ordered after that stream (such as ``qbridge.to_jax``) reads it finished.

    Raises:
        AssertionError: ``out`` does not match the quant state's shape and dtype (message: expected vs got).
        TypeError: a quant-state piece of the wrong type or dtype (see :func:`torch_side.dequantize_nf4`),
            an ``out`` that is not a dense (strided) tensor; no quant state for a weight quantized in another
            format (above).
        ValueError: a malformed or mismatched quant state (see :func:`torch_side.dequantize_nf4`).

    Example:
        >>> packed, qs = bitsandbytes.functional.quantize_4bit(w, quant_type="nf4")
        >>> torch_side.dequantize(packed, qs).shape == w.shape
        True
    """
    if quant_state is None:
        quant_state = getattr(W, "quant_state", None)  # a Params4bit carries its own
        if quant_state is None:
            other = quantized_otherwise(require_tensor(W, "W"))
            if other is not None:  # its memory is not its values: never handed back as the weight
                raise TypeError(
                    f"W is {other}, not a bitsandbytes 4-bit weight: torch_side.dequantize_weight(W) decodes it "
                    "(dequantize takes packed 4-bit bytes with their quant state, or a Params4bit)"
                )
            return W
    require_tensor(W, "W")
    absmax, pieces = quant_state_pieces(quant_state)
    # bitsandbytes' convention: a [1, n] packed weight is W.t(), and the 2-D result is transposed back.
    # A one-byte weight ([1, 1]) is read that way too, as bitsandbytes reads it.
    transposed = W.dim() == 2 and W.shape[0] == 1
    pieces["code"] = None  # bitsandbytes' kernels choose the table by quant_type alone
    result = dequantize_nf4(W, absmax, **pieces, out=out, backend=backend, check_finite=check_finite)
    return result.t() if transposed and result.dim() == 2 else result


def dequantize_many(
    weights: Sequence[torch.Tensor],
    quant_states: Sequence[Any] | None = None,
    *,
    backend: str = "auto",
    check_finite: bool = False,
) -> list[torch.Tensor]:
    """Dequantizes many bitsandbytes 4-bit weights: ``[dequantize(W, qs) for W, qs in zip(weights,
    quant_states)]``, the same values, with errors that name the weight.

    Each weight takes :func:`dequantize`'s path, so on a CUDA device every weight of a kind already
    checked in this process launches its kernel directly (``torch_side._plans``). (A grouped launch per
    kind, as :func:`dequantize_fp8_many` makes, measured no faster for 4-bit weights on an H200: the work
    per weight on the host stayed the same, ``benchmarks/RESULTS.md``.)

    Args:
        weights: packed weights as :func:`dequantize` takes them, or ``Params4bit`` (whose ``quant_state``
            is used when ``quant_states`` is None).
        quant_states: one quant state per weight, or None (each weight's own, as :func:`dequantize`
            takes it: ``Params4bit`` carry theirs; a weight without one comes back as it is, and one
            quantized in another format raises TypeError).
        backend, check_finite: as in :func:`dequantize`, for every weight.

    Returns:
        A list with one tensor per weight, as :func:`dequantize` returns them (written on the current
        stream of their device).

    Raises:
        TypeError: ``weights`` or ``quant_states`` is a single tensor or quant state instead of a list (or
            another iterable); and as :func:`dequantize`, naming the weight's index (``weights[i]: ...``).
        ValueError: ``weights`` and ``quant_states`` differ in length; and as :func:`dequantize`, naming the
            weight's index.
        AssertionError: as :func:`dequantize`, naming the weight's index.
    """
    weights = as_list(weights, "weights")
    quant_states = [None] * len(weights) if quant_states is None else as_list(quant_states, "quant_states")
    if len(weights) != len(quant_states):
        raise ValueError(f"got {len(weights)} weights and {len(quant_states)} quant states: one per weight")
    return [
        numbered(i, dequantize, W, qs, backend=backend, check_finite=check_finite)
        for i, (W, qs) in enumerate(zip(weights, quant_states, strict=True))
    ]
