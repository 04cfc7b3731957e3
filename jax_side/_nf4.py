"""bitsandbytes 4-bit (NF4 / FP4) dequantization in JAX, bit-identical to bitsandbytes' CUDA kernels.

Element ``i`` of a weight of ``n`` elements is the nibble ``q`` (high nibble of byte ``i // 2`` for even
``i``) decoded as ``code[q] * absmax[i // blocksize]`` in float32 and rounded once to the output dtype. A
nested absmax decodes as ``nested_code[a] * nested_absmax[j // nested_blocksize]`` rounded to float32,
then ``+ offset`` rounded again.

On the CPU the decode is qbridge's C kernel, called from XLA (``_cpu_kernel``: several times faster than
XLA's own operations, the same bits, a nested absmax included, also inside a caller's jit); elsewhere, and
on the CPU until that kernel is built, it is XLA's operations below.

With XLA's operations, those two roundings are the one place where JAX can differ: inside a single jitted
computation, XLA fuses ``a * b + c`` and the compiler contracts it into one fused multiply-add (one
rounding). Called as a public function on concrete arrays, :func:`dequantize_nf4` therefore decodes a
nested absmax in two separate dispatches (product, then sum) and is bit-identical to bitsandbytes. Traced
inside a caller's own ``jax.jit`` on a GPU, the whole decode is one computation and the compiler may
contract it: then about one absmax in five differs from bitsandbytes' in the last float32 bit (and a weight
scaled by it by at most one unit in the last place of the output dtype, usually not at all after rounding
to bf16). Decode the absmax outside the jit with :func:`decode_nested_absmax` (or keep weights un-nested)
where the bits matter.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from . import _cpu_kernel
from ._codes import standard_code
from ._fp8 import _is_int
from ._layout import out_dtype, refuse_torch
from ._varying import vary_alike

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
OUT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
PACKED_DTYPES = (jnp.uint8, jnp.int8, jnp.float16, jnp.bfloat16, jnp.float32)
NESTED_CODE_SIZE = 256
_PACKED = frozenset(jnp.dtype(d) for d in PACKED_DTYPES)
_OUT = frozenset(jnp.dtype(d) for d in OUT_DTYPES)


def _is_traced(*xs: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _packed_itemsize(packed: jax.Array) -> int:
    """The byte width of the dtype the packed weight was stored in; TypeError for one that cannot hold it."""
    if packed.dtype not in _PACKED:
        hint = (
            " That is FP8 data: use dequantize_fp8."
            if packed.dtype.itemsize == 1 and jnp.issubdtype(packed.dtype, jnp.floating)
            else ""
        )
        raise TypeError(
            f"packed 4-bit weight must hold its bytes as uint8 (or a bitsandbytes quant_storage dtype); "
            f"got {packed.dtype}.{hint}"
        )
    return int(packed.dtype.itemsize)


def _as_bytes(packed: jax.Array) -> jax.Array:
    """The packed weight's bytes, flat (traceable)."""
    if packed.dtype != jnp.uint8:
        packed = jax.lax.bitcast_convert_type(packed, jnp.uint8)
    return packed.reshape(-1)


def _bytes(packed: Any) -> tuple[jax.Array, int]:
    """The packed weight as flat bytes, and the byte width of the dtype it was stored in."""
    packed = jnp.asarray(packed)
    return _as_bytes(packed), _packed_itemsize(packed)


def _array(x: Any, name: str = "an argument") -> jax.Array:
    if isinstance(x, jax.Array):
        return x
    refuse_torch(x, name)
    return jnp.asarray(x)


def _check_nested_blocksize(nested_blocksize: Any, where: str = "") -> None:
    if not _is_int(nested_blocksize) or nested_blocksize <= 0:
        raise ValueError(f"{where}nested_blocksize must be a positive int, got {nested_blocksize!r}")


