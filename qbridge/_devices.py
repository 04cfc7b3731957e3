"""Which device a result lives on, and which torch device decodes for it: torch's names, JAX's devices."""

from __future__ import annotations

from typing import Any

import jax
import torch


def resolve_device(device: Any) -> tuple[jax.Device, torch.device]:
    """The JAX device for results and the torch device that dequantizes for it.

    ``None``: the current CUDA device when torch and JAX both see it, else the CPU. Also takes a
    ``jax.Device``, or ``"cpu"``, ``"cuda"``, ``"cuda:i"`` (or that ``torch.device``).
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device is None:
        if torch.cuda.is_available():
            gpus = _jax_gpus()
            index = torch.cuda.current_device()
            if index in gpus:
                return gpus[index], torch.device("cuda", index)
        return jax.local_devices(backend="cpu")[0], torch.device("cpu")
    if isinstance(device, str):
        names = "'cpu', 'cuda' or 'cuda:i' (torch's names), or a jax.Device"
        try:
            tdev = torch.device(device)
        except RuntimeError:
            if device.split(":")[0] == "gpu":
                raise ValueError(
                    f"device {device!r} is JAX's name for a GPU; qbridge takes torch's names: use {names}"
                ) from None
            raise ValueError(f"device {device!r} is not a device: use {names}") from None
        if tdev.type == "cpu":
            cpus = jax.local_devices(backend="cpu")
            if (tdev.index or 0) >= len(cpus):
                raise ValueError(f"device {device!r}: JAX has {len(cpus)} CPU device(s) here")
            return cpus[tdev.index or 0], torch.device("cpu")
        if tdev.type != "cuda":
            raise ValueError(f"device {device!r}: qbridge loads onto the CPU or CUDA GPUs; use {names}")
        if not torch.cuda.is_available():
            build = " (a CPU-only build of torch)" if torch.version.cuda is None else ""
            raise ValueError(
                f"device {device!r}: torch {torch.__version__}{build} sees no CUDA GPU here; use 'cpu'"
            )
        index = tdev.index if tdev.index is not None else torch.cuda.current_device()
        gpus = _jax_gpus()
        if index not in gpus:
            raise ValueError(f"device {device!r}: JAX has no GPU with hardware id {index}")
        return gpus[index], torch.device("cuda", index)
    if isinstance(device, jax.Device):
        if device.platform == "gpu":
            return device, torch.device("cuda", device.local_hardware_id)
        return device, torch.device("cpu")
    raise TypeError(f"device must be None, a jax.Device or 'cpu'/'cuda[:i]', got {type(device).__name__}")


def _jax_gpus() -> dict[int, jax.Device]:
    """JAX's GPUs of this process by local hardware id (none when this JAX has no GPU backend: a CPU-only
    jaxlib, or JAX_PLATFORMS=cpu)."""
    try:
        return {d.local_hardware_id: d for d in jax.local_devices(backend="gpu")}
    except RuntimeError:
        return {}
