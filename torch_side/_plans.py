"""Plans: what a repeated dequantization call needs, remembered after its first call was checked.

A checkpoint or a model holds many weights of few distinct shapes and dtypes, and users call the
functions one weight at a time. The first call of each kind goes through every check and picks its
kernel; its plan is stored under a key made of everything those checks and that choice read (each
tensor's type, dtype, shape, device, contiguity and pointer alignment, and the other arguments). A later
call with an equal key was going to pass the same checks and make the same choice, so it only allocates
its output and launches (``_launch.Launcher``), or calls the CPU's C kernel (``_native``): plans exist for
the Triton path on CUDA and for the C kernel on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch

FP8_PLANS: dict[tuple[Any, ...], Any] = {}
FP8_CPU_PLANS: dict[tuple[Any, ...], Any] = {}  # CPU FP8 calls through the C kernel (_fp8.FP8CpuPlan)
NF4_PLANS: dict[tuple[Any, ...], Any] = {}
MAX_PLANS = 4096  # per format; a process that makes more starts over (the first calls pay the checks again)


def tensor_key(t: torch.Tensor) -> tuple[Any, ...]:
    """What a plan depends on in one tensor: type, dtype, shape, device, contiguity, 16-byte alignment."""
    return (type(t), t.dtype, t.shape, t.device, t.is_contiguous(), not t.data_ptr() % 16)


def remember(plans: dict[tuple[Any, ...], Any], key: tuple[Any, ...], plan: Any) -> None:
    if len(plans) >= MAX_PLANS:
        plans.clear()
    plans[key] = plan
