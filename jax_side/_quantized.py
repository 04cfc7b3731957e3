"""Quantized weights that stay quantized in JAX: registered pytrees of the pieces a checkpoint stores.

:class:`NF4Weight` holds a bitsandbytes 4-bit weight (packed bytes, absmax, and the nested absmax pieces);
:class:`FP8Weight` a float8 weight and its scales. Both describe the weight in torch's ``[out, in]``
layout (``shape``) and dequantize on demand with :func:`jax_side.dequantize_nf4` /
:func:`jax_side.dequantize_fp8`, so a jitted computation can expand them where they are used. Arrays are
pytree leaves (``jax.tree_util`` maps, ``jax.device_put`` and Orbax see them); shapes, block sizes and
dtypes are static metadata.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from ._casts import cast_exactly
from ._codes import dynamic_code
from ._fp8 import OUT_DTYPES, _block_pair, dequantize_fp8, fp8_scale_layout
from ._nf4 import dequantize_nf4


def explicit_mesh(*trees: Any) -> Any:
    """The mesh of the arrays among ``trees`` placed on a mesh with an explicit axis (JAX's sharding in
    types, ``jax.sharding.AxisType.Explicit``), or None.

    Raises:
        ValueError: arrays on two different such meshes.
    """
    found = None
    for leaf in jax.tree_util.tree_leaves(trees):
        try:
            mesh = jax.typeof(leaf).sharding.mesh
        except (AttributeError, TypeError):  # not an array, or no sharding in its type
            continue
        if not explicit_axes(mesh):
            continue
        if found is not None and mesh != found:
            raise ValueError(
                f"the input and the weight's pieces lie on different meshes ({found} and {mesh}); put them on "
                "one mesh (inside jax.shard_map, pass the weight in through in_specs rather than capturing it: "
                "a captured weight is on the outer mesh)"
            )
        found = mesh
    return found


def explicit_axes(mesh: Any) -> tuple[str, ...]:
    types = getattr(mesh, "axis_types", ())
    return tuple(
        n for n, t in zip(getattr(mesh, "axis_names", ()), types) if t == jax.sharding.AxisType.Explicit
    )


def with_auto_axes(fn: Any, args: tuple, out_spec: Any, mesh: Any) -> Any:
    """``fn(*args)`` with ``mesh``'s explicit axes made automatic around it (``jax.sharding.auto_axes``):
    inside, XLA places the work as it does on meshes with automatic axes (gathering stored pieces where a
    gather needs them); the result is placed as ``out_spec`` says. Manual axes (inside ``shard_map``) stay
    manual."""
    run = jax.sharding.auto_axes(fn, axes=explicit_axes(mesh), out_sharding=out_spec)
    if jax.sharding.get_abstract_mesh().empty:  # arrays on a mesh that is not the context's
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh if hasattr(mesh, "abstract_mesh") else mesh):
            return run(*args)
    return run(*args)


def _rows_spec(stored: Any, shape: tuple[int, ...], transpose: bool, mesh: Any) -> Any:
    """Where a dense weight of ``shape`` (torch's layout) goes on an explicit mesh: its first axis split like
    the stored array's first axis when it divides evenly, else replicated."""
    from jax.sharding import PartitionSpec as P

    spec = tuple(jax.typeof(stored).sharding.spec)
    axes = spec[0] if spec else None
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in names)
    if not names or not shape or shape[0] % size:
        return P()
    out: list[Any] = [None] * len(shape)
    out[1 if transpose and len(shape) == 2 else 0] = axes
    return P(*out)


