"""Process setup that torch + JAX users trip over: JAX's GPU preallocation, and JAX silently on the CPU.

JAX reserves 75 % of every GPU it initializes unless ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is set before
its GPU backend starts; torch then has a quarter of the card. Importing qbridge before JAX initializes
its backends sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless you chose any XLA client memory
setting yourself. If JAX had already started with preallocation, the first GPU handoff warns once
(a ``ResourceWarning``).

A jaxlib without CUDA support falls back to the CPU with only a log line; a CUDA tensor handed to such a
JAX would silently cross through host memory. qbridge raises instead (see :func:`jax_gpu_for`).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Any

import jax

log = logging.getLogger("qbridge")

MEMORY_SETTINGS = (
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "XLA_PYTHON_CLIENT_ALLOCATOR",
)


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # the private helper moved: assume the worst, change nothing
        return True


def configure_jax_memory() -> bool:
    """Turns JAX's GPU preallocation off if JAX has not started its backends and nobody chose a setting.

    Returns True when it set ``XLA_PYTHON_CLIENT_PREALLOCATE=false``.
    """
    if any(name in os.environ for name in MEMORY_SETTINGS) or _backends_initialized():
        return False
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    log.debug("set XLA_PYTHON_CLIENT_PREALLOCATE=false so that torch and JAX can share the GPU")
    return True


def preallocating() -> bool:
    """Whether this process's JAX reserves a large share of each GPU up front (its default)."""
    if os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").lower() == "platform":
        return False
    return os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true").lower() not in ("false", "0")


@functools.cache
def _warn_if_preallocated(device: Any) -> None:
    # JAX reserves the memory at its first allocation on the device, so memory_stats cannot tell yet:
    # the settings the backend started with can.
    if not preallocating():
        return
    fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
    warnings.warn(
        f"JAX preallocates {float(fraction):.0%} of {device}'s memory, which torch shares here and may "
        "run out of. Set XLA_PYTHON_CLIENT_PREALLOCATE=false before JAX starts (importing qbridge before "
        "JAX uses the GPU does it for you).",
        ResourceWarning,
        stacklevel=4,
    )


@functools.cache
def _gpu_devices() -> dict[int, Any]:
    try:
        devices = jax.local_devices(backend="gpu")
    except RuntimeError:
        return {}
    return {d.local_hardware_id: d for d in devices}


def jax_gpu_for(index: int) -> Any | None:
    """The local JAX GPU with hardware id ``index`` (torch's ``cuda:index``), or None if JAX has none."""
    device = _gpu_devices().get(index)
    if device is not None:
        _warn_if_preallocated(device)
    return device


def no_jax_gpu_message(index: int) -> str:
    if not _gpu_devices():
        return (
            f"the tensor is on cuda:{index}, but JAX has no GPU backend (it runs on "
            f"{jax.default_backend()}): a jaxlib without CUDA fell back to the CPU. Install JAX for CUDA "
            "(pip install 'jax[cuda13]' or 'jax[cuda12]'), or pass device=jax.devices('cpu')[0] to copy the "
            "tensor through host memory"
        )
    return (
        f"the tensor is on cuda:{index}, which JAX does not see (its GPUs: "
        f"{sorted(_gpu_devices())}; check CUDA_VISIBLE_DEVICES). Pass device= to copy it to one JAX sees"
    )


@functools.cache
def jax_cpu() -> Any:
    """JAX's first CPU device (asked once per process)."""
    return jax.local_devices(backend="cpu")[0]


def name_public_classes(namespace: dict[str, Any]) -> None:
    """Makes the public classes of a package's namespace (its ``__all__``) name that package as their module,
    so that reprs, tracebacks and the API reference show ``qbridge.CheckpointError``, not its private home."""
    package = namespace["__name__"]
    for name in namespace["__all__"]:
        obj = namespace.get(name)
        home = obj.__module__.split(".") if isinstance(obj, type) else []
        if home and home[0] == package.split(".")[0] and home[-1].startswith("_"):  # a private module of ours
            obj.__module__ = package
