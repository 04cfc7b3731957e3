"""The 16-entry code tables of bitsandbytes' 4-bit formats, as float32 values (bitsandbytes' own tables,
written out exactly; tests check them against bitsandbytes and torch_side). As in ``torch_side``, FP4
nibble ``0b1000`` is ``-0.0``, which is what bitsandbytes' CUDA kernel produces (its table says +0.0)."""

from __future__ import annotations

import numpy as np

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0,
    0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)  # fmt: skip

CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def standard_code(quant_type: str) -> np.ndarray:
    """The float32 table of ``quant_type`` (``"nf4"`` or ``"fp4"``) as a new numpy array."""
    if quant_type not in CODES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return np.asarray(CODES[quant_type], dtype=np.float32)