class _Sizes:
    """What NF4Weight and FP8Weight share: bytes held (every piece), bytes the dense weight would take, and
    dequantizing on a mesh with explicit axes."""

    __iter__ = None  # not a sequence: indexing refuses (below), and iteration must not fall back to it

    def __getitem__(self, index: Any) -> Any:
        """Refused: a kept weight has no dense values to index (``variable[...]`` reads them from arrays)."""
        raise TypeError(
            f"a kept-quantized {type(self).__name__} {self.shape} has no dense values to index: .dequantize() "
            "gives them; its stored pieces are its fields. A plain nnx.Linear or nnx.Embed indexes its kernel "
            "like this after nnx.update: load kept weights with jax_side.load_quantized_into_nnx(model, params), "
            "which swaps those layers for quantized ones"
        )

    if TYPE_CHECKING:  # fields or properties of the dataclasses below

        @property
        def shape(self) -> tuple[int, ...]: ...

        @property
        def dtype(self) -> Any: ...

        @property
        def decode_dtype(self) -> Any: ...

    @property
    def roundings(self) -> tuple[Any, ...]:
        """The dtypes each decoded element (computed in float32) is rounded to, in order: ``decode_dtype``
        then ``dtype`` where a ``decode_dtype`` other than ``dtype`` is set, else ``dtype`` alone.

        Raises:
            ValueError: ``dtype`` or ``decode_dtype`` is not bfloat16, float16 or float32.
        """
        out: list[Any] = []
        for field in ("decode_dtype", "dtype"):
            name = getattr(self, field)
            if name is None and field == "decode_dtype":
                continue
            try:
                dt = jnp.dtype(name)
            except TypeError:
                dt = None
            if dt not in OUT_DTYPES:
                raise ValueError(
                    f"{type(self).__name__} of shape {tuple(self.shape)}: {field}={name!r}; a kept weight "
                    "decodes to bfloat16, float16 or float32"
                )
            if not out or out[-1] != dt:
                out.append(dt)
        return tuple(out)

    def _finish(self, dense: jax.Array, dtype: Any) -> jax.Array:
        """``dense`` (decoded to ``roundings[0]``) rounded to the later ``roundings``, then cast to ``dtype``
        (None: left as is), each rounding kept under XLA (``cast_exactly``)."""
        for dt in self.roundings[1:]:
            dense = cast_exactly(dense, dt)
        return dense if dtype is None else cast_exactly(dense, dtype)

    @property
    def nbytes(self) -> int:
        # a piece given as a Python number (an offset of 0.5, say) counts as the array it becomes
        return sum(
            jnp.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes
            for x in jax.tree_util.tree_leaves(self)
        )

    @property
    def dense_nbytes(self) -> int:
        return math.prod(self.shape) * jnp.dtype(self.dtype).itemsize

    def _dequantize_with_auto_axes(self, stored: Any, mesh: Any, transpose: bool, dtype: Any) -> jax.Array:
        """``dequantize`` on a mesh with explicit axes: run with them made automatic, the result's rows
        split like ``stored``'s first axis (replicated when they do not divide evenly)."""
        out = _rows_spec(stored, tuple(self.shape), transpose, mesh)
        return with_auto_axes(lambda w: w.dequantize(transpose=transpose, dtype=dtype), (self,), out, mesh)


