"""torch -> JAX (and back) through DLPack: zero-copy where JAX can alias, safe where it cannot.

What plain ``jax.dlpack.from_dlpack`` gets wrong, and what is done here instead:

- **Streams.** torch's ``__dlpack__`` orders JAX's stream only after torch's *current* stream, so work
  left on a side stream is read unfinished. Here every torch stream is asked whether it still has work
  queued; JAX's stream waits (on the GPU, the host never blocks) for the current stream, and, when another
  stream is busy, for a dedicated export stream that first waits for the current stream and the busy ones.
- **Reuse.** The tensor is marked as used on JAX's stream (``record_stream``), so torch's caching
  allocator does not hand its memory to new work before JAX's reads are done.
- **Alignment.** JAX accepts a view whose pointer is off alignment and fails later inside jit (GPU) or
  copies silently (CPU). The pointer is checked first: GPU 16 bytes, CPU 64.
- **Strides.** Only compact layouts (any axis order) alias; other views are copied once.
- **Quantized tensors.** torchao subclasses export garbage (GPU) or crash (CPU), and a bitsandbytes
  ``Params4bit`` exports its packed bytes; they are dequantized first.
- **Devices.** ``cuda:i`` maps to the JAX GPU with local hardware id ``i`` and the export runs with that
  device current, whatever the current torch device is.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextvars
import ctypes
import functools
import logging
import math
import threading
from collections.abc import Sequence
from contextlib import nullcontext as _nullcontext
from typing import Any, NoReturn

import jax
import numpy as np
import torch

import torch_side
from jax_side._tree import warn_at_caller
from torch_side import _native
from torch_side._checks import on_device
from torch_side._fp8 import FP8_DTYPES

from ._devices import resolve_device
from ._dtypes import TORCH_TO_JAX, jax_dtype, torch_dtype
from ._env import jax_cpu, jax_gpu_for, no_jax_gpu_message

log = logging.getLogger("qbridge")

ALIGNMENT = {"cpu": 64, "gpu": 16}
Producer = str | torch.cuda.Stream | Sequence[torch.cuda.Stream]

_WIDE = {torch.int64: torch.int32, torch.float64: torch.float32, torch.complex128: torch.complex64}
if hasattr(torch, "uint64"):
    _WIDE[torch.uint64] = torch.uint32
_CARRIER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

COPY_NOTE = "use copy=None to let qbridge copy once, or copy=True for an independent array"


def is_compact(t: torch.Tensor) -> bool:
    """Whether ``t`` covers one dense block of memory in some axis order (``t.t()`` does; ``t[:, :k]`` not)."""
    if t.is_contiguous() or t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _x64() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def _as_device(device: Any) -> jax.Device | None:
    if device is None or isinstance(device, jax.Device):
        return device
    if isinstance(device, (str, torch.device)):  # torch's names, as load_checkpoint takes them
        return resolve_device(device)[0]
    if isinstance(device, jax.sharding.Sharding):
        devices = device.device_set
        if len(devices) != 1:
            raise ValueError(f"device= takes one device; this sharding spans {len(devices)}")
        return next(iter(devices))
    raise TypeError(
        f"device must be a jax.Device, a single-device Sharding, or 'cpu'/'cuda[:i]', got {type(device).__name__}"
    )


def _home(t: torch.Tensor) -> jax.Device | None:
    """The JAX device that can alias ``t``'s memory, or None."""
    if t.device.type == "cpu":
        return jax_cpu()
    if t.device.type == "cuda":
        return jax_gpu_for(t.device.index)
    return None


@functools.cache
def _torch_streams(index: int) -> tuple[torch.cuda.Stream, ...]:
    """Every stream torch hands out on ``cuda:index``: the default stream and its stream pools.

    torch gives pool streams round-robin, so asking until one repeats enumerates each pool.
    """
    device = torch.device("cuda", index)
    found: dict[int, torch.cuda.Stream] = {}
    default = torch.cuda.default_stream(device)
    found[default.stream_id] = default
    least, greatest = torch.cuda.Stream.priority_range()  # type: ignore[call-arg]  # a staticmethod in torch
    for priority in range(least, greatest - 1, -1):
        for _ in range(4096):
            s = torch.cuda.Stream(device=device, priority=priority)
            if s.stream_id in found:
                break
            found[s.stream_id] = s
    return tuple(found.values())


@functools.cache
def _export_stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=torch.device("cuda", index))


@functools.cache
def _jax_stream(home: jax.Device, index: int) -> torch.cuda.ExternalStream | None:
    """JAX's stream for external buffers on ``home``, as a torch stream (None if JAX has none)."""
    pointer = home.get_stream_for_external_ready_events()
    return torch.cuda.ExternalStream(pointer, device=torch.device("cuda", index)) if pointer else None


# the C method itself where torch has CUDA: the scan below calls it for every stream
_query = getattr(torch._C._CudaStreamBase, "query", torch.cuda.Stream.query)


@functools.cache
def _driver_calls() -> tuple[int, int, int] | None:
    """The addresses of the CUDA driver's ``cuStreamQuery``, ``cuEventRecord`` and ``cuStreamWaitEvent`` in
    this process (libcuda, which torch's CUDA build has loaded), or None: a torch without CUDA, a HIP build,
    no such library."""
    if torch.version.cuda is None or getattr(torch.version, "hip", None):
        return None
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        calls = (driver.cuStreamQuery, driver.cuEventRecord, driver.cuStreamWaitEvent)
    except (OSError, AttributeError):
        return None
    addresses = tuple(ctypes.cast(call, ctypes.c_void_p).value for call in calls)
    return addresses if all(addresses) else None  # type: ignore[return-value]


def _driver_query() -> int | None:
    """The address of the CUDA driver's ``cuStreamQuery`` (see :func:`_driver_calls`), or None."""
    calls = _driver_calls()
    return None if calls is None else calls[0]


