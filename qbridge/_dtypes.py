"""The dtypes torch, JAX and safetensors share, derived from the libraries themselves rather than written out.

torch and JAX name their dtypes alike (``float8_e4m3fn``, ``bfloat16``, ``uint16`` ...): a dtype crosses
when both have it under the same name with the same number of bits (``torch.int4`` is a placeholder
without storage, ``jnp.int4`` packs four bits: they do not cross). safetensors names dtypes in its format
specification (``F8_E8M0``, ``BF16`` ...); each maps to the torch dtype of the same meaning where this
torch has it.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import torch

# the safetensors format's dtype names -> torch attribute names
SAFETENSORS = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
    "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
    "F64": "float64", "C64": "complex64", "C128": "complex128", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}  # fmt: skip


def _bits(dtype: Any) -> int:
    dtype = np.dtype(dtype)
    if dtype == np.bool_ or dtype.kind == "c":
        return dtype.itemsize * 8
    try:
        return int(jnp.finfo(dtype).bits)
    except (ValueError, TypeError):
        try:
            return int(jnp.iinfo(dtype).bits)
        except (ValueError, TypeError):
            return dtype.itemsize * 8


def _shared() -> dict[torch.dtype, np.dtype]:
    out: dict[torch.dtype, np.dtype] = {}
    for name in dir(torch):
        t = getattr(torch, name)
        if not isinstance(t, torch.dtype) or t in out:
            continue
        j = getattr(jnp, str(t).replace("torch.", ""), None)
        if j is None:
            continue
        try:
            jd = np.dtype(j)
        except TypeError:
            continue
        if _bits(jd) == t.itemsize * 8:
            out[t] = jd
    return out


TORCH_TO_JAX: dict[torch.dtype, np.dtype] = _shared()
JAX_TO_TORCH: dict[np.dtype, torch.dtype] = {v: k for k, v in TORCH_TO_JAX.items()}


def jax_dtype(dtype: torch.dtype) -> np.dtype:
    """The JAX dtype of a torch dtype.

    Raises:
        TypeError: JAX has no dtype of that name and width (the message says so).
    """
    if dtype not in TORCH_TO_JAX:
        raise TypeError(
            f"JAX has no {str(dtype).replace('torch.', '')} (torch's {dtype}); convert the tensor first"
        )
    return TORCH_TO_JAX[dtype]


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype of a JAX/numpy dtype.

    Raises:
        TypeError: this torch has no dtype of that name and width (the message says so).
    """
    dtype = np.dtype(dtype)
    if dtype not in JAX_TO_TORCH:
        raise TypeError(
            f"torch {torch.__version__} has no {dtype.name} (JAX's {dtype}); convert the array first"
        )
    return JAX_TO_TORCH[dtype]


def safetensors_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name, or None where this torch has none."""
    attr = SAFETENSORS.get(name)
    return getattr(torch, attr, None) if attr else None