def _check(
    nbytes: int,
    itemsize: int,
    absmax: jax.Array,
    *,
    shape: tuple[int, ...],
    blocksize: int,
    code: jax.Array | None,
    nested_absmax: jax.Array | None,
    nested_code: jax.Array | None,
    nested_blocksize: int,
    quant_type: str,
    dtype: Any,
) -> None:
    where = f"4-bit weight of shape {shape}"
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must not have negative sizes, got {shape}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if not _is_int(blocksize) or blocksize not in BLOCKSIZES:
        raise ValueError(
            f"blocksize must be one of the ints {BLOCKSIZES} (what bitsandbytes writes), got {blocksize!r}"
        )
    out_dtype(dtype, _OUT, ValueError)
    n = math.prod(shape)
    need = (n + 1) // 2
    # quant_storage wider than a byte rounds the byte count up to whole storage elements.
    if nbytes != -(-need // itemsize) * itemsize:
        raise ValueError(
            f"packed 4-bit weight holds {nbytes} bytes; a weight of shape {shape} needs {need} bytes "
            "(two 4-bit values per byte). Check that the quant state belongs to this weight"
        )
    nblocks = -(-n // blocksize)
    if absmax.size != nblocks:  # before a nested absmax's sizes, which follow from it
        raise ValueError(
            f"{where}: absmax has {absmax.size} entries; {n} elements in blocks of {blocksize} need {nblocks}"
        )
    nested = nested_absmax is not None or nested_code is not None
    if nested:
        if nested_absmax is None or nested_code is None:
            raise ValueError("a nested absmax needs both nested_absmax and nested_code")
        _check_nested(absmax, nested_absmax, nested_code, nested_blocksize, where)
    elif absmax.dtype == jnp.uint8:
        raise TypeError(
            f"{where}: absmax is uint8, which is a nested (double-quant) absmax: pass nested_absmax, "
            "nested_code and offset (the checkpoint's .nested_absmax, .nested_quant_map and nested_offset)"
        )
    elif absmax.dtype != jnp.float32:
        raise TypeError(f"{where}: absmax must be float32 (or uint8 when nested), got {absmax.dtype}")
    if code is not None and (code.dtype != jnp.float32 or code.size != 16):
        raise ValueError(f"code must be a float32 table of 16 entries, got {code.dtype} with {code.size}")


def _check_nested(
    absmax: jax.Array, nested_absmax: jax.Array, nested_code: jax.Array, nested_blocksize: Any, where: str
) -> None:
    """A nested absmax's pieces: uint8 codes, float32 scales (one per ``nested_blocksize`` codes) and a
    float32 table of 256 entries; errors start with ``where``."""
    _check_nested_blocksize(nested_blocksize, f"{where}: ")
    if absmax.dtype != jnp.uint8:
        raise TypeError(f"{where}: a nested (double-quant) absmax is uint8, got {absmax.dtype}")
    if nested_absmax.dtype != jnp.float32 or nested_code.dtype != jnp.float32:
        raise TypeError(
            f"{where}: nested_absmax and nested_code must be float32, got {nested_absmax.dtype} and {nested_code.dtype}"
        )
    n_nested = -(-absmax.size // nested_blocksize)
    if nested_absmax.size != n_nested:
        raise ValueError(
            f"{where}: nested_absmax has {nested_absmax.size} entries; {absmax.size} absmax blocks in nested "
            f"blocks of {nested_blocksize} need {n_nested}"
        )
    if nested_code.size != NESTED_CODE_SIZE:
        raise ValueError(f"{where}: nested_code must have {NESTED_CODE_SIZE} entries, got {nested_code.size}")


def _offset(offset: Any, shape: tuple[int, ...], where: str = "") -> Any:
    """A nested absmax's offset as an array (a jax array or tracer as given; a number, a numpy or a torch
    scalar through numpy), checked to be one real number (errors start with ``where``, by default the
    4-bit weight of ``shape``)."""
    where = where or f"4-bit weight of shape {shape}"
    if not isinstance(offset, jax.Array | np.ndarray):
        try:
            offset = np.asarray(offset)
        except Exception as e:
            raise TypeError(f"{where}: offset must be a real number, got {offset!r}") from e
    if math.prod(offset.shape) != 1:
        raise ValueError(
            f"{where}: offset must be one number (the checkpoint's nested_offset), got shape {offset.shape}"
        )
    if not (jnp.issubdtype(offset.dtype, jnp.floating) or jnp.issubdtype(offset.dtype, jnp.integer)):
        raise TypeError(f"{where}: offset must be a real number, got {offset.dtype}")
    return offset


FLT_MIN = float(np.finfo(np.float32).tiny)


def flush(x: jax.Array) -> jax.Array:
    """float32 values below FLT_MIN in magnitude as zeros of their sign (bitsandbytes' CUDA kernels flush)."""
    return jnp.where(jnp.abs(x) < FLT_MIN, x * 0.0, x)


def _scale_blocks(values: jax.Array, scales: jax.Array, blocksize: int) -> jax.Array:
    """``values[i] * scales[i // blocksize]`` in float32 (one rounding, flushed to zero below FLT_MIN)."""
    n = values.shape[0]
    blocksize = min(blocksize, max(n, 1))  # one block covers at most every value (ceil(n / blocksize) == 1)
    nblocks = scales.shape[0]
    padded = jnp.pad(values, (0, nblocks * blocksize - n)).reshape(nblocks, blocksize)
    return flush((padded * scales[:, None]).reshape(-1)[:n])


def _nested_product_traced(
    absmax: jax.Array, nested_absmax: jax.Array, nested_code: jax.Array, nested_blocksize: int
) -> jax.Array:
    return _scale_blocks(jnp.take(nested_code, absmax.astype(jnp.int32)), nested_absmax, nested_blocksize)


_nested_product = jax.jit(_nested_product_traced, static_argnames=("nested_blocksize",))


@jax.jit
def _add_offset(product: jax.Array, offset: jax.Array) -> jax.Array:
    return flush(product + offset)


def decode_nested_absmax(
    absmax: Any, nested_absmax: Any, nested_code: Any, nested_blocksize: int = 256, offset: Any = None
) -> jax.Array:
    """Decodes a nested (double-quant) absmax: ``nested_code[a] * nested_absmax[j // b]``, then ``+ offset``.

    Two float32 roundings, as bitsandbytes does: on concrete arrays the product and the sum run as two
    separate computations so that no fused multiply-add can merge them. Traced inside a caller's jit,
    the compiler may fuse them (see the module docstring). Returns a new float32 array of ``absmax``'s
    size.

    The pieces are JAX or numpy arrays (a QuantState's torch tensors through ``qbridge.to_jax`` or
    ``.numpy()``).

    Args:
        absmax: the uint8 codes (a QuantState's ``.absmax`` when nested), any shape.
        nested_absmax: float32 scales, ``ceil(absmax.size / nested_blocksize)`` of them (``.state2.absmax``).
        nested_code: the float32 table of 256 entries (``.state2.code``, the checkpoint's ``nested_quant_map``).
        nested_blocksize: codes per nested scale (``.state2.blocksize``; 256 in bitsandbytes).
        offset: one number (the checkpoint's ``nested_offset``, a QuantState's ``.offset``), required:
            bitsandbytes stores one with every nested absmax and adds it to every decoded scale.

    Raises:
        ValueError: no ``offset`` or more than one number; ``nested_blocksize`` not a positive int;
            ``nested_absmax`` or ``nested_code`` of the wrong size.
        TypeError: ``absmax`` not uint8, ``nested_absmax`` or ``nested_code`` not float32, ``offset`` not a
            real number; a torch tensor given as a piece.
    """
    if offset is None:
        raise ValueError(
            "decode_nested_absmax needs offset= (the checkpoint's nested_offset, a QuantState's .offset); "
            "every decoded scale is shifted by it"
        )
    where = "decode_nested_absmax"
    absmax = _array(absmax, "absmax")
    nested_absmax = _array(nested_absmax, "nested_absmax")
    nested_code = _array(nested_code, "nested_code")
    _check_nested(absmax, nested_absmax, nested_code, nested_blocksize, where)
    offset = _offset(offset, (), where)
    return _decode_nested(absmax, nested_absmax, nested_code, nested_blocksize, offset)


def _decode_nested(
    absmax: Any, nested_absmax: Any, nested_code: Any, nested_blocksize: int, offset: Any
) -> jax.Array:
    """:func:`decode_nested_absmax` of pieces checked already (a weight's, a kernel's)."""
    absmax = jnp.asarray(absmax).reshape(-1)
    nested_absmax = jnp.asarray(nested_absmax).reshape(-1)
    nested_code = jnp.asarray(nested_code).reshape(-1)
    offset = jnp.asarray(offset, dtype=jnp.float32).reshape(())
    if _is_traced(absmax, nested_absmax, nested_code, offset):
        return flush(_nested_product_traced(absmax, nested_absmax, nested_code, nested_blocksize) + offset)
    product = _nested_product(absmax, nested_absmax, nested_code, nested_blocksize)
    return _add_offset(product, offset)


def _decode(
    flat: jax.Array,
    absmax: jax.Array,
    code: jax.Array,
    *,
    blocksize: int,
    shape: tuple[int, ...],
    dtype: Any,
    transpose: bool,
) -> jax.Array:
    n = math.prod(shape)
    nibbles = jnp.stack((flat >> 4, flat & 0x0F), axis=-1).reshape(-1)[:n]
    values = jnp.take(code, nibbles.astype(jnp.int32))
    out = _scale_blocks(values, absmax, blocksize).astype(dtype).reshape(shape)
    return out.T if transpose else out


# What a decode program is specialized on: blocksize, nested_blocksize, shape, dtype, transpose.
Statics = tuple[int, int, tuple[int, ...], Any, bool]


def _xla_decode(
    flat: jax.Array, absmax: jax.Array, table: jax.Array, *nested: jax.Array, statics: Statics
) -> jax.Array:
    """XLA's operations for what the CPU kernel computes (its derivative, and the decode elsewhere)."""
    blocksize, nested_blocksize, shape, dtype, transpose = statics
    if nested:
        nested_code, nested_absmax, offset = nested
        absmax = flush(
            _nested_product_traced(absmax, nested_absmax, nested_code, nested_blocksize) + offset[0]
        )
    return _decode(flat, absmax, table, blocksize=blocksize, shape=shape, dtype=dtype, transpose=transpose)


def _xla_flat(*operands: jax.Array, statics: Statics) -> jax.Array:
    """XLA's operations for ``_decode_4bit_p``: flat decodes, over any leading dimensions the operands share."""
    fn = functools.partial(_xla_decode, statics=statics)
    for _ in range(operands[0].ndim - 1):
        fn = jax.vmap(fn)
    return fn(*operands)


# The CPU kernel as a primitive of its own, so that the choice is made as a program lowers: the kernel where
# it runs on the CPU and the target is registered, XLA's operations elsewhere and in jax.export (whose
# programs cannot call a target registered in this process only). Operands: flat bytes, absmax, the code
# table, then a nested absmax's nested_code, nested_absmax and offset (1 element), all with the same leading
# (vmapped) dimensions; statics as Statics with shape (n,) and transpose False.
_decode_4bit_p = Primitive("qbridge_dequantize_4bit")
_decode_4bit_p.def_impl(_xla_flat)
_decode_4bit_p.def_abstract_eval(
    lambda packed, *_, statics: packed.update(
        shape=packed.shape[:-1] + statics[2], dtype=jnp.dtype(statics[3]), weak_type=False
    )
)
_xla_lowering = mlir.lower_fun(_xla_flat, multiple_results=False)
mlir.register_lowering(_decode_4bit_p, _xla_lowering)


def _cpu_lowering(ctx: Any, *operands: Any, statics: Statics) -> Any:
    if ctx.module_context.lowering_parameters.for_export or not _cpu_kernel.registered():
        return _xla_lowering(ctx, *operands, statics=statics)
    blocksize, nested_blocksize, (n,), _, _ = statics
    return _cpu_kernel.lowering(ctx, *operands, n=n, blocksize=blocksize, nested_blocksize=nested_blocksize)


mlir.register_lowering(_decode_4bit_p, _cpu_lowering, platform="cpu")


def _batch(args: Any, dims: Any, *, statics: Statics) -> tuple[jax.Array, int]:
    """vmap: one call over the batch (the kernel loops over it), unbatched operands broadcast."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [
        jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
        for a, d in zip(args, dims)
    ]
    return _decode_4bit_p.bind(*args, statics=statics), 0


batching.primitive_batchers[_decode_4bit_p] = _batch


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _kernel_decode(statics: Statics, *operands: jax.Array) -> jax.Array:
    blocksize, nested_blocksize, shape, dtype, transpose = statics
    flat = (blocksize, nested_blocksize, (math.prod(shape),), dtype, False)
    out = _decode_4bit_p.bind(*vary_alike(operands), statics=flat).reshape(shape)
    return out.T if transpose else out


@_kernel_decode.defjvp
def _kernel_decode_jvp(
    statics: Statics, primals: tuple[jax.Array, ...], tangents: tuple[Any, ...]
) -> tuple[jax.Array, jax.Array]:
    """The kernel's values, and the derivative of XLA's operations (a scale's, the code's, the offset's)."""
    _, tangent = jax.jvp(functools.partial(_xla_decode, statics=statics), primals, tangents)
    return _kernel_decode(statics, *primals), tangent


@functools.partial(jax.jit, static_argnames=("statics", "quant_type", "kernel"))
def _dequantize(
    packed: jax.Array,
    absmax: jax.Array,
    *rest: jax.Array,
    statics: Statics,
    quant_type: str | None,
    kernel: bool,
) -> jax.Array:
    """One program for a whole decode. ``rest``: the code table unless ``quant_type`` names the standard
    one, then a nested absmax's ``nested_code``, ``nested_absmax`` and ``offset``. With ``kernel``, the C
    kernel decodes where the program runs on the CPU (chosen as it lowers), XLA's operations elsewhere."""
    n = math.prod(statics[2])
    table = jnp.asarray(standard_code(quant_type)) if quant_type is not None else rest[0].reshape(-1)
    nested = rest if quant_type is not None else rest[1:]
    if nested:
        nested_code, nested_absmax, offset = nested
        nested = (nested_code.reshape(-1), nested_absmax.reshape(-1), offset.astype(jnp.float32).reshape(1))
    operands = (_as_bytes(packed)[: (n + 1) // 2], absmax.reshape(-1), table, *nested)
    return _kernel_decode(statics, *operands) if kernel else _xla_decode(*operands, statics=statics)


def _on_cpu(x: jax.Array) -> bool:
    """Whether a concrete array lies on the CPU."""
    return all(d.platform == "cpu" for d in x.devices())


def dequantize_nf4(
    packed: Any,
    absmax: Any,
    *,
    shape: tuple[int, ...],
    blocksize: int = 64,
    code: Any = None,
    nested_absmax: Any = None,
    nested_code: Any = None,
    nested_blocksize: int = 256,
    offset: Any = None,
    quant_type: str = "nf4",
    dtype: Any = jnp.bfloat16,
    transpose: bool = False,
) -> jax.Array:
    """Dequantizes a bitsandbytes 4-bit weight (NF4 or FP4) in JAX, from the pieces a checkpoint stores.

    The same verb, arguments and values as ``torch_side.dequantize_nf4``.

    Args:
        packed: ``ceil(n / 2)`` bytes, uint8 (or a ``quant_storage`` dtype, read as its bytes), any shape;
            high nibble = even element. (The checkpoint's ``<name>.weight``.)
        absmax: ``ceil(n / blocksize)`` float32 scales, or uint8 codes when nested (``.absmax``).
        shape: the dequantized shape (``n`` elements).
        blocksize: 32 ... 4096.
        code: the 16-entry float32 table (``.quant_map``); None, or a concrete table equal to the standard
            one, decodes as bitsandbytes' CUDA kernel does; any other table is applied as given (a traced
            table too: FP4's table then decodes nibble 8 as +0.0 where that kernel writes -0.0).
        nested_absmax: float32 scales of a nested absmax (``.nested_absmax``).
        nested_code: its 256-entry float32 table (``.nested_quant_map``).
        nested_blocksize: absmax entries per nested block (256 in bitsandbytes).
        offset: added to the decoded nested absmax (``nested_offset``); required with one (bitsandbytes
            stores it with every nested absmax), ignored without.
        quant_type: ``"nf4"`` or ``"fp4"`` (the checkpoint's; bitsandbytes' ``quantize_4bit`` defaults to
            ``"fp4"``).
        dtype: float16, bfloat16 or float32.
        transpose: return the ``[in, out]`` (Flax ``kernel``) layout of a 2-D ``[out, in]`` weight.

    Returns:
        A new ``jax.Array`` of ``shape`` (reversed with ``transpose``) and ``dtype`` on the device of
        ``packed``. Bit-identical to bitsandbytes' ``dequantize_4bit`` when called on concrete arrays; see
        the module docstring for a nested absmax under a caller's jit. jit-compatible, no host round trips.

    Raises:
        TypeError: pieces of the wrong dtype; a shape of non-ints; an offset that is no real number.
        ValueError: pieces of the wrong size, an unknown quant type or block size, a negative size, an
            offset of more than one number.
    """
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must hold ints, got {shape!r}") from None
    if transpose and len(shape) != 2:
        raise ValueError(f"transpose=True needs a 2-D weight, got shape {shape}")
    packed = _array(packed, "packed")
    itemsize = _packed_itemsize(packed)
    absmax = _array(absmax, "absmax")
    code = None if code is None else _array(code, "code")
    nested_absmax = None if nested_absmax is None else _array(nested_absmax, "nested_absmax")
    nested_code = None if nested_code is None else _array(nested_code, "nested_code")
    _check(
        packed.size * itemsize, itemsize, absmax, shape=shape, blocksize=blocksize, code=code,
        nested_absmax=nested_absmax, nested_code=nested_code, nested_blocksize=nested_blocksize,
        quant_type=quant_type, dtype=dtype,
    )  # fmt: skip
    if nested_absmax is not None:
        if offset is None:
            raise ValueError(
                f"4-bit weight of shape {shape}: a nested absmax needs its offset: pass offset= (the checkpoint's "
                "nested_offset, a QuantState's .offset); every decoded scale is shifted by it"
            )
        offset = _offset(offset, shape)
        # a nested block past the absmax's end changes nothing: at most the whole absmax is one block
        nested_blocksize = min(nested_blocksize, max(1, -(-math.prod(shape) // blocksize)))
    if math.prod(shape) == 0:
        return jnp.zeros(shape[::-1] if transpose else shape, dtype)
    if (
        code is not None
        and not _is_traced(code)
        and np.array_equal(np.asarray(code).reshape(-1), standard_code(quant_type))
    ):
        code = None  # the standard table, decoded as bitsandbytes' CUDA kernel does (FP4's -0.0)
    table = () if code is None else (code,)
    standard = quant_type if code is None else None
    statics = (blocksize, nested_blocksize, shape, jnp.dtype(dtype), transpose)
    traced = _is_traced(packed, absmax, code, nested_absmax, nested_code, offset)
    # transposed, XLA's operations write the decode in the transposed layout in one pass; the kernel's
    # result would need a transposed copy after it (at 4096x4096 on 2 cores: 66 ms against XLA's 34 ms)
    kernel = not transpose and (traced or _on_cpu(packed)) and _cpu_kernel.usable()
    if nested_absmax is not None:
        if kernel:
            nested = (nested_code, nested_absmax, _array(offset))
            return _dequantize(
                packed, absmax, *table, *nested, statics=statics, quant_type=standard, kernel=True
            )
        # XLA's operations: the two roundings in two programs unless traced (see the module docstring)
        absmax = _decode_nested(absmax, nested_absmax, nested_code, nested_blocksize, offset)
    return _dequantize(packed, absmax, *table, statics=statics, quant_type=standard, kernel=kernel)