@functools.cache
def load_library() -> None:
    """Starts loading (or building, once a machine) torch_side's library, which holds the C stream scan and the
    checkpoint reader's reads of many ranges, in a thread: a process's first handoff (or GPU load) does not wait
    the milliseconds its load takes (torch's queries, and reads from Python, answer meanwhile)."""
    try:
        threading.Thread(target=_load_library, name="qbridge-library-load", daemon=True).start()
    except RuntimeError as e:  # no thread to be had (a process limit; at interpreter exit): torch's queries
        log.debug(_NOT_LOADED, e)


_NOT_LOADED = "torch_side's library is not loaded (torch asks each stream, reads are made one by one): %s"


def _load_library() -> None:
    try:
        _native.stream_scan()
    except ValueError as e:  # QBRIDGE_CPU_KERNEL misspelt since import: logged, not a thread's traceback
        log.warning(_NOT_LOADED, e)


class _Others:
    """torch's streams on one device but the current one (what "auto" asks), and for the C scan their
    handles but the null one (the legacy default stream, which the driver would take as the current
    context's: it is asked through torch, under torch's device guard)."""

    __slots__ = ("count", "handles", "null", "streams")

    def __init__(self, streams: tuple[torch.cuda.Stream, ...]) -> None:
        self.streams = streams
        live = [s.cuda_stream for s in streams if s.cuda_stream]
        self.handles = (ctypes.c_void_p * len(live))(*live)
        self.count = len(live)
        self.null = tuple(s for s in streams if not s.cuda_stream)

    def idle(self, index: int) -> bool:
        """Whether none of the streams has unfinished work: one C loop over the driver's ``cuStreamQuery``
        where the library holding it is loaded and ``cuda:index`` is torch's current device (the driver
        answers for the current context's streams); else torch's ``Stream.query`` of each. An answer other
        than idle or busy (an error) counts as busy: the caller asks torch again, which raises it."""
        scan, query = _native._SCAN, _driver_query()
        if scan is None or query is None or torch._C._cuda_getDevice() != index:
            if scan is None and query is not None:
                load_library()
            return all(map(_query, self.streams))
        return scan(query, self.handles, self.count) < 0 and all(map(_query, self.null))


# (device index, current stream's handle) -> torch's streams on that device but the current one: what "auto"
# asks (a stream's handle names it while it exists; the legacy default stream's is 0)
_OTHERS: dict[tuple[int, int], _Others] = {}


def _others(index: int, current: int) -> _Others:
    """torch's streams on ``cuda:index`` but the one whose handle is ``current`` (made once per pair)."""
    others = _OTHERS.get((index, current))
    if others is None:
        if len(_OTHERS) >= 1024:  # external streams made current one after another: start over
            _OTHERS.clear()
        others = _OTHERS[(index, current)] = _Others(
            tuple(s for s in _torch_streams(index) if s.cuda_stream != current)
        )
    return others


class _ThreadEvents(threading.local):
    """One CUDA event per device for each thread that hands tensors over (see :func:`_event`)."""

    def __init__(self) -> None:
        self.events: dict[int, torch.cuda.Event] = {}


_EVENTS = _ThreadEvents()


def _event(index: int) -> int:
    """The handle of this thread's event on ``cuda:index`` (made at its first use there): every handoff of
    the thread records it on torch's current stream and makes JAX's stream wait for that record. A later
    record does not move an earlier wait, and another thread has events of its own."""
    event = _EVENTS.events.get(index)
    if event is None:
        event = _EVENTS.events[index] = torch.cuda.Event()
        event.record(torch.cuda.current_stream(index))  # torch makes the CUDA event at its first record
    return event.cuda_event


# inside to_jax_many: device index -> the busy streams found by its first "auto" scan
_SCANS: contextvars.ContextVar[dict[int, list[torch.cuda.Stream]] | None] = contextvars.ContextVar(
    "qbridge_stream_scans", default=None
)


def _check_copy(copy: Any) -> None:
    """Raises TypeError for a ``copy`` other than None, True or False (a NumPy bool is one of them)."""
    if not (copy is None or isinstance(copy, (bool, np.bool_))):
        raise TypeError(f"copy must be None, True or False, got {copy!r}")


def _check_producer(producer: Producer) -> None:
    """Raises TypeError for a ``producer`` that is none of the accepted values (on any device)."""
    if isinstance(producer, str):
        ok = producer in ("auto", "current")
    else:
        ok = isinstance(producer, torch.cuda.Stream) or (
            isinstance(producer, Sequence)
            and not isinstance(producer, (bytes, bytearray))  # b"" would pass as an empty list of streams
            and all(isinstance(s, torch.cuda.Stream) for s in producer)
        )
    if not ok:
        _bad_producer(producer)


def _bad_producer(producer: Any) -> NoReturn:
    raise TypeError(
        f"producer must be 'auto', 'current', a torch.cuda.Stream or a sequence of them, got {producer!r}"
    )


def _busy_producers(t: torch.Tensor, producer: Producer) -> list[torch.cuda.Stream]:
    """The streams other than the current one that ``t``'s producers may still be running on (``producer``:
    a value :func:`_check_producer` accepted)."""
    if producer == "current":
        return []
    if isinstance(producer, str):  # "auto"
        index = t.device.index
        scans = _SCANS.get()
        if scans is not None and index in scans:  # to_jax_many: scanned once per device
            return scans[index]
        others = _others(index, torch._C._cuda_getCurrentRawStream(index))
        # the usual answer, nothing else running, in one pass without Python work per stream
        busy = [] if others.idle(index) else [s for s in others.streams if not _query(s)]
        if scans is not None:
            scans[index] = busy
        return busy
    current = torch.cuda.current_stream(t.device)
    streams = [producer] if isinstance(producer, torch.cuda.Stream) else producer
    return [s for s in streams if s != current]


def _after_producers(t: torch.Tensor, producer: Producer) -> torch.cuda.Stream | None:
    """None when the current stream is ordered after ``t``'s producers (no other is busy); else the export
    stream of ``t``'s device, made to wait (on the GPU) for the current stream and the busy ones."""
    busy = _busy_producers(t, producer)
    if not busy:
        return None
    export = _export_stream(t.device.index)
    export.wait_stream(torch.cuda.current_stream(t.device))
    for s in busy:
        export.wait_stream(s)
    return export


