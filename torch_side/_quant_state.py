"""One normalized view of a bitsandbytes 4-bit quantization state.

bitsandbytes describes a 4-bit weight in two ways: the ``QuantState`` class (0.42 and newer) and the nested
list of 0.41 and older::

    [absmax, shape, dtype, blocksize, [offset, state2], quant_type, code]   # nested (double quant)
    [absmax, shape, dtype, blocksize, None,             quant_type, code]   # plain absmax
    state2 = [absmax2, code2, blocksize2, nested, dtype2, offset2, state3]

Both are read into :class:`FourBitState`, which names each piece the way a serialized checkpoint does
(``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map``, ``nested_offset``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from ._integers import as_int

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# dtypes bitsandbytes stores packed 4-bit data in (``quant_storage``); the bytes are what count.
PACKED_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)

LEGACY_LAYOUT = "[absmax, shape, dtype, blocksize, [offset, state2] | None, quant_type, code]"


@dataclasses.dataclass(frozen=True)
class FourBitState:
    """The pieces that describe one 4-bit weight.

    Attributes:
        absmax: per-block scales, ``ceil(numel / blocksize)`` entries: float32, or uint8 when nested.
        shape: the dequantized weight's shape.
        dtype: the dequantized weight's dtype (float16, bfloat16 or float32).
        blocksize: elements per absmax block.
        quant_type: ``"nf4"`` or ``"fp4"``.
        code: the 16-entry float32 table, or None for the standard table of ``quant_type``.
        nested_absmax: float32 scales of the nested absmax code, or None when ``absmax`` is plain.
        nested_code: the 256-entry float32 table of the nested absmax code.
        nested_blocksize: absmax entries per nested block.
        offset: added to the decoded nested absmax (a float or a one-element tensor).
    """

    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    quant_type: str = "nf4"
    code: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = 256
    offset: float | torch.Tensor = 0.0

    @property
    def nested(self) -> bool:
        """True when the absmax is itself quantized (bitsandbytes' double quantization)."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Number of elements of the dense weight, ``prod(shape)``."""
        return math.prod(self.shape)

    def pieces(self) -> dict[str, Any]:
        """Keyword arguments for :func:`torch_side.dequantize_nf4`."""
        return {
            "shape": self.shape,
            "blocksize": self.blocksize,
            "code": self.code,
            "nested_absmax": self.nested_absmax,
            "nested_code": self.nested_code,
            "nested_blocksize": self.nested_blocksize,
            "offset": self.offset,
            "quant_type": self.quant_type,
            "dtype": self.dtype,
        }


def _shape(value: Any, where: str) -> tuple[int, ...]:
    """``value`` (a sequence of ints of any kind) as a tuple of ints.

    Raises:
        ValueError: not a sequence of ints (floats are not truncated), or a negative size.
    """
    try:
        # a torch.Size holds ints already (its conversion alone costs 0.5 us of a 64x64 call's 9)
        shape = tuple(value) if type(value) is torch.Size else tuple(as_int(s, "a size") for s in value)
    except TypeError:
        raise ValueError(f"{where}: shape must be a sequence of ints, got {value!r}") from None
    if shape and min(shape) < 0:
        raise ValueError(f"{where}: shape {shape} has a negative size")
    return shape


def quant_state_pieces(quant_state: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(absmax, keyword arguments of torch_side.dequantize_nf4)`` for any state
    :func:`parse_quant_state` reads, the same values and errors; a ``QuantState`` is read directly (without
    a :class:`FourBitState`, whose frozen fields cost 1-2 us of every call)."""
    if isinstance(quant_state, (FourBitState, list, tuple)) or not (
        hasattr(quant_state, "absmax") and hasattr(quant_state, "blocksize")
    ):
        state = parse_quant_state(quant_state)
        return state.absmax, state.pieces()
    return _quant_state_object_pieces(quant_state)


def _quant_state_object_pieces(qs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    absmax, shape, dtype = getattr(qs, "absmax", None), getattr(qs, "shape", None), getattr(qs, "dtype", None)
    blocksize, quant_type = getattr(qs, "blocksize", None), getattr(qs, "quant_type", None)
    if absmax is None or shape is None or dtype is None or blocksize is None or quant_type is None:
        missing = [
            a for a in ("absmax", "shape", "dtype", "blocksize", "quant_type") if getattr(qs, a, None) is None
        ]
        raise ValueError(
            f"incomplete QuantState: {', '.join(missing)} missing. A 4-bit QuantState needs absmax, shape, "
            "dtype, blocksize and quant_type; rebuild it with bitsandbytes' QuantState.from_dict(...)"
        )
    state2 = getattr(qs, "state2", None)
    nested = state2 is not None
    if nested and (getattr(state2, "absmax", None) is None or getattr(state2, "code", None) is None):
        raise ValueError("incomplete QuantState: its nested state2 lacks absmax or code")
    offset = getattr(qs, "offset", None)
    if nested and offset is None:
        raise ValueError("incomplete QuantState: nested (double-quant) state without offset")
    return absmax, {
        "shape": _shape(shape, "QuantState"),
        "blocksize": as_int(blocksize, "QuantState: blocksize"),
        "code": getattr(qs, "code", None),
        "nested_absmax": state2.absmax if state2 is not None else None,
        "nested_code": state2.code if state2 is not None else None,
        "nested_blocksize": as_int(state2.blocksize, "QuantState: state2.blocksize")
        if state2 is not None
        else 256,
        "offset": offset if nested else 0.0,
        "quant_type": quant_type,
        "dtype": dtype,
    }


def _from_quant_state_object(qs: Any) -> FourBitState:
    absmax, pieces = _quant_state_object_pieces(qs)
    return FourBitState(absmax=absmax, **pieces)


def _from_legacy_list(qs: Sequence[Any]) -> FourBitState:
    if len(qs) not in (6, 7):
        raise ValueError(
            f"legacy quant_state list has {len(qs)} entries; bitsandbytes <= 0.41 wrote 6 or 7: {LEGACY_LAYOUT}"
        )
    absmax, shape, dtype, blocksize, compressed, quant_type = qs[:6]
    code = qs[6] if len(qs) == 7 else None
    if not isinstance(absmax, torch.Tensor):
        raise ValueError(
            f"legacy quant_state: entry 0 (absmax) must be a tensor, got {type(absmax).__name__}"
        )
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"legacy quant_state: entry 2 (dtype) must be a torch.dtype, got {dtype!r}")
    nested_absmax = nested_code = None
    nested_blocksize, offset = 256, 0.0
    if compressed is not None:
        if not isinstance(compressed, (list, tuple)) or len(compressed) != 2:
            raise ValueError(
                f"legacy quant_state: entry 4 must be [offset, state2] or None, got {type(compressed).__name__}"
            )
        offset, state2 = compressed
        if not isinstance(state2, (list, tuple)) or len(state2) < 3:
            raise ValueError(
                "legacy quant_state: state2 must be the list [absmax2, code2, blocksize2, ...] that "
                "bitsandbytes' quantize_blockwise returned"
            )
        nested_absmax, nested_code = state2[0], state2[1]
        nested_blocksize = as_int(state2[2], "legacy quant_state: state2's blocksize (entry 2)")
    return FourBitState(
        absmax=absmax,
        shape=_shape(shape, "legacy quant_state"),
        dtype=dtype,
        blocksize=as_int(blocksize, "legacy quant_state: entry 3 (blocksize)"),
        quant_type=quant_type,
        code=code,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
        nested_blocksize=nested_blocksize,
        offset=offset,
    )


def parse_quant_state(quant_state: Any) -> FourBitState:
    """Reads a ``bitsandbytes.functional.QuantState``, a legacy list, or a :class:`FourBitState`.

    Raises:
        ValueError: the state is incomplete or not laid out as bitsandbytes writes it.
        TypeError: ``quant_state`` is none of the accepted kinds.
    """
    if isinstance(quant_state, FourBitState):
        return quant_state
    if isinstance(quant_state, (list, tuple)):
        return _from_legacy_list(quant_state)
    if hasattr(quant_state, "absmax") and hasattr(quant_state, "blocksize"):
        return _from_quant_state_object(quant_state)
    raise TypeError(
        f"quant_state must be a bitsandbytes QuantState or the legacy list {LEGACY_LAYOUT}; "
        f"got {type(quant_state).__name__}"
    )
