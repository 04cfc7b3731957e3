"""The CPU decode of 4-bit (and FP8) weights in C (``kernels/cpu_4bit.c``), built once per machine, loaded
with ctypes.

torch operations alone cannot decode a 4-bit weight as fast as bitsandbytes' native CPU kernel: at
1024x1024 the byte lookup alone (``index_select``) costs more than that whole kernel. The C kernel looks
each nibble up in a register-held table (AVX-512 where the CPU has it, else AVX2 with F16C, plain C
elsewhere), multiplies by the block's scale and rounds while storing; it gives the bits of
``_nf4.dequantize_4bit_reference`` (tested against it). Large weights are split over torch's thread count:
from the main thread on torch's own OpenMP threads where :func:`torch_openmp_team` finds them, else on a
small pool of the kernel's own.

It is built with the machine's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) for the machine's
CPU and kept in qbridge's cache directory (``_cache.cache_dir``, under ``cpu-kernels/``), named by a hash
of its source, the flags and the CPU's features, so a process after the first loads it in about a
millisecond (after checking the hash written beside it: a damaged file is built again). The first
process builds it in a background thread (about a second; a process that ends sooner leaves it to
finish in its own session) while its calls take
the torch path (the same bits); :func:`torch_side.wait_for_kernels` waits for that build (and makes a
later first call wait for it).
``QBRIDGE_CPU_KERNEL=off`` keeps every call on the torch path. Without a compiler, or when the build
fails (logged once at warning level), calls take the torch path. A cache directory that cannot take the
build (read-only, ``QBRIDGE_CACHE_DIR=off``) gets none: the process builds one for itself, in a temporary
directory removed once loaded.

The same library holds ``qbridge.to_jax``'s scan of torch's CUDA streams (``kernels/stream_scan.c``: the
driver's ``cuStreamQuery`` for every stream in one C loop) and the checkpoint reader's reads of many byte
ranges in one call (``kernels/read_ranges.c``); until it is loaded, and with ``QBRIDGE_CPU_KERNEL=off``, the
scan asks torch's ``Stream.query`` of each stream and the reader reads each range from Python.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable
from typing import Any

import torch
import torch.autograd.forward_ad as fwad

from ._build_c import UNWRITABLE, Builds, compiler, machine_key, whole
from ._cache import cache_dir
from ._checks import tracing

log = logging.getLogger("torch_side")

SOURCE = pathlib.Path(__file__).with_name("kernels") / "cpu_4bit.c"
# built into the same library: qbridge.to_jax's scan of torch's CUDA streams and its ordering of JAX's stream
# (qb_first_busy_stream, qb_order_after_idle)
SCAN_SOURCE = SOURCE.with_name("stream_scan.c")
# and the checkpoint reader's reads of many byte ranges in one call (qb_read_ranges)
READ_SOURCE = SOURCE.with_name("read_ranges.c")
SOURCES = (SOURCE, SCAN_SOURCE, READ_SOURCE)
ENV = "QBRIDGE_CPU_KERNEL"
OFF = ("off", "0", "no", "false", "none", "disable", "disabled")
ON = ("", "on", "1", "yes", "true", "auto", "enable", "enabled")


def switched_off() -> bool:
    """Whether ``QBRIDGE_CPU_KERNEL`` turns the kernel off (one of ``OFF``; unset or one of ``ON``: on),
    read by each call until the library is loaded (a library loaded stays in use); checked once when
    torch_side is imported.

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

CPU_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernel's output kinds

_FN: Any = None  # the loaded qb_dequantize_4bit, once ready
_FP8: Any = None  # the loaded qb_dequantize_fp8, from the same library
_FN_T: Any = None  # the loaded qb_dequantize_4bit_t (written transposed), from the same library
_SCAN: Any = None  # the loaded qb_first_busy_stream, from the same library
_ORDER: Any = None  # the loaded qb_order_after_idle, from the same library
_READ: Any = None  # the loaded qb_read_ranges, from the same library
_PLANNED: Any = None  # the loaded qb_dequantize_4bit_planned (a plan's call), from the same library
_FORKED = False  # set in a child forked after torch_side was imported (_after_fork_in_child)
_UNAVAILABLE = False  # set when it cannot be had in this process (disabled, no compiler, failed build)
_LOCK = threading.Lock()
_BUILDING: threading.Thread | None = None
_WAIT_FROM_NOW = False  # set by torch_side.wait_for_kernels: later first calls wait for the build
_PRIVATE: pathlib.Path | None = None  # the folder of a build for this process only (made before it starts)
_BUILDS = Builds()  # the builder's runs; a build for this process only is stopped at exit