@functools.cache
def _importer() -> tuple[Any, bool] | None:
    """JAX's DLPack import itself, as ``jax.dlpack.from_dlpack`` calls it after its checks (which
    :func:`to_jax` has made already), and whether it takes the DLPack device type; None where this JAX
    does not have it (then ``jax.dlpack.from_dlpack`` is used)."""
    try:
        from jax._src.lib import _jax, jaxlib_extension_version

        return _jax.dlpack_managed_tensor_to_buffer, jaxlib_extension_version >= 467
    except (ImportError, AttributeError):
        return None


@functools.cache
def _import_stream(device: jax.Device) -> int | None:
    """The stream JAX's import waits on for ``device`` (as ``jax.dlpack.from_dlpack`` asks for it)."""
    try:
        return device.get_stream_for_external_ready_events()
    except jax.errors.JaxRuntimeError as e:
        if "UNIMPLEMENTED" in str(e):
            return None
        raise


_DL_CUDA_HOST = 3  # DLPack's kDLCUDAHost: pinned host memory, exported without a stream


def _from_dlpack(t: torch.Tensor, device: jax.Device) -> jax.Array:
    """``jax.dlpack.from_dlpack(t, copy=False)`` for a tensor :func:`to_jax` has checked (JAX's dtype,
    aligned, compact, on ``device``), without repeating the checks: the same import, the same stream
    protocol (torch's ``__dlpack__(stream=...)`` orders JAX's stream after torch's current one)."""
    if _importer() is None:
        return jax.dlpack.from_dlpack(t, copy=False)
    dl_type = int(t.__dlpack_device__()[0])
    stream = None if dl_type == _DL_CUDA_HOST else _import_stream(device)
    return _import(t.__dlpack__(stream=stream), device, stream, dl_type)


def _import(capsule: Any, device: jax.Device, stream: int | None, dl_type: int) -> jax.Array:
    """JAX's import of a DLPack capsule of memory of DLPack device type ``dl_type`` on ``device``, ready
    after ``stream``'s work (:func:`_importer`, which must have found the call)."""
    fn, takes_device_type = _importer()  # type: ignore[misc]
    if takes_device_type:
        return fn(capsule, device, stream, False, dl_type)
    return fn(capsule, device, stream, False)


@functools.cache
def _exporter() -> Any:
    """JAX's DLPack export itself (``jax.Array.__dlpack__`` calls it after checks that hold for a new
    single-device array, and after making a single-device view of it), or None where this JAX does not have
    it (then ``torch.from_dlpack`` is used)."""
    try:
        from jax._src.lib import _jax

        return _jax.buffer_to_dlpack_managed_tensor
    except (ImportError, AttributeError):
        return None


def _torch_view(out: jax.Array, on: torch.device) -> torch.Tensor:
    """``torch.from_dlpack(out)`` for a new single-device array on ``on``: a torch tensor over its memory,
    with torch's current stream made to wait (on the GPU) for the array's producer, as the DLPack stream
    protocol does. Calls the export and the import directly: ``torch.from_dlpack`` and JAX's ``__dlpack__``
    spent about 30 of their 42 microseconds per array on checks and on making a view of the array (H200)."""
    export = _exporter()
    if export is None or on.type != "cuda":
        return torch.from_dlpack(out)
    stream = torch._C._cuda_getCurrentRawStream(on.index)
    return torch._C._from_dlpack(export(out, stream=1 if stream == 0 else stream))  # 1: the legacy default


def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


_NOTHING = _nullcontext()


_DL_CUDA = 2  # DLPack's kDLCUDA
_FAILED = {-2: "cuEventRecord", -3: "cuStreamWaitEvent"}  # qb_order_after_idle's error answers
# what Tensor.__dlpack__ calls once its stream work is done
_TO_DLPACK = getattr(torch._C, "_to_dlpack", None)


def _export_ordered(t: torch.Tensor, home: jax.Device, index: int, producer: str) -> jax.Array | None:
    """The handoff of a CUDA tensor on the current device (``cuda:index``) when ``producer`` is "auto" and no
    stream but the current one is busy, or is "current": one call of torch_side's library scans the other
    streams ("auto") and makes JAX's stream wait for torch's current one (as torch's ``__dlpack__(stream=)``
    does, with this thread's event instead of a new one), then torch's export and JAX's import are called
    directly. None where this does not apply (the library or the driver's calls not loaded, JAX or torch
    without the direct calls, a busy stream, an error from the driver): then the route through torch's
    ``__dlpack__``, which finds every busy stream and reports errors."""
    order, driver, importer = _native._ORDER, _driver_calls(), _importer()
    if order is None or driver is None or importer is None or _TO_DLPACK is None:
        if order is None and driver is not None:
            load_library()
        return None
    stream = _import_stream(home)
    if not stream:
        return None
    current = torch._C._cuda_getCurrentRawStream(index)
    handles, count, scans, others = None, 0, None, None
    if producer == "auto":
        scans = _SCANS.get()
        if scans is not None and index in scans:  # to_jax_many: scanned once per device
            if scans[index]:
                return None
        else:
            others = _others(index, current)
            handles, count = others.handles, others.count
    query, record, wait = driver
    if others is not None and others.null and not all(map(_query, others.null)):
        answer = 0  # the legacy default stream is busy
    else:
        answer = order(query, handles, count, record, wait, _event(index), current, stream)
    if answer != -1:
        if others is not None and scans is not None and answer >= 0:  # to_jax_many keeps every busy one
            scans[index] = [s for s in others.streams if not _query(s)]
        elif answer < -1:  # torch's route, with an event of its own, reports the driver's error if it stays
            log.debug("the driver's %s failed: torch's __dlpack__ orders JAX's stream", _FAILED[answer])
            if answer == -2:  # this thread's event: made again at its next handoff
                _EVENTS.events.pop(index, None)
        return None
    if others is not None and scans is not None:
        scans[index] = []
    x = _import(_TO_DLPACK(t), home, stream, _DL_CUDA)
    t.record_stream(_jax_stream(home, index))  # type: ignore[arg-type]  # not None: JAX has the stream
    return x


