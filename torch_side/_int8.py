"""bitsandbytes 8-bit (LLM.int8) weights: int8 ``CB`` with float32 row absmax ``SCB``.

The value is bitsandbytes' own ``int8_vectorwise_dequant``, in its order of operations:
``(float32(CB) * SCB[row]) * 7.874015718698502e-3`` (1/127 as bitsandbytes writes it), two float32
roundings. ``CB * (SCB / 127)`` rounds differently in about a quarter of the values.
"""

from __future__ import annotations

import torch

from ._checks import on_device, out_dtype, plain, require_tensor, same_device

RECIPROCAL_127 = 7.874015718698502e-3  # bitsandbytes' constant, multiplied in float32


def dequantize_int8(
    CB: torch.Tensor, SCB: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantizes a bitsandbytes 8-bit weight exactly as ``bitsandbytes.functional.int8_vectorwise_dequant``.

    Args:
        CB: int8 ``[rows, cols]`` (any rank: rows are the first axis).
        SCB: float32 ``[rows]`` (or ``[rows, 1]``): each row's absmax.
        dtype: the result dtype (a torch.dtype, or its name: ``"bfloat16"``); the float32 value is rounded
            once more to it (float32: unchanged).

    Returns:
        A new tensor of ``CB``'s shape on ``CB``'s device.

    Raises:
        TypeError: ``CB`` is not int8, ``SCB`` not floating, or ``dtype`` not float16, bfloat16 or float32.
        ValueError: ``SCB`` does not have one value per row, or lives on another device.
    """
    CB, SCB = plain(require_tensor(CB, "CB")), plain(require_tensor(SCB, "SCB"))
    if CB.dtype != torch.int8:
        raise TypeError(f"CB must be int8, got {CB.dtype}")
    if not SCB.is_floating_point():
        raise TypeError(f"SCB must be floating (bitsandbytes stores float32), got {SCB.dtype}")
    dtype = out_dtype(dtype)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
    rows = CB.shape[0] if CB.dim() else 1
    if SCB.numel() != rows:
        raise ValueError(f"SCB has {SCB.numel()} values for the {rows} rows of a {tuple(CB.shape)} weight")
    same_device(CB.device, SCB=SCB)
    with on_device(CB.device), torch.no_grad():
        scale = SCB.to(torch.float32).reshape(rows, *([1] * max(CB.dim() - 1, 0)))
        out = CB.to(torch.float32) * scale * RECIPROCAL_127
    out = out.reshape(CB.shape)  # a 0-d CB's one row was made [1]
    return out if dtype == torch.float32 else out.to(dtype)