# what answers instead when the library cannot be had (its three users)
_FALLBACK = (
    "CPU decoding takes the torch path (qbridge.to_jax asks torch about each CUDA stream, and checkpoint reads "
    "are made one by one)"
)


class BuildError(RuntimeError):
    """The C kernel could not be built or loaded."""


class Unwritable(BuildError):
    """The cache directory could not take the build."""


@functools.cache  # read once per process: the source, the CPU's features
def library_path(root: pathlib.Path) -> pathlib.Path:
    """Where the built kernel lies under ``root``: named by a hash of its source and what else the build
    depends on (``_build_c.machine_key``)."""
    key = "".join(source.read_bytes().hex() for source in SOURCES) + "\0" + machine_key()
    return root / "cpu-kernels" / f"cpu_4bit-{hashlib.sha256(key.encode()).hexdigest()[:24]}.so"


def _compiler() -> list[str]:
    try:
        return compiler()
    except LookupError as e:
        raise BuildError(str(e)) from None


def build(target: pathlib.Path) -> None:
    """Compiles the kernel into ``target`` in a process of its own session (``_build_c.py``: an interrupt
    of this process's terminal does not stop it halfway); waits for it here.

    Raises:
        BuildError: no compiler, or it failed (its message is included).
    """
    compiler = _compiler()
    private = _PRIVATE is not None and target.is_relative_to(_PRIVATE)
    try:
        code, complaint = _BUILDS.run(
            [str(source) for source in SOURCES], str(target), compiler, private=private
        )
    except RuntimeError as e:  # the process is exiting
        raise BuildError(str(e)) from None
    except OSError as e:
        raise BuildError(f"the build could not be started: {e}") from e
    if code != 0:
        kind = Unwritable if code == UNWRITABLE else BuildError
        raise kind(complaint[-600:] or f"the build exited with {code}")


def _whole(path: pathlib.Path) -> bool:
    return whole(str(path))


def load(path: pathlib.Path, *, planned: bool = True) -> tuple[Any, Any, Any, Any, Any, Any, Any]:
    """The library's entry points (4-bit, FP8, 4-bit written transposed, the stream scan, the scan with the
    ordering of a consumer stream, the reads of many byte ranges, a planned 4-bit call), with their argument
    types set. ``planned=False`` also loads a library built from an older revision, which lacks the last
    one (then None; ``benchmarks/cpu_kernel_builds.py``)."""
    try:
        library = ctypes.CDLL(str(path))  # its calls give up the GIL while they run
        fn, fp8, fn_t = library.qb_dequantize_4bit, library.qb_dequantize_fp8, library.qb_dequantize_4bit_t
        scan, order, read = library.qb_first_busy_stream, library.qb_order_after_idle, library.qb_read_ranges
        planned_fn = library.qb_dequantize_4bit_planned if planned else None
    except (OSError, AttributeError) as e:
        raise BuildError(f"{path} could not be loaded: {e}") from e
    log.debug("qbridge's CPU 4-bit kernel loaded from %s: CPU decoding takes it from now on", path)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [p, p, p, p, p, i64, ctypes.c_float, p, i64, i64, p, i32, i32]
    fn.restype = i32
    fp8.argtypes = [p, p, p, i64, i64, i64, i64, i64, p, i32, i32, i32]
    fp8.restype = i32
    fn_t.argtypes = [p, p, p, p, p, i64, ctypes.c_float, p, i64, i64, i64, p, i32, i32]
    fn_t.restype = i32
    scan.argtypes = [p, p, i64]
    scan.restype = i32
    order.argtypes = [p, p, i64, p, p, p, p, p]
    order.restype = i32
    read.argtypes = [i32, i64, p, p, p, p, p]
    read.restype = i64
    if planned_fn is not None:
        planned_fn.argtypes = [p, p, p, p, p, ctypes.c_float, p, i32]
        planned_fn.restype = i32
        team = torch_openmp_team()
        if team is not None:  # calls from the main thread decode on torch's own threads
            library.qb_use_gomp_parallel.argtypes = [p]
            library.qb_use_gomp_parallel.restype = None
            library.qb_use_gomp_parallel(team)
    return fn, fp8, fn_t, scan, order, read, planned_fn