def _export_cuda(t: torch.Tensor, home: jax.Device, producer: Producer) -> jax.Array:
    """Hands a CUDA tensor to JAX on ``home`` with the stream and reuse guarantees of the module docstring."""
    index = t.device.index
    if isinstance(producer, str) and torch._C._cuda_getDevice() == index:
        x = _export_ordered(t, home, index, producer)
        if x is not None:
            return x
    with on_device(t.device):
        after = _after_producers(t, producer)
        # torch's __dlpack__ makes JAX's stream wait for the current stream (made ``after`` here if needed)
        with torch.cuda.stream(after) if after is not None else _NOTHING:
            x = _from_dlpack(t, home)
        jax_stream = _jax_stream(home, t.device.index)
        if jax_stream is not None:
            t.record_stream(jax_stream)  # the allocator reuses this memory only after JAX's reads
    return x


def _alias(t: torch.Tensor, home: jax.Device, producer: Producer) -> jax.Array:
    if t.device.type == "cuda":
        return _export_cuda(t, home, producer)
    return _from_dlpack(t, home)


def _export_bits(t: torch.Tensor, home: jax.Device, producer: Producer) -> jax.Array:
    """For dtypes torch will not export: hand over the same bytes as an integer type, bitcast in JAX."""
    carrier = _CARRIER[t.element_size()]
    x = _alias(t.view(carrier), home, producer)
    return jax.lax.bitcast_convert_type(x, TORCH_TO_JAX[t.dtype])


def _aliasing_blockers(t: torch.Tensor, home: jax.Device | None, target: jax.Device) -> list[str]:
    reasons = []
    if home is None or home != target:
        reasons.append(f"JAX device {target} is not where the tensor lives ({t.device})")
    if t.dtype in _WIDE and not _x64():
        reasons.append(f"JAX runs with x64 off and has no {t.dtype}")
    if t.layout != torch.strided:
        reasons.append(f"{t.layout} tensors have no single dense buffer")
        return reasons
    if not is_compact(t):
        reasons.append(f"strides {t.stride()} are not compact (a slice or an expand)")
    align = ALIGNMENT["cpu" if t.device.type == "cpu" else "gpu"]
    if t.numel() and t.data_ptr() % align:
        reasons.append(f"its data pointer is {t.data_ptr() % align} bytes past a {align}-byte boundary")
    if t.is_conj() or t.is_neg():
        reasons.append("it is a lazily conjugated or negated view")
    return reasons


def _narrow_dtype(t: torch.Tensor) -> torch.Tensor:
    """The value JAX (x64 off) can hold: int64 -> int32 only when every value fits; float64 -> float32."""
    narrow = _WIDE[t.dtype]
    if not t.dtype.is_floating_point and not t.dtype.is_complex and t.numel():
        info = torch.iinfo(narrow)
        if t.dtype == getattr(
            torch, "uint64", None
        ):  # torch has no min/max for uint64: read its bits as int64
            as_signed = t.view(torch.int64)  # values from 2**63 up read as negative: add 2**64 back
            high = as_signed < 0
            small, large = as_signed[~high], as_signed[high]
            lo = int(small.min()) if small.numel() else int(large.min()) + 2**64
            hi = int(large.max()) + 2**64 if large.numel() else int(small.max())
        else:
            lo, hi = int(t.min()), int(t.max())
        if lo < info.min or hi > info.max:
            raise ValueError(
                f"{_describe(t)} holds values in [{lo}, {hi}], outside {narrow}: JAX runs with x64 off. "
                "Enable it (jax.config.update('jax_enable_x64', True)) or convert the tensor yourself"
            )
    elif t.dtype.is_floating_point or t.dtype.is_complex:
        narrowed = t.to(narrow)
        # infinities the cast made: one pass over the result (its least and greatest values) unless it holds
        # an inf or a NaN at all
        flat = torch.view_as_real(narrowed) if narrowed.is_complex() else narrowed
        least, most = (float(v) for v in torch.aminmax(flat)) if flat.numel() else (0.0, 0.0)
        finite = math.isfinite(least) and math.isfinite(most)
        if not finite and bool((narrowed.isinf() & ~t.isinf()).any()):
            raise ValueError(
                f"{_describe(t)} holds finite values beyond float32's range (they would become inf"
                f"{', in either part' if t.is_complex() else ''}): JAX runs with x64 off. Enable it "
                "(jax.config.update('jax_enable_x64', True)) or scale the tensor"
            )
        warn_at_caller(f"JAX runs with x64 off: the {_describe(t)} is rounded to {narrow}")
        return narrowed
    return t.to(narrow)