@dataclasses.dataclass(frozen=True)
class NF4Weight(_Sizes):
    """A bitsandbytes 4-bit (NF4/FP4) weight kept quantized.

    Attributes:
        packed: uint8 ``[ceil(n / 2)]``, the packed nibbles (high nibble = even element).
        absmax: float32 ``[ceil(n / blocksize)]``, or uint8 when nested.
        nested_absmax: float32 ``[ceil(len(absmax) / nested_blocksize)]`` when nested, else None.
        nested_code: float32 ``[256]``, the table of the nested absmax, or None for bitsandbytes' standard one
            (its signed dynamic map, ``jax_side._codes.DYNAMIC_CODE``; what its quantization writes), which the
            loader leaves out: one array fewer for every jitted call to hand over. Unused when not nested.
        offset: float32 scalar added to the decoded absmax when nested (required then), else None.
        code: the 16-entry table, or None for the standard table of ``quant_type``.
        shape: the weight's shape in torch's layout (``[out, in]`` for a Linear).
        blocksize: elements per absmax block (64 for transformers' checkpoints).
        nested_blocksize: absmax values per nested block (256).
        quant_type: ``"nf4"`` or ``"fp4"``.
        dtype: the dtype it dequantizes to (name, e.g. ``"bfloat16"``).
        decode_dtype: the dtype each decoded value is rounded to before the cast to ``dtype`` (name), or None
            (rounded to ``dtype`` alone). The loader sets it to the checkpoint's dtype (bitsandbytes'
            ``quant_state.dtype``) where the model's dtype differs, so that a kept weight used in float32
            equals bitsandbytes' bfloat16 decode widened, as the dense load gives it.
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None = None
    nested_code: jax.Array | None = None
    offset: jax.Array | None = None
    code: jax.Array | None = None
    shape: tuple[int, ...] = ()
    blocksize: int = 64
    nested_blocksize: int = 256
    quant_type: str = "nf4"
    dtype: str = "bfloat16"
    decode_dtype: str | None = None

    def dequantize(self, *, transpose: bool = False, dtype: Any = None) -> jax.Array:
        """The dense weight (``[in, out]`` with ``transpose``), in ``dtype`` (default: the stored dtype),
        rounded as ``roundings`` says before the cast to ``dtype``.

        Bit-identical to bitsandbytes on concrete arrays; inside a caller's jit a nested absmax may round
        once instead of twice (see ``jax_side._nf4``).

        On a mesh with explicit axes the result's rows are split like ``packed`` (replicated when they
        do not divide evenly).

        Raises:
            ValueError: a nested absmax without its offset; a ``dtype`` or ``decode_dtype`` field that is
                not bfloat16, float16 or float32.
        """
        self._check_offset()
        if (mesh := explicit_mesh(self)) is not None:
            return self._dequantize_with_auto_axes(self.packed, mesh, transpose, dtype)
        dense = dequantize_nf4(
            self.packed, self.absmax, shape=self.shape, blocksize=self.blocksize, code=self.code,
            nested_absmax=self.nested_absmax, nested_code=self.nested_table(), nested_blocksize=self.nested_blocksize,
            offset=self.offset, quant_type=self.quant_type,
            dtype=self.roundings[0], transpose=transpose,
        )  # fmt: skip
        return self._finish(dense, dtype)

    def nested_table(self) -> Any:
        """The nested absmax's float32 ``[256]`` table: ``nested_code`` as held, or bitsandbytes' standard one
        (a new numpy array) where the absmax is nested and ``nested_code`` is None."""
        if self.nested_absmax is not None and self.nested_code is None:
            return dynamic_code()
        return self.nested_code

    def _check_offset(self) -> None:
        if self.nested_absmax is not None and self.offset is None:
            raise ValueError(
                f"NF4Weight of shape {tuple(self.shape)} has a nested absmax but no offset: set offset= (the "
                "checkpoint's nested_offset, a QuantState's .offset); bitsandbytes adds it to every decoded scale"
            )


@dataclasses.dataclass(frozen=True)
class FP8Weight(_Sizes):
    """A float8 weight kept quantized, with per-tensor, per-row or block scales.

    Attributes:
        weight: float8_e4m3fn or float8_e5m2 ``[out, in]``.
        scale_inv: float32 scales (the multiplier), laid out as ``block`` says.
        block: the ``(rows, cols)`` tile one scale covers.
        dtype: the dtype it dequantizes to.
        decode_dtype: the dtype each decoded value is rounded to before the cast to ``dtype``, or None
            (rounded to ``dtype`` alone); the loader sets it to the checkpoint's dtype where the model's
            differs, as the dense load rounds.
    """

    weight: jax.Array
    scale_inv: jax.Array
    block: tuple[int, int] = (128, 128)
    dtype: str = "bfloat16"
    decode_dtype: str | None = None

    def __post_init__(self) -> None:
        # a pair of Python ints from here on (an int n is (n, n)): a float, string or bool is refused now, with
        # the block-size message, and not later inside jit, where JAX compares it with other weights' blocks
        # as pytree metadata (an np.float32 block failed there with JAX's message, not this one)
        object.__setattr__(self, "block", _block_pair(self.block))

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense weight, torch layout ``[out, in]`` (the stored FP8 array's shape)."""
        return tuple(self.weight.shape)

    def dequantize(self, *, transpose: bool = False, dtype: Any = None) -> jax.Array:
        """The dense weight (``[in, out]`` with ``transpose``), in ``dtype`` (default: the stored dtype),
        rounded as ``roundings`` says before the cast to ``dtype``.

        On a mesh with explicit axes the result's rows are split like ``weight`` (replicated when they do
        not divide evenly).

        Raises:
            ValueError: a ``dtype`` or ``decode_dtype`` field that is not bfloat16, float16 or float32.
        """
        if (mesh := explicit_mesh(self)) is not None:
            return self._dequantize_with_auto_axes(self.weight, mesh, transpose, dtype)
        layout = fp8_scale_layout(self.weight.shape, self.scale_inv.shape, self.block)
        dense = dequantize_fp8(self.weight, self.scale_inv, block_size=layout.block, dtype=self.roundings[0],
                               transpose=transpose)  # fmt: skip
        return self._finish(dense, dtype)