def torch_openmp_team() -> int | None:
    """The address of ``GOMP_parallel`` in the GNU OpenMP runtime torch runs its parallel operations on (its
    Linux builds), or None: not Linux, a child forked after torch_side was imported or one its parent's
    libgomp lies at the same addresses in (``_forked_from_parent``; libgomp's state there counts the
    parent's threads, which the fork did not copy: a parallel region would wait for them),
    torch's parallel backend is not OpenMP, its threads do not spin between parallel regions
    (``OMP_WAIT_POLICY=passive``, or a ``GOMP_SPINCOUNT`` under 100000), or the process holds another OpenMP
    runtime (Intel's, LLVM's) or no single libgomp that is torch's (one inside torch's folders, else the
    only one loaded).

    The kernel then splits a call from the main thread over torch's own threads (``kernels/cpu_4bit.c``,
    ``qb_use_gomp_parallel``): beside them, a pool of its own got no CPU for milliseconds while they spun
    after one of torch's parallel operations. Threads that sleep at once leave the CPUs to the pool, and
    waking them costs more than the pool's calls (1024x1024: 78-106 us against 41-48;
    ``benchmarks/RESULTS.md``)."""
    if (
        not sys.platform.startswith("linux")
        or _FORKED
        or os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"
        or _spins_briefly(os.environ.get("GOMP_SPINCOUNT"))
        or "parallel backend: OpenMP" not in torch.__config__.parallel_info()
    ):
        return None
    try:
        with open("/proc/self/maps") as maps:
            loaded = _libraries_mapped(maps)
    except OSError:
        return None
    names = {path: os.path.basename(path) for path in loaded}
    if any(name.startswith(("libiomp", "libomp")) for name in names.values()):
        return None  # another runtime beside it: which one torch's threads belong to is not known here
    gomp = sorted(path for path, name in names.items() if name.startswith("libgomp") and ".so" in name)
    roots = tuple(
        os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), d) + os.sep
        for d in ("torch", "torch.libs")
    )
    torch_own = [path for path in gomp if path.startswith(roots)]
    chosen = torch_own if torch_own else gomp
    if len(chosen) != 1 or _forked_from_parent(chosen[0], loaded[chosen[0]]):
        return None
    try:  # the copy loaded already (RTLD_NOLOAD: none is loaded here)
        runtime = ctypes.CDLL(chosen[0], mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_LOCAL)
        return ctypes.cast(runtime.GOMP_parallel, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def _libraries_mapped(maps: Iterable[str]) -> dict[str, str]:
    """The shared libraries of a ``/proc/PID/maps`` listing, each with the address range of its first
    mapping (``"start-end"``, hexadecimal)."""
    mapped: dict[str, str] = {}
    for line in maps:
        fields = line.split(None, 5)
        if len(fields) == 6 and "/lib" in fields[5]:
            mapped.setdefault(fields[5].strip(), fields[0])
    return mapped


def _forked_from_parent(library: str, where: str) -> bool:
    """Whether this process is its parent's copy made by ``fork`` without ``exec``, known by ``library``
    lying at the same addresses ``where`` in both (a process that ran ``exec`` mapped it anew, at addresses
    of its own; with address randomization off, both may match, and the kernel keeps its pool). It may have been forked before torch_side was imported, which ``_FORKED`` does not see,
    after the parent's OpenMP threads ran: libgomp's state here then counts threads that the fork did not
    copy, and a parallel region on torch's team waits for them forever. A parent whose listing cannot be
    read counts as one (the kernel's own pool is right either way); none (``getppid()`` 0) as none."""
    parent = os.getppid()
    if parent == 0:
        return False
    try:
        with open(f"/proc/{parent}/maps") as maps:
            return _libraries_mapped(maps).get(library) == where
    except OSError:
        return True


def _spins_briefly(spincount: str | None) -> bool:
    """Whether libgomp's ``GOMP_SPINCOUNT`` (a count, with an optional k, M, G or T suffix, or "infinite")
    makes its threads spin fewer than 100000 times before they sleep (unset: libgomp's own default, 300000)."""
    if spincount is None or not spincount.strip():
        return False
    value = spincount.strip().lower()
    if value in ("infinite", "infinity"):
        return False
    scale = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}.get(value[-1], 1)
    digits = value[:-1] if value[-1] in "kmgt" else value
    return digits.isdigit() and int(digits) * scale < 100_000


