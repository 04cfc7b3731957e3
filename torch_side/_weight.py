"""One entry point for every kind of quantized weight: torchao subclasses, bitsandbytes parameters,
FP8 weights with their scales, 4-bit weights with their quant state, and plain tensors."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch

from ._checks import bnb_kind, decodes_itself, require_tensor
from ._fp8 import FP8_DTYPES, dequantize_fp8
from ._int8 import dequantize_int8
from ._nf4 import dequantize


def is_quant_tensor_subclass(W: Any) -> bool:
    """Whether ``W`` is a tensor subclass (torchao's quantized tensors, bitsandbytes' ``Params4bit`` ...).

    A plain ``torch.Tensor`` or ``torch.nn.Parameter`` is not. torchao's quantized weights are
    Parameters too after ``quantize_`` (``isinstance(W, torch.nn.Parameter)`` holds), so the test is on
    the exact type. Such tensors must be dequantized before they are handed to another framework: their
    raw memory is not the values they stand for.
    """
    return isinstance(W, torch.Tensor) and type(W) not in (torch.Tensor, torch.nn.Parameter)


def _torchao_version() -> str:
    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cannot(W: torch.Tensor, why: str) -> NotImplementedError:
    kind = f"{type(W).__module__}.{type(W).__qualname__}"
    version = f" (torchao {_torchao_version()})" if type(W).__module__.startswith("torchao") else ""
    return NotImplementedError(f"cannot dequantize a {kind}{version}: {why}")


def _dequantize_subclass(W: torch.Tensor, backend: str) -> torch.Tensor:
    kind = bnb_kind(W)
    bnb_param: Any = W  # a bitsandbytes Parameter subclass: its attributes are bitsandbytes'
    if kind == "Params4bit":
        if not getattr(W, "bnb_quantized", False) or bnb_param.quant_state is None:
            return W.data  # not quantized yet: it still holds the dense weight
        return dequantize(W.data, bnb_param.quant_state, backend=backend)
    if kind == "Int8Params":
        if getattr(W, "SCB", None) is None:
            if W.dtype == torch.int8:  # its codes, their row scales elsewhere
                raise TypeError(
                    "W is a bitsandbytes Int8Params holding int8 codes without its row scales (W.SCB is None: "
                    "after a forward pass bitsandbytes keeps them in the module, module.state.SCB): "
                    "torch_side.dequantize_int8(W.data, module.state.SCB) decodes it"
                )
            return W.data  # not quantized yet
        # bitsandbytes' int8_vectorwise_dequant, its order of operations
        return dequantize_int8(W.data, bnb_param.SCB)
    if not decodes_itself(W):
        if type(W).__name__ == "DTensor":
            how = "hand over W.full_tensor() (the whole tensor) or W.to_local() (this process's shard)"
        else:
            how = "if its memory holds its values, hand over W.as_subclass(torch.Tensor)"
        raise _cannot(
            W, f"it is no quantized tensor qbridge knows (it has no dequantize() method of its own): {how}"
        )
    try:
        get_original = getattr(
            W, "get_original_weight", None
        )  # torchao NF4Tensor; its .dequantize is unrelated
        result = get_original() if callable(get_original) else W.dequantize()
    except NotImplementedError as e:
        raise _cannot(W, str(e) or "dequantize() is not implemented") from e
    except Exception as e:  # a missing kernel package, an unsupported device ...
        raise _cannot(W, f"{type(e).__name__}: {e}") from e
    if is_quant_tensor_subclass(result):
        raise _cannot(W, f"dequantize() returned another subclass, {type(result).__name__}")
    return result


def dequantize_weight(
    W: torch.Tensor,
    quant_state: Any = None,
    transpose: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Dequantizes any weight qbridge knows; plain weights pass through.

    Args:
        W: one of:

            - a torchao tensor subclass: ``NF4Tensor`` (through ``get_original_weight()``), ``Int8Tensor``,
              ``Float8Tensor``, ``IntxUnpackedToInt8Tensor`` and others (through ``dequantize()``);
            - a bitsandbytes ``Params4bit`` (its own ``quant_state`` unless one is given) or ``Int8Params``
              (float32 result);
            - a packed 4-bit weight with a bitsandbytes ``quant_state`` (see :func:`dequantize`);
            - a float8 weight with its scale (a tensor or a number) as ``quant_state`` (see :func:`dequantize_fp8`);
            - a torch-quantized tensor (``W.is_quantized``);
            - a plain tensor or Parameter, returned as it is (a float8 tensor without a scale included).
        quant_state: a 4-bit quant state, an FP8 scale (tensor or number), or None.
        transpose: return ``[in, out]`` for a 2-D ``[out, in]`` weight (``result.t()``, a view).
        backend: passed on to the 4-bit and FP8 functions.

    Returns:
        The dense weight. Dequantized results are new memory; a plain ``W`` is returned itself (or its
        ``.t()`` view), so the result aliases ``W`` then. Dequantization runs under ``torch.no_grad()``.

    Raises:
        NotImplementedError: a tensor subclass that cannot dequantize here (names its type, torchao's
            version for torchao's, and for a subclass without a decode, such as a DTensor, how to hand over
            its values).
        TypeError: a quant state of the wrong kind for ``W`` (see :func:`dequantize`, :func:`dequantize_fp8`);
            an ``Int8Params`` holding int8 codes without its ``SCB`` (bitsandbytes keeps it in the module's
            ``state`` after a forward pass: ``torch_side.dequantize_int8(W.data, module.state.SCB)`` decodes it).
        ValueError: a quant state whose pieces do not fit ``W``.
    """
    require_tensor(W, "W")
    with torch.no_grad():
        if isinstance(quant_state, torch.Tensor) or (W.dtype in FP8_DTYPES and quant_state is not None):
            if W.dtype not in FP8_DTYPES:
                raise TypeError(
                    f"a tensor quant_state is an FP8 scale, but W is {W.dtype}, not float8; a 4-bit weight "
                    "takes a bitsandbytes QuantState"
                )
            result = dequantize_fp8(W, quant_state, backend=backend)
        elif quant_state is not None:
            result = dequantize(W, quant_state, backend=backend)
        elif W.is_quantized:
            result = W.dequantize()
        elif is_quant_tensor_subclass(W):
            result = _dequantize_subclass(W, backend)
        else:
            result = W
    if transpose:
        if result.dim() != 2:
            raise ValueError(f"transpose=True needs a 2-D weight, got shape {tuple(result.shape)}")
        result = result.t()
    return result
