"""The 16-entry code tables of bitsandbytes' 4-bit formats, as bitsandbytes builds them in float32.

Index ``q`` (a nibble; the high nibble of a byte is the even element) decodes to ``TABLE[q] * absmax``.
The values are bitsandbytes' ``get_4bit_type(...)`` tables written out exactly (each float32 value in
its shortest decimal form), so the torch path needs no bitsandbytes at all, with one difference that
follows bitsandbytes' CUDA kernel rather than its table: FP4 nibble ``0b1000`` (sign bit, zero
magnitude) is ``-0.0``. The CUDA kernel computes ``(0 * absmax) * -1``, a negative zero, while the table
and bitsandbytes' CPU and pure-torch paths hold ``+0.0``. The two are equal as numbers, not as bits.
"""

from __future__ import annotations

import functools

import torch

from ._checks import tracing

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


@functools.cache
def _code_on(quant_type: str, device: torch.device) -> torch.Tensor:
    return torch.tensor(CODES[quant_type], dtype=torch.float32, device=device)


def standard_code(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The float32 table of ``quant_type`` (``"nf4"`` or ``"fp4"``) on ``device``, cached: do not write to it.
    A traced call (``FakeTensorMode``, ``make_fx``, ``torch.compile``; see ``_checks.tracing``) gets a new
    one, made under its tracer and not cached: a fake table kept for later calls crashed them."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if tracing():
        return _code_on.__wrapped__(quant_type, device)
    return _code_on(quant_type, device)


def is_standard_code(code: torch.Tensor, quant_type: str) -> bool:
    """Whether ``code`` equals the standard table of ``quant_type`` (a host sync when on a GPU)."""
    if code.numel() != 16 or code.dtype != torch.float32:
        return False
    return bool(torch.equal(code.reshape(-1), standard_code(quant_type, code.device)))


def pairs_of(code: torch.Tensor) -> torch.Tensor:
    """The byte-pair table of a 16-entry ``code``: row ``b`` is ``(code[b >> 4], code[b & 15])``, the two
    values a packed byte ``b`` decodes to (before scaling). float32 ``[256, 2]``, on ``code``'s device."""
    index = torch.arange(256, device=code.device)
    return torch.stack((code[index >> 4], code[index & 15]), dim=-1).contiguous()


@functools.cache
def _pairs_on(quant_type: str, device: torch.device) -> torch.Tensor:
    return pairs_of(_code_on(quant_type, device))


def standard_pairs(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`pairs_of` the standard table, cached per device: do not write to it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if tracing():  # made under the tracer, not cached (see standard_code)
        return pairs_of(_code_on.__wrapped__(quant_type, device))
    return _pairs_on(quant_type, device)