def _build_and_load() -> None:
    global _FN, _FP8, _FN_T, _SCAN, _ORDER, _READ, _PLANNED, _UNAVAILABLE
    try:
        root = cache_dir()
        if root is not None:
            path = library_path(root)
            try:
                whole = _whole(path)
                if not whole:
                    build(path)
                    whole = _whole(path)
                if whole:
                    try:
                        _FN, _FP8, _FN_T, _SCAN, _ORDER, _READ, _PLANNED = load(path)
                        return
                    except BuildError as e:  # whole but not the kernel (replaced by hand): built again
                        log.debug("%s could not be loaded (%s): built again", path, e)
                        build(path)  # for the processes after this one; this one loaded that path already
            except Unwritable as e:
                log.debug("%s cannot take the build (%s): building for this process only", root, e)
        # no cache, or one that cannot take the build: a build for this process only, in the folder
        # cpu_4bit made (or one made now), removed below once loaded (the loaded library stays mapped)
        path = library_path(_PRIVATE if _PRIVATE is not None else _make_private())
        build(path)
        _FN, _FP8, _FN_T, _SCAN, _ORDER, _READ, _PLANNED = load(path)
    except BuildError as e:
        _UNAVAILABLE = True
        if not _BUILDS.exiting:  # a private build stopped at exit is no news
            log.warning("qbridge's CPU 4-bit kernel is unavailable, %s: %s", _FALLBACK, e)
    except Exception as e:  # a missing source, an unreadable home: the torch path still answers
        _UNAVAILABLE = True
        # the type and the message (an OSError's names the file, which its repr leaves out)
        log.warning("qbridge's CPU 4-bit kernel is unavailable, %s: %s: %s", _FALLBACK, type(e).__name__, e)
    finally:
        if _PRIVATE is not None:  # unused, or loaded from
            shutil.rmtree(_PRIVATE, ignore_errors=True)


def cpu_4bit(wait: bool = False) -> Any:
    """The C kernel's entry point, or None while it is being built (then, or never, the torch path answers).

    The first call starts the work: loading a build from the cache happens on the calling thread (about
    a millisecond); a build happens in a background thread unless ``wait``.
    """
    global _BUILDING, _UNAVAILABLE
    if _FN is not None or _UNAVAILABLE:
        return _FN
    with _LOCK:
        if _FN is None and not _UNAVAILABLE and _BUILDING is None:
            if switched_off():
                _UNAVAILABLE = True
                return None
            root = cache_dir()
            try:
                cached = root is not None and _whole(library_path(root))
            except OSError:  # a source missing from a stripped install: the build below reports it
                cached = False
            if cached:
                _build_and_load()
                return _FN
            # a process that ends first leaves a build for the cache to finish (its own session), and
            # stops a build for itself only and removes its folder (made here, before any exit can begin)
            _make_private()
            _BUILDING = _BUILDS.start(_build_and_load, "qbridge-cpu-kernel-build")
        building = _BUILDING
    if (wait or _WAIT_FROM_NOW) and building is not None:
        building.join()
    return _FN