@functools.cache
def _torch_gpus() -> int:
    """How many GPUs torch sees, asked once per process: the answer does not change, and in a process's
    first load on an H200 each ask took about 2 ms (103 asks, 0.2 s, while background threads loaded
    kernels; ``results/first-load-window-h200.txt``)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _copy_once(t: torch.Tensor, home: jax.Device | None, target: jax.Device, producer: Producer) -> jax.Array:
    """Makes one copy of ``t`` that JAX on ``target`` can alias, then hands that copy over zero-copy.

    CUDA copies run on the export stream after ``t``'s producers, so they read finished values.
    """
    dest: torch.device | None = None
    if target.platform == "cpu":
        dest = torch.device("cpu")
    elif target.platform == "gpu" and target.local_hardware_id < _torch_gpus():
        dest = torch.device("cuda", target.local_hardware_id)
    narrow = _WIDE.get(t.dtype) if not _x64() else None
    with on_device(t.device):
        # None: the current stream already follows the producers (and then the copy runs there)
        used = _after_producers(t, producer) if t.device.type == "cuda" else None
        with torch.cuda.stream(used) if used is not None else _NOTHING:
            if t.layout != torch.strided:
                t = t.to_dense()
            t = t.resolve_conj().resolve_neg()
            if narrow is not None:
                t = _narrow_dtype(t)
            if dest is None:  # a GPU JAX sees and torch does not: through host memory
                host = t.to("cpu", memory_format=torch.contiguous_format)
                return jax.device_put(jax.dlpack.from_dlpack(host), target)
            # one copy: to the destination, dense and aligned (the caching allocator aligns to 512 bytes)
            copied = t.to(dest, memory_format=torch.contiguous_format, copy=narrow is None)
    if copied.device.type == "cuda":  # ordered after the stream the copy ran on
        return _export_cuda(copied, target, used if used is not None else "current")
    x = jax.dlpack.from_dlpack(copied, copy=False)
    # DLPack knows one CPU device; another (XLA's host-platform devices) takes a copy of its own
    return x if target == jax_cpu() else jax.device_put(x, target)


def jax_owned_copy(
    t: torch.Tensor, target: jax.Device, producer: Producer, *, wait: bool = True
) -> jax.Array:
    """An independent copy of ``t`` on ``target``, in memory that XLA allocated itself.

    The tensor is first handed over zero-copy (made contiguous first if it is a permuted view: XLA's
    copy of a non-default layout is not relied on), then XLA copies it on its own stream, ordered after
    the tensor's producers; the torch memory is released once that copy has read it. Arrays that live in
    torch's memory are a hazard as inputs of XLA's CUDA-graph command buffers (see :func:`to_jax`).

    XLA copies asynchronously: with ``wait`` this returns once the copy is made, so that writes to ``t``
    (or to the file it maps) afterwards cannot reach the result. Without it the caller promises that
    nothing writes ``t`` again (the loader's own decoded tensors), and nothing waits on the host.
    """
    if t.layout == torch.strided and not t.is_contiguous() and is_compact(t):
        t = t.contiguous()
    home = _home(t)
    staged = to_jax(t, device=home if home is not None else target, producer=producer)
    out = jax.device_put(staged, target, may_alias=False)
    return out.block_until_ready() if wait else out


def to_jax(
    t: torch.Tensor,
    *,
    device: Any = None,
    copy: bool | None = None,
    producer: Producer = "auto",
) -> jax.Array:
    """Hands a torch tensor to JAX, zero-copy whenever JAX can alias its memory.

    **The result aliases the tensor when no copy is made:** writing to the torch tensor afterwards
    changes the JAX array (which JAX assumes immutable), and the array holds the tensor's memory as it was
    handed over: resizing that memory (``t.resize_``, ``t.untyped_storage().resize_(0)`` as FSDP frees a
    parameter) or ``t.set_(...)`` leaves the array reading freed or reused memory, as a bare
    ``jax.dlpack.from_dlpack`` does. Pass ``copy=True`` for an independent array.

    **Arrays kept for many jitted calls (parameters): pass** ``copy=True``. On GPUs, XLA records jitted
    programs into CUDA graphs (command buffers, on by default) and updates them with each call's buffers.
    CUDA refuses to update a recorded device-to-device copy from memory that torch allocated
    (``cudaMalloc``) to memory that XLA allocated (its own virtual-memory pool when
    ``XLA_PYTHON_CLIENT_PREALLOCATE=false``), so a program that copies an input, as ``nnx.jit`` does with
    a module's state, fails on its second call with ``Failed to set memcpy D2D node params:
    CUDA_ERROR_INVALID_VALUE`` when the first call saw a zero-copy array and the second an XLA one
    (``benchmarks/xla_command_buffer_repro.py`` reproduces it with JAX and CuPy alone). ``copy=True`` returns memory
    XLA allocated, which has no such problem; :func:`qbridge.load_checkpoint` always returns such memory
    on GPUs.

    Args:
        t: any torch tensor. torchao tensor subclasses, bitsandbytes ``Params4bit``/``Int8Params`` and
            torch-quantized tensors are dequantized first (``torch_side.dequantize_weight``); tensors that
            require grad are detached.
        device: the JAX device (or single-device sharding, or torch's name for one: ``"cpu"``, ``"cuda:i"``,
            a ``torch.device``) for the result. Default: the JAX device of the tensor's memory: ``cuda:i`` ->
            the JAX GPU with local hardware id ``i``, CPU -> JAX's CPU.
        copy: ``None`` aliases where possible and otherwise copies exactly once (a misaligned pointer,
            non-compact strides, another device, a dtype JAX would change such as int64 with x64 off),
            saying so at debug level; ``False`` never copies and raises ``BufferError`` saying why;
            ``True`` always returns an independent array in memory that XLA allocated (contiguous,
            default layout), copied by XLA after the tensor's producers; it returns once the copy is
            made (a host wait), so later writes to ``t`` cannot reach it.
        producer: which torch streams may still be writing ``t`` (CUDA): ``"auto"`` (default) waits for
            the current stream and every torch stream that has work queued; ``"current"`` only for the
            current stream (torch's own DLPack rule; fastest); or the producing stream(s) (an empty
            sequence: the current stream only). All waits happen on the GPU; the host is not blocked.

    Returns:
        A ``jax.Array`` with ``t``'s shape and dtype (int64/float64 become int32/float32 when JAX runs with
        x64 off). When it aliases ``t``, ``result.unsafe_buffer_pointer() == t.data_ptr()``, and a permuted
        view such as ``t.t()`` arrives with a matching non-default layout, not copied.

    Raises:
        BufferError: ``copy=False`` and aliasing is impossible (the message says why).
        TypeError: ``copy=False`` for a quantized tensor (dequantizing makes new memory), a dtype JAX lacks,
            a nested tensor; a ``producer``, ``copy`` or ``device`` of another kind than those above.
        RuntimeError: a CUDA tensor and a JAX without that GPU (e.g. a CPU-only jaxlib), unless
            ``device=`` asks for a copy elsewhere.
        ValueError: int64 values that do not fit int32, or finite float64 values beyond float32's range,
            when JAX runs with x64 off; a meta tensor (no data); a ``device`` name or sharding that names
            no single device.

    Example:
        >>> w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        >>> x = qbridge.to_jax(w)
        >>> x.unsafe_buffer_pointer() == w.data_ptr()
        True
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"to_jax takes a torch.Tensor, got {type(t).__name__}")
    _check_copy(copy)
    _check_producer(producer)
    if t.is_nested:  # components may differ in shape: no array shape
        raise TypeError(
            f"to_jax takes a regular tensor; this is a nested tensor of {t.size(0)} components, which may differ in shape: "
            "hand over its components (t.unbind()) or a padded tensor (t.to_padded_tensor(0.0))"
        )
    if t.device.type == "meta":
        raise ValueError(f"{_describe(t)}: a meta tensor holds no data")
    if torch_side.is_quant_tensor_subclass(t) or t.is_quantized:
        if copy is False:
            raise TypeError(
                f"{type(t).__name__} is a quantized tensor: its memory is not its values, and dequantizing it "
                f"makes new memory, which copy=False forbids; {COPY_NOTE}"
            )
        t = torch_side.dequantize_weight(t)
    if t.requires_grad:
        t = t.detach()
    jax_dtype(t.dtype)  # raises TypeError naming what JAX lacks
    if not t.numel() and t.layout == torch.strided:
        # no bytes to alias: an empty tensor of the default strides, so that the array has JAX's default
        # layout whatever strides the empty view had (torch.empty(0, 4).t() has strides (1, 4))
        t = t.new_empty(t.shape)
    target = _as_device(device)
    home = _home(t)
    if target is None:
        if home is None:
            raise RuntimeError(
                no_jax_gpu_message(t.device.index)
                if t.device.type == "cuda"
                else f"JAX cannot see {t.device}"
            )
        target = home
    if copy:
        return jax_owned_copy(t, target, producer)
    reasons = _aliasing_blockers(t, home, target)
    if reasons:
        if copy is False:
            raise BufferError(
                f"cannot hand {_describe(t)} to JAX without a copy: {'; '.join(reasons)}; {COPY_NOTE}"
            )
        log.debug("to_jax copies %s once: %s", _describe(t), "; ".join(reasons))
        return _copy_once(t, home, target, producer)
    try:
        x = _alias(t, target, producer)
    except BufferError:  # a dtype this torch will not export (float8 on older torch): same bytes, bitcast
        if copy is False:
            raise BufferError(f"this torch cannot export {t.dtype} without a copy; {COPY_NOTE}") from None
        return _export_bits(t, target, producer)
    if t.numel() and x.unsafe_buffer_pointer() != t.data_ptr():
        if copy is False:
            raise BufferError(f"JAX copied {_describe(t)} on import; {COPY_NOTE}")
        log.debug("JAX copied %s on import", _describe(t))
    return x