jax.tree_util.register_dataclass(
    NF4Weight,
    data_fields=["packed", "absmax", "nested_absmax", "nested_code", "offset", "code"],
    meta_fields=["shape", "blocksize", "nested_blocksize", "quant_type", "dtype", "decode_dtype"],
)
jax.tree_util.register_dataclass(
    FP8Weight, data_fields=["weight", "scale_inv"], meta_fields=["block", "dtype", "decode_dtype"]
)

QuantizedWeight = NF4Weight | FP8Weight
_META = {
    "NF4Weight": ("shape", "blocksize", "nested_blocksize", "quant_type", "dtype", "decode_dtype"),
    "FP8Weight": ("block", "dtype", "decode_dtype"),
}
_OPTIONAL = {"decode_dtype"}  # absent from records written before it existed


def meta_fields(weight: NF4Weight | FP8Weight) -> dict[str, Any]:
    """A kept weight's fields that are no arrays (JSON-ready: tuples as lists, dtypes as names)."""
    out: dict[str, Any] = {}
    for name in _META[type(weight).__name__]:
        value = getattr(weight, name)
        if name in _OPTIONAL and value is None:
            continue  # as records written before the field existed: readable by those versions too
        out[name] = (
            list(value) if isinstance(value, tuple) else _dtype_name(value) if "dtype" in name else value
        )
    return out


def _dtype_name(value: Any) -> str:
    """A dtype field as a name (``"bfloat16"`` for ``jnp.bfloat16`` or ``jnp.dtype("bfloat16")``)."""
    try:
        return jnp.dtype(value).name
    except TypeError:
        return str(value)


def from_pieces(kind: str, pieces: Any, fields: dict[str, Any]) -> NF4Weight | FP8Weight:
    """The weight ``kind`` (``"NF4Weight"`` or ``"FP8Weight"``) from its arrays (``pieces``, a mapping of
    field name to array, as a checkpoint stores them) and :func:`meta_fields`' record.

    Raises:
        ValueError: an unknown kind, or pieces and fields that are not the kind's.
    """
    if kind not in _META:
        raise ValueError(f"unknown kept-weight kind {kind!r} (NF4Weight or FP8Weight)")
    cls = NF4Weight if kind == "NF4Weight" else FP8Weight
    static: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    if not set(_META[kind]) - _OPTIONAL <= set(static) <= set(_META[kind]) or not isinstance(pieces, dict):
        raise ValueError(f"a {kind} needs the fields {list(_META[kind])} and a mapping of its arrays")
    weight = cls(**dict(pieces), **static)
    weight.roundings  # noqa: B018  (raises ValueError for a dtype a kept weight cannot decode to)
    return weight


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a weight kept quantized (:class:`NF4Weight` or :class:`FP8Weight`)."""
    return isinstance(x, (NF4Weight, FP8Weight))


def quantized_nbytes(tree: Any) -> tuple[int, int]:
    """``(bytes held, bytes if every quantized weight were dense)`` over a pytree of parameters."""
    held = dense = 0
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized):
        if is_quantized(leaf):
            held += leaf.nbytes
            dense += leaf.dense_nbytes
        else:
            if jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)  # an nnx state's rng keys: their raw words
            size = int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
            held += size
            dense += size
    return held, dense
