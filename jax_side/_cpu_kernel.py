"""jax_side's CPU decode of 4-bit weights in C: qbridge's CPU kernel, registered with XLA as an FFI target.

XLA's own operations decode an NF4 weight on the CPU several times slower than bitsandbytes' native CPU
kernel (at 1024x1024 the 16-entry table lookup alone costs more than that whole kernel). The C kernel
torch_side uses on the CPU (``torch_side/kernels/cpu_4bit.c``: a register-held table, the scale multiply
and the rounding in one pass, a pool of threads for large weights) is compiled together with its XLA
binding (``kernels/cpu_4bit_xla.c``, against jaxlib's FFI headers). jax_side's decode is a primitive of
its own (``_nf4._decode_4bit_p``) that lowers to a call of that target where the program runs on the CPU,
and to XLA's operations elsewhere and in ``jax.export`` (an exported program cannot call a target
registered in one process only). It writes bitsandbytes' CUDA bits, a nested absmax included (its two
roundings are the kernel's own, so no fused multiply-add can merge them even inside a caller's jit).
Processes with several CPU devices keep XLA's operations (see :func:`usable`).

Built once per machine with the machine's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) into
qbridge's cache directory (``$QBRIDGE_CACHE_DIR``, else ``~/.cache/qbridge``), named by a hash of both
sources, the flags, jaxlib's version and the CPU's features. The first process builds it in a background
thread (about a second) and decodes with XLA's operations meanwhile (the same bits); a program traced
before the kernel was ready keeps XLA's operations. :func:`wait_for_kernels` waits for the build.
``QBRIDGE_CPU_KERNEL=off`` keeps XLA's operations; without a compiler, or when the build fails (logged
once at warning level), they stay too. A cache directory that is off or cannot take the build gets a
build in a temporary directory, for this process only.

jax_side never imports torch_side: the C source is found beside torch_side's package (the same
distribution) without importing it; the builder (``_build_c.py``: compiler, build, the check of a cached
build) and the cache directory (``_cache.py``), both standard library only, are run as a script or loaded
by their paths.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
import pathlib
import shutil
import tempfile
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import jax

log = logging.getLogger("jax_side")

ENV = "QBRIDGE_CPU_KERNEL"
OFF = ("off", "0", "no", "false", "none", "disable", "disabled")
ON = ("", "on", "1", "yes", "true", "auto", "enable", "enabled")


def switched_off() -> bool:
    """Whether ``QBRIDGE_CPU_KERNEL`` turns the kernel off (one of ``OFF``; unset or one of ``ON``: on),
    read at each call; checked once when jax_side is imported.

    Raises:
        ValueError: the variable holds another value (a misspelt ``of`` must not leave the kernel on).
    """
    value = os.environ.get(ENV, "").strip().lower()
    if value in OFF:
        return True
    if value not in ON:
        raise ValueError(
            f"{ENV} must be unset, 'on' or 'off' (also accepted: {', '.join(ON[2:] + OFF[1:])}), "
            f"got {os.environ[ENV]!r}"
        )
    return False


switched_off()  # a misspelt value fails at import, not later inside a call
TARGET = "qbridge_dequantize_4bit_cpu"  # the FFI target's name, registered for the CPU platform
BINDING = pathlib.Path(__file__).with_name("kernels") / "cpu_4bit_xla.c"

_READY = False  # the target is registered: CPU decodes may call it
_UNAVAILABLE = False  # it cannot be had in this process (disabled, no compiler, failed build)
_LOCK = threading.Lock()
_BUILDING: threading.Thread | None = None


@functools.cache
def _torch_side_dir() -> pathlib.Path:
    """torch_side's folder, found without importing it (importing it would import torch)."""
    spec = importlib.util.find_spec("torch_side")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "qbridge's torch_side package (which holds the C kernel's source) is not installed"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _shared(name: str) -> ModuleType:
    """One of torch_side's standard-library modules (``_build_c``: the builder; ``_cache``: qbridge's cache
    directory), loaded by its path, not as a torch_side module."""
    path = _torch_side_dir() / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_qbridge_shared{name}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path} cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _builder() -> ModuleType:
    return _shared("_build_c")


def _sources() -> list[pathlib.Path]:
    return [_torch_side_dir() / "kernels" / "cpu_4bit.c", BINDING]


@functools.cache
def _library_path(root: pathlib.Path) -> pathlib.Path:
    """Where the built library lies under ``root``, named by everything the build depends on."""
    key = "\0".join(
        [
            *(s.read_bytes().hex() for s in _sources()),
            _builder().machine_key(),
            jax.ffi.include_dir(),
            _jaxlib_version(),
        ]
    )
    return root / "cpu-kernels" / f"cpu_4bit_xla-{hashlib.sha256(key.encode()).hexdigest()[:24]}.so"


def _jaxlib_version() -> str:
    import jaxlib

    return str(getattr(jaxlib, "__version__", ""))


def _cache_dir() -> pathlib.Path | None:
    """qbridge's cache directory (``$QBRIDGE_CACHE_DIR``; None when it is ``off`` or there is no home)."""
    return _shared("_cache").cache_dir()