def to_jax_many(
    tensors: Sequence[torch.Tensor],
    *,
    device: Any = None,
    copy: bool | None = None,
    producer: Producer = "auto",
) -> list[jax.Array]:
    """Hands many torch tensors to JAX: ``[to_jax(t, device=device, copy=copy, producer=producer) for t in
    tensors]``, the same arrays and guarantees, for less host time per tensor.

    With ``producer="auto"``, :func:`to_jax` asks every stream torch hands out whether it is busy, for each
    tensor (129 streams on a CUDA device: 0.15-0.35 us a stream in qbridge's compiled scan, measured on H100
    and H200 hosts; about 0.4 us a stream, torch asking each, until that scan is ready: it is loaded in the
    background at a process's first handoff, built once per machine in about a second, and not used with
    ``QBRIDGE_CPU_KERNEL=off``). Here that is asked once
    per device for the whole list, at the first tensor: pass tensors whose producers have queued their
    work before the call (as one call of :func:`to_jax` assumes for its tensor). Work that this call
    queues itself (dequantizing a quantized tensor, a copy) is on the current stream, which every import
    waits for anyway.

    Args:
        tensors: a list (or another iterable) of torch tensors, as :func:`to_jax` takes them.
        device, copy, producer: as in :func:`to_jax`, for every tensor.

    Returns:
        A list of ``jax.Array``, one per tensor, as :func:`to_jax` returns them (aliasing where it would).

    Raises:
        TypeError: ``tensors`` is a single tensor (whose rows would be taken for tensors) or not iterable;
            and as :func:`to_jax`, with the tensor's index in the message (``tensors[i]: ...``).
        ValueError, BufferError, RuntimeError: as :func:`to_jax`, with the tensor's index.
    """
    if isinstance(tensors, torch.Tensor) or not hasattr(tensors, "__iter__"):
        raise TypeError(f"to_jax_many takes a list of torch tensors, got a {type(tensors).__name__}")
    # the call's arguments, not one tensor's: checked first, an empty list's too
    _check_copy(copy)
    _check_producer(producer)
    _as_device(device)
    tensors = list(tensors)  # every tensor made (its work queued) before the one scan of the streams
    token = _SCANS.set({})
    try:
        results = []
        for i, t in enumerate(tensors):
            try:
                results.append(to_jax(t, device=device, copy=copy, producer=producer))
            except (TypeError, ValueError, BufferError, RuntimeError) as e:
                if type(e) not in (TypeError, ValueError, BufferError, RuntimeError):
                    raise  # another library's error type: as it came
                raise type(e)(f"tensors[{i}]: {e}") from e
        return results
    finally:
        _SCANS.reset(token)


def to_torch(x: jax.Array) -> torch.Tensor:
    """Hands a single-device ``jax.Array`` to torch, zero-copy.

    The tensor aliases the array, which JAX assumes immutable: do not write to it (``.clone()`` first).
    torch's current stream is ordered after the array's producers (the DLPack stream protocol).

    Raises:
        TypeError: ``x`` is not a ``jax.Array`` or spans several devices.
    """
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            "to_torch takes a concrete jax.Array; under a JAX transformation (jit, grad, vmap) there are only "
            "traced values"
        )
    if not isinstance(x, jax.Array):
        raise TypeError(f"to_torch takes a jax.Array, got {type(x).__name__}")
    if len(x.devices()) != 1:
        whole = x.is_fully_replicated
        raise TypeError(
            f"to_torch takes a single-device array; this one spans {len(x.devices())} devices"
            + (
                ", each holding all of it: hand over one device's copy, x.addressable_shards[0].data"
                if whole
                else ": gather it onto one device first (jax.device_put(x, device)), or hand over each "
                "shard's data (x.addressable_shards[i].data)"
            )
        )
    target = torch_dtype(x.dtype)  # raises TypeError naming what torch lacks
    device = next(iter(x.devices()))
    with (
        on_device(torch.device("cuda", device.local_hardware_id))
        if device.platform == "gpu"
        else _nullcontext()
    ):
        try:
            return torch.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError):  # a dtype DLPack cannot carry: same bytes as integers
            carrier = _CARRIER[target.itemsize]
            return torch.from_dlpack(jax.lax.bitcast_convert_type(x, TORCH_TO_JAX[carrier])).view(target)


