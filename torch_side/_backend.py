"""Which implementation dequantizes a tensor: decided here and nowhere else.

Backends:
    ``"bnb"``     bitsandbytes' own registered ops (``torch.ops.bitsandbytes.*``), 4-bit only. "auto" uses
                  them on CUDA only: bitsandbytes' CPU kernel is not bit-identical to its CUDA kernel.
    ``"torch"``   plain torch; runs on every device and is the oracle the others are tested against.
    ``"triton"``  the fused Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Literal

import torch

from ._checks import tracing
from ._native import switched_off

log = logging.getLogger("torch_side")

Backend = Literal["auto", "triton", "bnb", "torch"]
BACKENDS = ("auto", "triton", "bnb", "torch")

BNB_MISSING = "the 'bnb' backend needs bitsandbytes: pip install 'qbridge[bnb]'"
TRITON_MISSING = "the 'triton' backend needs triton: pip install 'qbridge[triton]'"


@functools.cache
def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_kernels_available() -> bool:
    """True when the Triton kernels of this package exist and triton imports."""
    if not has_module("triton"):
        return False
    return importlib.util.find_spec("torch_side.kernels") is not None


@functools.cache
def bnb_cpu_avx512_kernel() -> bool:
    """Whether bitsandbytes' CPU ``dequantize_4bit`` takes its native kernel's AVX-512 path on this machine,
    the one that restarts blocks at every row. bitsandbytes 0.50 registers its native CPU kernel wherever its
    library loads (``backends/cpu/ops.py``); on CPUs without AVX-512 (torch's CPU capability) the kernel's
    other path counts blocks over the flat tensor, as the format does (``tests/torch_side/test_nf4.py``
    checks this against the registered op). Other versions are taken to restart blocks."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("bitsandbytes")
    except PackageNotFoundError:
        return False
    if release.split(".")[:2] == ["0", "50"]:
        return torch.backends.cpu.get_cpu_capability() == "AVX512"
    return True


def bnb_cpu_kernel_restarts_blocks(shape: tuple[int, ...], blocksize: int) -> bool:
    """Whether bitsandbytes' native CPU ``dequantize_4bit`` may give wrong values for ``shape`` (conservative).

    bitsandbytes 0.50's CPU kernel restarts its blocks at every row, while the format (and the CUDA
    kernel) counts blocks over the flat row-major tensor: the two agree only when each row is a whole
    number of blocks. (Odd last dimensions go to bitsandbytes' own exact fallback; 1-D shapes come back
    as ``[1, n]``.)
    """
    if shape and shape[-1] % 2:
        return False
    return not (len(shape) >= 2 and shape[-1] % blocksize == 0)


def _check_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _triton_usable(device: torch.device) -> str | None:
    """None when Triton can run on ``device``, else the reason it cannot."""
    if not triton_kernels_available():
        return TRITON_MISSING
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    if device.type == "cpu":
        return "Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before importing triton"
    return f"Triton kernels run on CUDA devices, not {device.type}"


def choose_4bit_backend(
    device: torch.device,
    requested: str,
    *,
    shape: tuple[int, ...],
    blocksize: int,
    quant_type: str,
    standard_code: bool,
) -> str:
    """The backend for one 4-bit dequantization.

    Args:
        device: where the packed weight lives.
        requested: ``"auto"`` or a backend name the caller insists on.
        shape: the dequantized shape.
        blocksize: the absmax block size.
        quant_type: ``"nf4"`` or ``"fp4"``.
        standard_code: whether the 16-entry table is bitsandbytes' standard table for its quant type
            (bitsandbytes' kernels hard-code those tables and ignore any other).

    Raises:
        ValueError: the requested backend cannot give correct values here, or is unknown.
        ImportError: the requested backend's package is missing.
    """
    _check_name(requested)
    if requested == "triton":
        reason = _triton_usable(device)
        if reason is not None:
            raise (ImportError if reason == TRITON_MISSING else ValueError)(reason)
        return "triton"
    if requested == "bnb":
        if not has_module("bitsandbytes"):
            raise ImportError(BNB_MISSING)
        if not standard_code:
            raise ValueError(
                "backend='bnb' cannot use a custom 4-bit code table: bitsandbytes' kernels hard-code the "
                "standard NF4/FP4 tables. Use backend='torch' or 'auto'."
            )
        if (
            device.type == "cpu"
            and bnb_cpu_avx512_kernel()
            and bnb_cpu_kernel_restarts_blocks(shape, blocksize)
        ):
            raise ValueError(
                f"backend='bnb' on CPU can give wrong values for shape {tuple(shape)} with blocksize {blocksize}: "
                "bitsandbytes' native CPU dequantize_4bit (on this CPU) restarts blocks at every row, so where "
                "the last dimension is not a multiple of the blocksize its values are wrong for most shapes. "
                "Use backend='auto' or 'torch'."
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='bnb' is supported here on cpu and cuda, not {device.type}")
        return "bnb"
    if requested == "torch":
        return "torch"

    if tracing():  # torch.compile traces the torch path (and compiles it); a kernel's pointers it cannot
        return "torch"
    # auto. bitsandbytes' CPU kernel is never chosen: besides the row-restart bug it differs from the CUDA
    # kernel by CPU (seen: FP4's zero sign, and 109 of 4.1M fp16 roundings at 576x7168 on one AVX-512 host).
    if device.type == "cuda" and _triton_usable(device) is None:
        choice, why = "triton", "CUDA tensor and the Triton kernels are available"
    elif device.type == "cuda" and has_module("bitsandbytes") and standard_code:
        choice, why = "bnb", "bitsandbytes' CUDA kernel"
    elif not standard_code:
        choice, why = "torch", "custom code table"
    elif device.type == "cpu" and switched_off():
        choice, why = "torch", "torch's operations (QBRIDGE_CPU_KERNEL turns qbridge's C kernel off)"
    elif device.type == "cpu":  # "torch" names both CPU routes, which give the same bits
        choice, why = "torch", "qbridge's C kernel once it is loaded (logged), else torch's operations"
    else:
        choice, why = "torch", f"the exact torch path for {device.type} tensors"
    log.debug("4-bit dequantization backend %s: %s", choice, why)
    return choice


TRITON_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def choose_fp8_backend(device: torch.device, requested: str, dtype: torch.dtype = torch.float8_e4m3fn) -> str:
    """The backend for one FP8 dequantization (``"triton"`` or ``"torch"``) of a ``dtype`` weight."""
    _check_name(requested)
    if requested == "bnb":
        raise ValueError("backend='bnb' has no FP8 dequantization; use 'auto', 'triton' or 'torch'")
    if requested == "triton":
        if dtype not in TRITON_FP8:
            raise ValueError(
                f"the Triton FP8 kernel reads float8_e4m3fn and float8_e5m2, not {dtype}; use backend='torch'"
            )
        reason = _triton_usable(device)
        if reason is not None:
            raise (ImportError if reason == TRITON_MISSING else ValueError)(reason)
        return "triton"
    if requested == "torch" or tracing():  # torch.compile traces the torch path (see choose_4bit_backend)
        return "torch"
    choice = (
        "triton"
        if device.type == "cuda" and dtype in TRITON_FP8 and _triton_usable(device) is None
        else "torch"
    )
    log.debug("FP8 dequantization backend %s for a %s tensor", choice, device.type)
    return choice