@functools.cache
def _builds() -> Any:
    """The builder's runs (``_build_c.Builds``); a build for this process only is stopped at exit."""
    return _builder().Builds()


def _build(target: pathlib.Path, *, private: bool = False) -> None:
    """Builds the library into ``target`` and waits (see ``_build_c.Builds``); raises RuntimeError with the
    compiler's complaint (or OSError: the builder could not be started)."""
    compiler = [*_builder().compiler(), f"-I{jax.ffi.include_dir()}"]
    code, complaint = _builds().run([str(s) for s in _sources()], str(target), compiler, private=private)
    if code != 0:
        raise RuntimeError(complaint[-600:] or f"the build exited with {code}")


def _register(path: pathlib.Path) -> None:
    global _READY
    library = ctypes.CDLL(str(path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.qb_xla_dequantize_4bit), platform="cpu")
    log.debug("qbridge's CPU 4-bit kernel registered with XLA from %s", path)
    _READY = True


def _build_and_register() -> None:
    global _UNAVAILABLE
    private = None
    try:
        root = _cache_dir()
        if root is not None:
            path = _library_path(root)
            try:
                whole = _builder().whole(str(path))
                if not whole:
                    _build(path)
                    whole = _builder().whole(str(path))
                if whole:
                    _register(path)
                    return
            except (RuntimeError, OSError) as e:
                log.debug("%s cannot take the build (%s): building for this process only", root, e)
        private = pathlib.Path(tempfile.mkdtemp(prefix="qbridge-"))
        atexit.register(_builds().stop_at_exit, private, os.getpid())
        path = _library_path(private)
        _build(path, private=True)
        _register(path)  # the loaded library stays mapped once its file is removed below
    except Exception as e:  # no compiler, a failed build, no source: XLA's operations still answer
        _UNAVAILABLE = True
        if _builds().exiting:  # a build for this process only, stopped at exit, is no news
            return
        log.warning(
            "qbridge's CPU 4-bit kernel is unavailable, jax_side decodes with XLA's operations: %s", e
        )
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def cpu_kernel_ready() -> bool:
    """Whether the FFI target may be called now. The first call starts the work: a build in the cache is
    registered on the calling thread (about a millisecond); a build runs in a background thread."""
    global _BUILDING, _UNAVAILABLE
    if _READY or _UNAVAILABLE:
        return _READY
    with _LOCK:
        if not _READY and not _UNAVAILABLE and _BUILDING is None:
            if switched_off():
                _UNAVAILABLE = True
                return False
            root = _cache_dir()
            try:
                cached = root is not None and _builder().whole(str(_library_path(root)))
            except OSError:
                cached = False
            if cached:
                _build_and_register()
                return _READY
            _BUILDING = _builds().start(_build_and_register, "qbridge-jax-cpu-kernel")
    return _READY


def wait_for_kernels(timeout: float | None = None) -> bool:
    """Waits for the CPU kernel's build (starting it if no CPU decode has yet); returns whether it is built
    and registered with XLA.

    CPU decodes traced after it returns True call the kernel, unless the process has several CPU devices
    (then XLA's operations, which XLA can partition); without it, the first process on a machine decodes
    with XLA's operations (the same values) until the build is done, and a function traced meanwhile keeps
    them.
    """
    if not cpu_kernel_ready():
        building = _BUILDING
        if building is not None:
            building.join(timeout)
    return _READY


def registered() -> bool:
    """Whether the FFI target is registered in this process (programs lowered from now on may call it)."""
    return _READY


@functools.cache
def _one_cpu_device() -> bool:
    try:
        return len(jax.devices("cpu")) == 1
    except RuntimeError:  # no CPU backend
        return False


def usable() -> bool:
    """Whether decodes traced now should call the kernel: it is registered (a first call starts its build),
    the process has one CPU device, and no caller has set it aside (:func:`set_aside`). With several CPU
    devices (a mesh of them), XLA would run the kernel, which it cannot partition, on every device over
    gathered operands: XLA's operations keep the decode sharded there."""
    return not getattr(_ASIDE, "on", False) and cpu_kernel_ready() and _one_cpu_device()


_ASIDE = threading.local()


@contextlib.contextmanager
def set_aside() -> Iterator[None]:
    """Decodes traced on this thread inside take XLA's operations: where XLA fuses the decode into what
    consumes it (a matmul's operand), which a call of the kernel would keep it from doing."""
    before = getattr(_ASIDE, "on", False)
    _ASIDE.on = True
    try:
        yield
    finally:
        _ASIDE.on = before


def threads() -> int:
    """The threads the kernel may use: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def lowering(ctx: Any, *operands: Any, n: int, blocksize: int, nested_blocksize: int) -> Any:
    """The FFI call decoding ``n`` elements per weight (see ``kernels/cpu_4bit_xla.c``), as MLIR."""
    import numpy as np

    rule = jax.ffi.ffi_lowering(TARGET)
    return rule(
        ctx, *operands, n=np.int64(n), blocksize=np.int64(blocksize), nested_blocksize=np.int64(nested_blocksize),
        threads=np.int64(threads()),
    )  # fmt: skip