def dequantize_to_jax(
    W: torch.Tensor,
    quant_state: Any = None,
    *,
    transpose: bool = False,
    dtype: Any = None,
    device: Any = None,
) -> jax.Array:
    """``torch_side.dequantize_weight`` then :func:`to_jax`: a quantized torch weight as a JAX array.

    Args:
        W: any quantized or plain weight ``torch_side.dequantize_weight`` takes (packed 4-bit bytes, an FP8
            weight, a torchao tensor subclass, a bitsandbytes ``Params4bit``/``Int8Params``, a plain tensor).
        quant_state: what ``W`` needs beside it: a bitsandbytes ``QuantState`` for packed 4-bit bytes, the
            ``scale_inv`` tensor for an FP8 weight; None for the others.
        transpose: return the ``[in, out]`` (Flax ``kernel``) layout. It arrives zero-copy as a permuted view
            (a JAX array with a non-default layout): the same values in jitted use, at times slower where a
            matmul is memory-bound.
        dtype: a dtype (torch's, JAX's, numpy's or its name) for the dense weight (a new tensor); None keeps
            the decode's. An FP8 weight is decoded straight to a bfloat16, float16 or float32 ``dtype``
            (``float32(W) * scale``, rounded once, as ``torch_side.dequantize_fp8(W, scale, dtype)``); other
            weights are decoded as their producer decodes them (a 4-bit weight to its quant state's dtype),
            then cast.
        device: as for :func:`to_jax`.

    Returns:
        A ``jax.Array``. It aliases the dequantized buffer (new memory), never ``W``'s quantized bytes;
        a plain ``W`` without ``dtype`` is aliased itself (see :func:`to_jax`).
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):
        dtype = torch_dtype(np.dtype(dtype))  # JAX's, numpy's or its name
    fp8 = isinstance(W, torch.Tensor) and W.dtype in FP8_DTYPES and quant_state is not None
    if fp8 and dtype in (torch.bfloat16, torch.float16, torch.float32):  # one rounding, to dtype
        dense = torch_side.dequantize_fp8(W, quant_state, dtype, transpose=transpose)
    else:
        dense = torch_side.dequantize_weight(W, quant_state, transpose=transpose)
    if dtype is not None and dense.dtype != dtype:
        dense = dense.to(dtype)
    # new memory was written on the current stream just now: no other stream to wait for. (A tensor
    # subclass, torchao's, has no storage of its own: its dequantized weight is always new memory.)
    fresh = (
        torch_side.is_quant_tensor_subclass(W)
        or dense.untyped_storage().data_ptr() != W.untyped_storage().data_ptr()
    )
    return to_jax(dense, device=device, producer="current" if fresh else "auto")


# ------------------------------------------------------------------- arrays XLA allocates, torch fills

_FILLABLE = (torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.uint8, torch.int16, torch.int32)
# (shape, dtype, device, arrays per call)
_Key = tuple[tuple[int, ...], Any, jax.Device, int]
_allocators: dict[_Key, Any] = {}  # ready: calls that return new arrays
_compiling: dict[_Key, Any] = {}  # compiling in the background
_seen: collections.Counter[_Key] = collections.Counter()
_allocators_lock = threading.Lock()
_compiler: concurrent.futures.ThreadPoolExecutor | None = None


# one allocation program makes up to 32 arrays of a shape, at most this many bytes in all
POOL_BYTES = 16 << 20


def _pooled(shape: tuple[int, ...], dtype: Any) -> int:
    """Arrays per allocation call for :meth:`XlaDestinations.take`: up to 32, ``POOL_BYTES`` in all."""
    return max(1, min(32, POOL_BYTES // max(1, math.prod(shape) * np.dtype(dtype).itemsize)))


def _allocator(key: _Key, asked_from: int = 2) -> Any:
    """The compiled allocation call of ``key``, or None while it is not compiled (it is started from the
    ``asked_from``-th time a key is asked for: by default the second, as a shape seen once may never come
    again)."""
    fn = _allocators.get(key)
    if fn is None:
        _seen[key] += 1
        if _seen[key] >= asked_from:
            _start_compile(key)
    return fn


def _compile_allocator(key: _Key) -> Any:
    shape, dtype, device, count = key

    def allocate() -> tuple[jax.Array, ...]:
        # XLA's AllocateBuffer on a GPU: new memory of XLA's, distinct per array, that no kernel writes;
        # torch writes every element before the load returns (a broadcast of a value per array took about
        # 1.7x the host time of the call, for 32 arrays kept alive, H200)
        return tuple(jax.lax.empty(shape, dtype) for _ in range(count))

    jitted = jax.jit(allocate, out_shardings=(jax.sharding.SingleDeviceSharding(device),) * count)
    # compiled ahead of time, not run: a trial run would hold a weight's worth of memory in the background
    fn = jitted.lower().compile()
    with _allocators_lock:
        _allocators[key] = fn
        _compiling.pop(key, None)
    return fn


class XlaDestinations:
    """New arrays that XLA allocated on one device, for torch to write: each allocation program makes
    several arrays of one shape at once (up to 32, ``POOL_BYTES`` in all), their memory is handed to torch
    through DLPack (torch's current stream waits for the allocation on the GPU), and torch writes them on
    its current stream.

    Beside :func:`jax_owned_copy`, the host work per array is a fraction and the device copy runs at
    torch's speed; but the arrays are **not ordered after torch's writes**: JAX must not read them before
    :meth:`settle` (a host wait for torch's current streams of the devices written). Memory that XLA
    allocated is what XLA's command buffers need of parameters (see :func:`to_jax`).

    The allocation program of each ``(shape, dtype, device)`` is compiled once per process in a background
    thread, from the second time that shape is asked for (a group's call, of :meth:`take_many`, from the
    first); until it is ready, and for dtypes torch and JAX do not share through DLPack, :meth:`take`,
    :meth:`take_many` and :meth:`write` return None and the caller uses another route.
    """

    def __init__(self) -> None:
        self._streams: dict[int, torch.cuda.Stream] = {}
        # arrays allocated and not yet taken, and arrays still expected, by (shape, JAX dtype, device)
        self._spare: dict[tuple[tuple[int, ...], Any, jax.Device], list[jax.Array]] = {}
        self._expected: collections.Counter[tuple[tuple[int, ...], Any, jax.Device]] = collections.Counter()

    def expect(self, shape: Sequence[int], dtype: torch.dtype, device: jax.Device, count: int) -> None:
        """Says that :meth:`take` will be asked for ``count`` more arrays of ``shape`` and ``dtype`` on
        ``device``: its allocation calls then make as many of them at once as are still expected, rounded
        down to a power of two, up to 32, whatever their size (a shape not expected gets a pool of up to 32,
        ``POOL_BYTES`` in all): a few calls instead of one per weight for a model's repeated large weights, and
        no arrays made for nothing for its one-off small ones. Every :meth:`take` of the shape counts one down, also
        one whose array the caller makes another way (while the call is compiled)."""
        if dtype in _FILLABLE and count > 0:
            self._expected[(tuple(shape), TORCH_TO_JAX[dtype], device)] += count

    def take(
        self, shape: Sequence[int], dtype: torch.dtype, device: jax.Device, on: torch.device
    ) -> tuple[jax.Array, torch.Tensor] | None:
        """A new ``shape`` array of ``dtype`` on ``device`` and a torch tensor over its memory (on ``on``,
        the same device as torch sees it), to be written on torch's current stream; or None."""
        if dtype not in _FILLABLE or not math.prod(shape):
            return None
        kind = (tuple(shape), TORCH_TO_JAX[dtype], device)
        expected = self._expected[kind]  # this array included; counted down whichever route it takes
        if expected:
            self._expected[kind] = expected - 1
        spare = self._spare.get(kind)
        if not spare:
            # as many arrays as are still expected, rounded down to a power of two (at most 32), so that a
            # shape has few allocation programs and none makes an array that will not be taken (a call's host
            # time grows with its arrays); a shape nobody said would come: a pool, POOL_BYTES in all
            many = 1 << (min(32, expected).bit_length() - 1) if expected else _pooled(*kind[:2])
            fn = _allocator((*kind, many))
            if fn is None:
                return None
            try:
                spare = self._spare[kind] = list(fn())[::-1]
            except jax.errors.JaxRuntimeError as e:  # out of memory, say: the caller's route may still fit
                log.debug("allocating %s arrays in XLA failed, so they are copied by XLA: %s", kind[:2], e)
                return None
        out = spare.pop()
        with on_device(on):
            dest = _torch_view(out, on)  # JAX's export makes torch's current stream wait for the allocation
            if dest.device != on or dest.data_ptr() != out.unsafe_buffer_pointer():
                return None  # another device (or a copy): not this route
            if on.type == "cuda" and on.index not in self._streams:
                self._streams[on.index] = torch.cuda.current_stream(on)
        return out, dest

    def take_many(
        self, n: int, shape: Sequence[int], dtype: torch.dtype, device: jax.Device, on: torch.device
    ) -> list[jax.Array] | None:
        """``n`` new ``shape`` arrays of ``dtype`` on ``device`` (a GPU), made by one allocation call, for torch
        to write on its current stream of ``on`` through their addresses (``unsafe_buffer_pointer``), which
        has been made to wait for the allocation on the GPU; or None while the call for this ``n``, shape
        and dtype is compiled in the background (from the first time it is asked for: ``n`` arrays of one
        shape are a model's repeated weights, which come again)."""
        if dtype not in _FILLABLE or not math.prod(shape) or on.type != "cuda":
            return None
        fn = _allocator((tuple(shape), TORCH_TO_JAX[dtype], device, n), asked_from=1)
        if fn is None:
            return None
        try:
            arrays = list(fn())
        except jax.errors.JaxRuntimeError as e:  # out of memory, say: the caller's route may still fit
            log.debug("allocating %d %s arrays in XLA failed: %s", n, tuple(shape), e)
            return None
        with on_device(on):
            # the arrays of one call share its completion event: waiting for one waits for all
            first = _torch_view(arrays[0], on)
            if first.device != on or first.data_ptr() != arrays[0].unsafe_buffer_pointer():
                return None
            self._streams.setdefault(on.index, torch.cuda.current_stream(on))
        return arrays

    def write(self, t: torch.Tensor, device: jax.Device) -> jax.Array | None:
        """A new array on ``device`` that will hold ``t``'s values once :meth:`settle` returns, or None."""
        if t.layout != torch.strided:
            return None
        with on_device(t.device):
            got = self.take(t.shape, t.dtype, device, t.device)
            if got is None:
                return None
            got[1].copy_(t)
        return got[0]

    def settle(self) -> None:
        """Waits on the host until every write so far has landed (its arrays may then be read); drops the
        arrays allocated and not taken."""
        for stream in self._streams.values():
            stream.synchronize()
        self._streams.clear()
        self._spare.clear()
        self._expected.clear()


def _start_compile(key: _Key) -> None:
    global _compiler
    with _allocators_lock:
        if key in _allocators or key in _compiling:
            return
        if _compiler is None:
            _compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qbridge-alloc")
        _compiling[key] = future = _compiler.submit(_compile_allocator, key)
    future.add_done_callback(_log_failure)


def _log_failure(future: concurrent.futures.Future) -> None:
    if future.exception() is not None:  # that shape keeps the other route
        log.debug("allocating arrays in XLA failed: %r", future.exception())


def wait_for_allocators() -> None:
    """Waits until every allocation program being compiled is ready (tests and benchmarks)."""
    with _allocators_lock:
        pending = list(_compiling.values())
    concurrent.futures.wait(pending)
