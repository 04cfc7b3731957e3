"""Launching the Triton kernels, and launching them again with as little host work as possible.

``kernel[grid](*args, **meta)`` binds every argument, computes Triton's specialization key and looks the
compiled kernel up on each call, and compiles it on the caller's thread the first time. :func:`launch`
gets the ``CompiledKernel`` from ``_compile`` (which can make it ready in the background instead) and
returns a :class:`Launcher` holding it; the callers keep it in a plan keyed by everything that decides that
choice (dtypes, shapes, 16-byte alignment of every pointer, the constexpr values, the device), and launch
it directly on the current stream when the same key comes back (``_fp8`` and ``_nf4``). While a launch hook
is set (:func:`hooked`: a profiler's), launches go through the compiled kernel's own runner, which calls it.

Under ``TRITON_INTERPRET=1`` there is no compiled kernel: every launch goes through the interpreter.
"""

from __future__ import annotations

from typing import Any

import torch

from ._backend import triton_interpreting
from ._compile import ready_kernel

try:  # Triton's launch hooks (profilers): when one is set, launches go through Triton's own runner
    from triton import knobs as _knobs

    _RUNTIME: Any = _knobs.runtime
    _CHAIN: Any = getattr(_knobs, "HookChain", None)  # Triton 3.5 and later
except ImportError:  # older Triton: always its runner
    _RUNTIME = _CHAIN = None


def hooked(hook: Any) -> bool:
    """Whether a Triton launch hook (``knobs.runtime.launch_enter_hook`` or ``launch_exit_hook``) is set. Since
    Triton 3.5 each is a ``HookChain``, never None, set when it holds a call (a hook assigned in its place,
    as Triton 3.4 takes one, is set unless it is None)."""
    if _CHAIN is not None and isinstance(hook, _CHAIN):
        return bool(hook.calls)
    return hook is not None


class Launcher:
    """One compiled specialization of a kernel and the constexpr values it was compiled for."""

    __slots__ = ("compiled", "constexprs", "grid")

    def __init__(self, compiled: Any, constexprs: tuple[Any, ...], grid: tuple[int, int, int]) -> None:
        self.compiled = compiled
        self.constexprs = constexprs
        self.grid = grid

    def __call__(self, device_index: int, *args: Any) -> None:
        """Launches on the current stream of CUDA device ``device_index`` (which must be current) with
        runtime arguments ``args`` of the same specialization (dtypes, alignment, integer values)."""
        compiled = self.compiled
        stream = torch._C._cuda_getCurrentRawStream(device_index)
        runtime = _RUNTIME
        if runtime is None or hooked(runtime.launch_enter_hook) or hooked(runtime.launch_exit_hook):
            compiled[self.grid](*args, *self.constexprs, stream=stream)
            return
        g = self.grid
        compiled.run(
            g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
            *args, *self.constexprs,
        )  # fmt: skip


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, wait: bool = True, **meta: Any) -> Launcher | None:
    """``kernel[grid](*args, **meta)``; returns a :class:`Launcher` for launching the same specialization
    again (None under the interpreter, or for a kernel with parameters left to their defaults).

    ``args`` are the kernel's runtime arguments in order, the first a tensor on the device to launch on
    (current on this thread); ``meta`` its constexpr parameters (all of them, by name) and launch options
    (``num_warps``, ``num_stages``, ``enable_fp_fusion``).

    Raises:
        KernelNotReady: ``wait`` is false and the kernel is being compiled in the background (``_compile``);
            nothing was launched.
    """
    names = getattr(kernel, "arg_names", None)
    if triton_interpreting() or names is None or not all(n in meta for n in names[len(args) :]):
        kernel[grid](*args, **meta)
        return None
    device_index = args[0].device.index
    compiled = ready_kernel(kernel, args, meta, device_index, wait=wait)
    compiled._init_handles()  # loads the module on the device the first time; then a no-op
    full = (*grid, 1, 1)
    launcher = Launcher(compiled, tuple(meta[n] for n in names[len(args) :]), (full[0], full[1], full[2]))
    launcher(device_index, *args)
    return launcher
