"""Input checks shared by the dequantization functions: one message style everywhere."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, TypeVar

import torch

_T = TypeVar("_T")


def require_tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def bnb_kind(W: torch.Tensor) -> str | None:
    """The name of ``W``'s bitsandbytes parameter class (``"Params4bit"``, ``"Int8Params"``), or None."""
    return type(W).__name__ if type(W).__module__.startswith("bitsandbytes") else None


def decodes_itself(W: torch.Tensor) -> bool:
    """Whether ``W``'s class has a decode of its own: torchao's NF4Tensor ``get_original_weight()`` (its
    ``dequantize`` is unrelated), other subclasses a ``dequantize()`` that is not torch's."""
    return callable(getattr(W, "get_original_weight", None)) or getattr(type(W), "dequantize", None) not in (
        None,
        torch.Tensor.dequantize,
    )


def quantized_otherwise(W: torch.Tensor) -> str | None:
    """What ``W`` is where it holds a weight quantized in a format other than bitsandbytes 4-bit (whose
    values are not its memory): a torch-quantized tensor, a quantized bitsandbytes ``Int8Params``, or a tensor
    subclass with a dequantize method of its own (torchao's); None for anything else."""
    kind = f"{type(W).__module__}.{type(W).__qualname__}"
    if W.is_quantized:
        return f"a torch-quantized tensor ({W.dtype})"
    if bnb_kind(W) == "Int8Params":
        quantized = getattr(W, "SCB", None) is not None or W.dtype == torch.int8  # SCB moved to its module
        return f"a quantized {kind} (8-bit)" if quantized else None
    if type(W) in (torch.Tensor, torch.nn.Parameter):
        return None
    return f"a {kind}" if decodes_itself(W) else None


_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def out_dtype(dtype: Any, error: type[Exception] = TypeError) -> Any:
    """``dtype``, or the torch dtype its name names (``"bfloat16"``, ``"torch.float16"``: as a quant-state
    JSON or ``jax_side`` writes it). A name of anything else raises ``error``; other values are left to the
    caller's check."""
    if isinstance(dtype, str):
        found = _DTYPE_NAMES.get(dtype.removeprefix("torch."))
        if found is None:
            raise error(
                f"output dtype must be float16, bfloat16 or float32 (a torch.dtype or its name), got {dtype!r}"
            )
        return found
    return dtype


CPU = torch.device("cpu")  # where the C kernels write (not the default device, which may be another)
functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # vmap, grad, jvp: no storage of its own


def tracing() -> bool:
    """Whether this call is traced or transformed rather than run: ``torch.compile`` traces it, a
    ``TorchDispatchMode`` is active (``FakeTensorMode``, ``make_fx``'s tracer, a user's mode), a functorch
    transform runs it (``torch.func.functionalize``, ``vmap``, ``grad``, ``jvp``), or ``torch.jit.trace``
    records it. The kernels, which read and write memory through pointers, and the plans, which launch
    them, are left out of such a call, which takes the torch path (plain torch operations, which the
    tracer sees; the same bits). There, pointers are not the values a kernel reads or memory it may write
    (seen: ``torch.compile`` of ``dequantize_fp8`` on the CPU gave garbage through the C kernel; under
    ``functionalize`` and ``FakeTensorMode`` the CPU kernel wrote through a null pointer; ``make_fx`` and
    ``torch.jit.trace`` recorded only the empty result)."""
    return (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch._C._is_tracing()
    )


def resolved(t: _T) -> _T:
    """``t`` with a lazy negation or conjugation (``torch._neg_view``, ``.conj()``) applied: kernels read a
    tensor's memory through its pointer, which holds the values before it. Anything else as it is."""
    if isinstance(t, torch.Tensor) and (t.is_neg() or t.is_conj()):
        return t.resolve_conj().resolve_neg()  # type: ignore[return-value]  # _T is that tensor's type
    return t


def plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a plain ``torch.Tensor`` sharing its memory (drops Parameter and bitsandbytes wrappers)."""
    return t if type(t) is torch.Tensor else t.data


def same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    """Raises ValueError naming every tensor that is not on ``device``."""
    off = {k: v.device for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.device != device}
    if off:
        where = ", ".join(f"{k} on {d}" for k, d in off.items())
        raise ValueError(
            f"all inputs must be on the weight's device {device}; got {where}. Move them with .to({str(device)!r})"
        )


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raises ValueError when ``t`` holds NaN or Inf. On a GPU this waits for ``t`` (a host sync)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    if t.element_size() == 1:  # float8 (an e8m0 scale's NaN is finite to torch.isfinite): widened, exactly
        t = t.float()
    bad = ~torch.isfinite(t)
    count = int(bad.sum())
    if count:
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} holds {count} non-finite value(s) (NaN or Inf), the first at index {first}: "
            f"{t[first].item()!r}. The checkpoint is damaged there, or pass check_finite=False to let "
            "them propagate like the reference does"
        )


def raise_out_mismatch(shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor) -> None:
    """The ``out=`` contract of the 4-bit functions: a mismatch is an AssertionError (even under ``-O``)."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise AssertionError(
            f"out must have shape {tuple(shape)} and dtype {dtype}; got shape {tuple(out.shape)} and dtype {out.dtype}"
        )


_NOTHING = contextlib.nullcontext()


def on_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Makes ``device`` current for CUDA tensors, so their work goes on that device's current stream (a
    no-op when it is current already)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NOTHING


class BlockSizeUnknown(ValueError):
    """An FP8 scale grid leaves the block size open (no block fits it, or several that tile differently):
    ``reason`` says why, ``hint`` how to give it (``block_size=``); the message is both."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(f"{reason}; {hint}")
        self.reason, self.hint = reason, hint


def numbered(index: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, its TypeError, ValueError or AssertionError prefixed with ``weights[index]: ``
    (the many-weights functions)."""
    try:
        return fn(*args, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        if isinstance(e, BlockSizeUnknown):  # numbered as the others, keeping its class
            raise BlockSizeUnknown(f"weights[{index}]: {e.reason}", e.hint) from e
        if type(e) not in (TypeError, ValueError, AssertionError):
            raise  # a subclass: as it came
        raise type(e)(f"weights[{index}]: {e}") from e


def as_list(items: Any, name: str) -> list[Any]:
    """``items`` (a list, tuple or other iterable of per-weight values) as a list.

    Raises:
        TypeError: ``items`` is a single tensor (whose rows would be taken for weights), a mapping (whose keys
            would be), or not iterable.
    """
    if isinstance(items, Mapping):
        raise TypeError(
            f"{name} must be a list of per-weight values, got a {type(items).__name__}: pass its "
            "list(....values()) (iterating a mapping gives its keys)"
        )
    if isinstance(items, torch.Tensor) or not hasattr(items, "__iter__") or isinstance(items, (str, bytes)):
        raise TypeError(f"{name} must be a list of per-weight values, got a {type(items).__name__}")
    return list(items)