def readable(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernel may read these tensors' memory as their values in place of the torch path: each
    is there, on the CPU, contiguous, neither lazily negated nor conjugated (the memory holds other
    values), no functorch wrapper (``torch.func.vmap``, ``grad``, ``jvp``: no storage of its own), without
    a forward-mode tangent, and not in need of a graph (requires grad while grad is enabled): a result
    written by the kernel would drop the last two. Never while ``torch.compile`` traces (``tracing``)."""
    if tracing():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None or _carries(t, grad):
            return False
        if t.device.type != "cpu" or not t.is_contiguous() or t.is_neg() or t.is_conj():
            return False
    return True


def wrapped(*tensors: torch.Tensor) -> bool:
    """Whether a functorch transform (``torch.func.vmap``, ``grad``, ``jvp``) wraps any of ``tensors``."""
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _carries(t: torch.Tensor, grad: bool) -> bool:
    return (
        wrapped(t)
        or (grad and t.requires_grad)
        or (fwad._current_level >= 0 and fwad.unpack_dual(t).tangent is not None)
    )


def carries(*tensors: torch.Tensor | None) -> bool:
    """Whether any of ``tensors`` carries more than its values: a functorch wrapper, a graph to build
    (requires grad while grad is enabled) or a forward-mode tangent, which a result the kernel writes, or
    one written through ``out=``, would drop (None: nothing)."""
    grad = torch.is_grad_enabled()
    return any(t is not None and _carries(t, grad) for t in tensors)


def cpu_fp8(wait: bool = False) -> Any:
    """The FP8 entry point of the same library (see :func:`cpu_4bit`), or None."""
    cpu_4bit(wait)
    return _FP8


def stream_scan(wait: bool = False) -> Any:
    """The stream scan of the same library (see :func:`cpu_4bit`), or None: ``qb_first_busy_stream(query,
    streams, n)`` calls ``query`` (the CUDA driver's ``cuStreamQuery``, by address) for each of the ``n``
    stream handles at ``streams`` and returns the index of the first that does not answer 0 (idle), or -1
    (``kernels/stream_scan.c``)."""
    cpu_4bit(wait)
    return _SCAN


def stream_order(wait: bool = False) -> Any:
    """The scan with the ordering of a consumer stream, from the same library (see :func:`cpu_4bit`), or
    None: ``qb_order_after_idle(query, streams, n, record, wait, event, current, consumer)`` scans as
    :func:`stream_scan` does and, when no stream is busy, records ``event`` on ``current`` and makes
    ``consumer`` wait for it (``record``, ``wait``: the driver's ``cuEventRecord`` and ``cuStreamWaitEvent``,
    by address); -1 when ordered, a busy stream's index, or -2/-3 when the record/wait failed
    (``kernels/stream_scan.c``)."""
    cpu_4bit(wait)
    return _ORDER


def read_ranges(wait: bool = False, *, start: bool = True) -> Any:
    """The reads of many byte ranges of the same library (see :func:`cpu_4bit`; without ``start``, only where
    it is loaded already: nothing is set up or built), or None:
    ``qb_read_ranges(fd, n, offsets, lengths, dests, got, error)`` reads bytes ``[offsets[i], offsets[i] +
    lengths[i])`` of the open file ``fd`` into ``dests[i]`` for each of the ``n`` ranges (int64 arrays, an
    array of addresses) with positioned reads, and returns -1 when all were read whole, else the index of the
    first that was not, with ``*got`` (int64) the bytes of it read and ``*error`` (int) the read's errno, 0 where
    the file ended first (``kernels/read_ranges.c``). The GIL is given up for the whole call."""
    if start:
        cpu_4bit(wait)
    return _READ


def transposes_well(rows: int, cols: int, *, nibbles: bool) -> bool:
    """Whether the kernel's transposed entry points beat a row-major decode and a transposed copy for a
    ``[rows, cols]`` weight: they decode 16 rows of a thread's share at a time and 16 or 32 columns per
    vector step (4-bit rows starting on a whole byte: an even ``cols``); other shapes fall to element-by-
    element code, slower than the copy (measured on the 2-core CPU machine: 30 x 2**20 at 1.4-1.8x)."""
    threads = max(1, min(torch.get_num_threads(), rows * cols >> 18))
    return rows >= 16 * threads and cols >= 64 and not (nibbles and cols % 2)


def cpu_4bit_t(wait: bool = False) -> Any:
    """The transposed 4-bit entry point of the same library (see :func:`cpu_4bit`), or None."""
    cpu_4bit(wait)
    return _FN_T


def cpu_4bit_planned(wait: bool = False) -> Any:
    """The planned 4-bit entry point of the same library (see :func:`cpu_4bit`), or None:
    ``qb_dequantize_4bit_planned(plan, packed, scales, nested_code, nested_absmax, offset, out, threads)``,
    with what a plan fixed in ``plan`` (int64 values in the order of ``PLAN_FIELDS``)."""
    cpu_4bit(wait)
    return _PLANNED


# the int64 values of a plan, in the order of kernels/cpu_4bit.c's QB_PLAN_* (code: the table's address)
PLAN_FIELDS = ("code", "n", "rows", "cols", "blocksize", "nested_blocksize", "kind", "transposed")


def _make_private() -> pathlib.Path:
    """The folder a build for this process only would use, and its removal at exit."""
    global _PRIVATE
    _PRIVATE = pathlib.Path(tempfile.mkdtemp(prefix="qbridge-"))
    atexit.register(_BUILDS.stop_at_exit, _PRIVATE, os.getpid())
    return _PRIVATE


def _after_fork_in_child() -> None:
    """A build thread of the parent does not exist in a forked child: the child starts its own if needed.
    Nor do the parent's OpenMP threads, which libgomp still counts: a library the child loads keeps its own
    pool (``torch_openmp_team``), as one loaded before the fork does (``kernels/cpu_4bit.c``)."""
    global _BUILDING, _LOCK, _FORKED
    _LOCK = threading.Lock()
    _FORKED = True
    if _FN is None:
        _BUILDING = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def wait_for_build(timeout: float | None = None) -> bool:
    """Waits for a build under way, and makes later first calls wait for theirs; True when none is left."""
    global _WAIT_FROM_NOW
    _WAIT_FROM_NOW = True
    building = _BUILDING
    if building is None:
        return True
    building.join(timeout)
    return not building.is_alive()
