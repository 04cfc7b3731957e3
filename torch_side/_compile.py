"""Compiled Triton kernels, without a compile wait on the calling thread.

A kernel specialization (a *variant*: the kernel, its constexpr values and launch options, and what
Triton specializes each runtime argument on) is compiled once per machine and loaded once per process.
Triton does both on the first launch, on the caller's thread: 0.3-1 s of compiling per variant with an
empty cache, and even with a warm one about 0.15 s to import Triton and 0.7 s to hash its own
installation and import more on the first load of a process (H200, ``benchmarks/RESULTS.md``).

With ``QBRIDGE_TRITON_COMPILE=background`` (the default), calls with ``backend="auto"`` never do that on
the caller's thread. A background thread imports the kernels' module (and Triton), then loads each
variant a call asks for from Triton's cache; a variant this machine has not compiled yet (no record of
it, see below) is first compiled in a separate Python process for the device's architecture, without a
GPU, so that compiling takes no time from the caller's process (Triton's compiler holds the GIL for most
of its work). Variants asked for while such a process runs start their own at once, and each process
records what it compiled: a script that ends before its kernels are ready leaves them compiled for the
next one. Until its kernel is ready, a call is answered on the caller's thread by the exact torch
path, or by bitsandbytes' kernel when bitsandbytes is imported already: the same bits, more slowly.

``QBRIDGE_TRITON_COMPILE=wait``, ``backend="triton"`` and every call after :func:`wait_for_kernels`
compile or load on the caller's thread, as Triton does.

A record (an empty file in Triton's cache directory, named by a hash of the variant, the kernel's source,
Triton's version and the device's architecture) says that the variant was compiled into that cache. A
missing or stale record costs time only: the load compiles whatever Triton's cache lacks.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import pathlib
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from ._native import wait_for_build

log = logging.getLogger("torch_side")

MODES = ("background", "wait")
COMPILE_MODE_ENV = "QBRIDGE_TRITON_COMPILE"
GATHER_S = 0.05  # how long the background thread gathers requests before starting a compile process
CHILD_TIMEOUT_S = 900.0  # a compile process still running then is given up (the variant compiles here)
IMPORT_WAIT_S = 60.0  # at most this long a fork waits for the background import of Triton

# variant -> Triton's CompiledKernel (its module is loaded on the device by the first launch)
_READY: dict[tuple[Any, ...], Any] = {}
_REQUESTED: set[tuple[Any, ...]] = set()
_FAILED: set[tuple[Any, ...]] = set()  # compiled on the caller's thread next time, to raise Triton's error
_COMPILING: dict[pathlib.Path, threading.Event] = {}  # records a compile process is making, set when done
_Item = tuple[tuple[Any, ...], Any, tuple[Any, ...], dict[str, Any], int]  # key, kernel, args, meta, device
_QUEUE: queue.Queue[_Item] = queue.Queue()
_LOCK = threading.Lock()  # Triton's per-kernel caches are filled by one thread at a time
_IDLE = threading.Condition()
_WORKING = 0
_WORKER: threading.Thread | None = None
KERNELS_MODULE = "torch_side._triton"
IMPORT_KEY = ("import", KERNELS_MODULE)
_IMPORTED = threading.Event()  # set once the kernels' module is imported (or its import failed)
_WAIT_FROM_NOW = False  # set by wait_for_kernels


def _after_fork() -> None:
    """A forked child has no background thread: it starts its own, with nothing half done. (Kernels made
    ready in the parent stay ready: their modules were loaded in the CUDA context the child inherits, which
    CUDA does not support using after a fork anyway.)"""
    global _QUEUE, _LOCK, _IDLE, _WORKING, _WORKER
    _REQUESTED.clear()
    _COMPILING.clear()
    _QUEUE = queue.Queue()
    _LOCK = threading.Lock()
    _IDLE = threading.Condition()
    _WORKING = 0
    _WORKER = None


def _before_fork() -> None:
    """A fork while the background thread imports Triton would leave the child with half-imported
    modules whose import locks no thread of the child will ever release (``import triton`` there would
    hang): let the import finish first (it takes about a second)."""
    if IMPORT_KEY in _REQUESTED and not _IMPORTED.is_set():
        _IMPORTED.wait(IMPORT_WAIT_S)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork)


class KernelNotReady(Exception):
    """The variant is being compiled or loaded in the background; nothing was launched."""


def compile_mode() -> str:
    """``"background"`` (the default, also when the variable is empty) or ``"wait"``, from
    ``QBRIDGE_TRITON_COMPILE``, read at each call; checked once when torch_side is imported.

    Raises:
        ValueError: the variable holds another value.
    """
    mode = os.environ.get(COMPILE_MODE_ENV, "") or "background"
    if mode not in MODES:
        raise ValueError(f"{COMPILE_MODE_ENV} must be one of {MODES} (or unset), got {mode!r}")
    return mode


compile_mode()  # a misspelt value fails at import, not later inside a checkpoint load


def arg_spec(arg: Any) -> tuple[Any, ...]:
    """What Triton specializes a runtime argument on (or something finer).

    A tensor (or its :class:`StandIn`): its dtype and whether its address is a multiple of 16. An int:
    whether it is 1, whether it is a multiple of 16, and the integer type its value needs. A float:
    nothing (always fp32).
    """
    if isinstance(arg, (torch.Tensor, StandIn)):
        return ("t", arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool):
        return ("b", arg)
    if isinstance(arg, int):
        kind = "i32" if -(2**31) <= arg < 2**31 else ("i64" if -(2**63) <= arg < 2**63 else "u64")
        return ("i", arg == 1, arg % 16 == 0, kind)
    if isinstance(arg, float):
        return ("f",)
    raise TypeError(f"no Triton specialization known for an argument of type {type(arg).__name__}")


def variant_key(
    kernel: Any, device_index: int, args: tuple[Any, ...], meta: dict[str, Any]
) -> tuple[Any, ...]:
    """The key under which a compiled variant is kept: two calls with equal keys run the same machine code."""
    return (kernel, device_index, tuple(arg_spec(a) for a in args), tuple(sorted(meta.items())))


class StandIn:
    """A pointer argument for compiling: a dtype and an address that is, or is not, 16-byte aligned."""

    def __init__(self, dtype: torch.dtype, aligned: bool) -> None:
        self.dtype = dtype
        self.shape = [1]
        self._ptr = 0 if aligned else 1

    def data_ptr(self) -> int:
        return self._ptr

    def stride(self) -> tuple[int, ...]:
        return (1,)


class Address(StandIn):
    """A pointer argument given by its address on the device (memory that no torch tensor holds, such as an
    array XLA allocated): launched as that address, specialized as a tensor of ``dtype``."""

    def __init__(self, address: int, dtype: torch.dtype) -> None:
        super().__init__(dtype, True)
        self._ptr = address

    def element_size(self) -> int:
        return self.dtype.itemsize


class Addresses:
    """A column of pointer arguments, one per weight of a grouped launch, given by their addresses on the
    device (``numpy`` int64 ``[n]``), all of ``dtype``: no object is made per address (element ``i`` is
    ``Address(addresses[i], dtype)``)."""

    def __init__(self, addresses: Any, dtype: torch.dtype) -> None:
        self.addresses = addresses
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.addresses)

    def __getitem__(self, i: int) -> Address:
        return Address(int(self.addresses[i]), self.dtype)

    def __iter__(self) -> Iterator[Address]:
        return (Address(int(a), self.dtype) for a in self.addresses)

    def element_size(self) -> int:
        return self.dtype.itemsize


def stand_ins(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` with every tensor replaced by a :class:`StandIn` of the same specialization."""
    return tuple(StandIn(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args)


def describe(
    kernel: Any, args: tuple[Any, ...], meta: dict[str, Any], record: pathlib.Path | None = None
) -> dict[str, Any]:
    """A JSON description of one variant (``args`` real or :func:`stand_ins`), for the compile process
    (``_compile_child``), which writes ``record`` (:func:`record_path`) once the variant is in the cache."""
    return {
        "record": None if record is None else str(record),
        "module": kernel.fn.__module__,
        "name": kernel.fn.__name__,
        "args": [
            ["t", str(a.dtype).removeprefix("torch."), a.data_ptr() % 16 == 0]
            if isinstance(a, (torch.Tensor, StandIn))
            else ["f", a]
            if isinstance(a, float)
            else ["i", a]
            for a in args
        ],
        "meta": meta,
    }


def triton_cache_dir() -> pathlib.Path:
    """The directory Triton caches compiled kernels in."""
    try:
        from triton import knobs

        configured = knobs.cache.dir
    except (ImportError, AttributeError):
        configured = None
    if configured:
        return pathlib.Path(configured)
    if os.environ.get("TRITON_CACHE_DIR"):
        return pathlib.Path(os.environ["TRITON_CACHE_DIR"])
    return pathlib.Path(os.environ.get("TRITON_HOME") or pathlib.Path.home()) / ".triton" / "cache"


def _capability(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return major * 10 + minor


def record_path(kernel: Any, args: tuple[Any, ...], meta: dict[str, Any], capability: int) -> pathlib.Path:
    """Where the record of one compiled variant lives: named by what Triton specializes on (not the
    arguments' values, so that every size of one variant shares it)."""
    import triton

    spec = [arg_spec(a) for a in args]
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("TRITON_") and k != "TRITON_CACHE_DIR")
    text = json.dumps(
        [triton.__version__, kernel.cache_key, spec, sorted(meta.items()), capability, env], default=str
    )
    return triton_cache_dir() / "qbridge-variants" / hashlib.sha256(text.encode()).hexdigest()


def write_record(path: pathlib.Path) -> None:
    """Records that the variant of ``path`` (:func:`record_path`) is in Triton's cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as e:  # a read-only cache: the next process compiles again
        log.debug("could not record a compiled variant at %s: %s", path, e)


def _compile_elsewhere(specs: list[dict[str, Any]], capability: int) -> bool:
    """Compiles ``specs`` into Triton's cache in a new Python process; True when it succeeded."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(triton_cache_dir()))
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    request = json.dumps({"capability": capability, "variants": specs})
    try:
        done = subprocess.run(
            [sys.executable, "-m", "torch_side._compile_child"],
            input=request, capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("the compile process did not run (%s); compiling in this process", e)
        return False
    if done.returncode != 0:
        log.debug("the compile process failed (%s); compiling in this process", done.stderr[-2000:])
        return False
    return True


def _load(kernel: Any, args: tuple[Any, ...], meta: dict[str, Any], device_index: int) -> Any:
    """Triton's compiled kernel for the variant of ``args`` (stand-ins will do) and ``meta`` on the device:
    from Triton's memory, its disk cache, or compiled now."""
    with _LOCK, torch.cuda.device(device_index):
        return kernel.warmup(*args, grid=(1,), **meta)


def _work() -> None:
    global _WORKING
    while True:
        batch = [_QUEUE.get()]
        # the first calls of a model ask for several variants at once: one compile process for all
        time.sleep(GATHER_S)
        while True:
            try:
                batch.append(_QUEUE.get_nowait())
            except queue.Empty:
                break
        if any(item[1] is None for item in batch):  # the kernels' module, imported away from the caller
            try:
                importlib.import_module(KERNELS_MODULE)
            except Exception as e:  # the caller's thread imports it next time, and raises the error
                log.debug("importing %s failed: %r", KERNELS_MODULE, e)
                _FAILED.add(IMPORT_KEY)
            _IMPORTED.set()
            with _IDLE:
                _WORKING -= sum(item[1] is None for item in batch)
                _IDLE.notify_all()
            batch = [item for item in batch if item[1] is not None]
            if not batch:
                continue
        # each batch in a thread of its own: variants asked for while a compile process runs start theirs at
        # once, so that a process that ends early (a script's one load) leaves every one of them recorded
        try:
            threading.Thread(
                target=_make_ready, args=(batch,), name="torch_side-triton-compile", daemon=True
            ).start()
        except RuntimeError:  # a thread limit: this thread does it
            _make_ready(batch)


def _claim(
    records: list[tuple[pathlib.Path, int]], batch: list[_Item]
) -> tuple[dict[int, list[dict[str, Any]]], list[pathlib.Path], list[threading.Event]]:
    """Of a batch's variants missing from Triton's cache, those this batch compiles (their descriptions by
    architecture, and their records, now marked as being compiled) and the events of those another batch is
    compiling already (one variant asked for on several GPUs)."""
    missing: dict[int, list[dict[str, Any]]] = {}
    mine: list[pathlib.Path] = []
    others: list[threading.Event] = []
    with _IDLE:
        for (record, capability), (_, kernel, args, meta, _) in zip(records, batch, strict=True):
            if record.exists() or record in mine:
                continue
            if record in _COMPILING:
                others.append(_COMPILING[record])
                continue
            _COMPILING[record] = threading.Event()
            mine.append(record)
            # the compile process records it: a process that ends first
            missing.setdefault(capability, []).append(describe(kernel, args, meta, record))
    return missing, mine, others


def _make_ready(batch: list[_Item]) -> None:
    """Compiles the variants of ``batch`` that Triton's cache lacks in a compile process, then loads them."""
    global _WORKING
    try:
        records = []
        for _, kernel, args, meta, device_index in batch:
            capability = _capability(device_index)
            records.append((record_path(kernel, args, meta, capability), capability))
        missing, mine, others = _claim(records, batch)
        try:
            for capability, specs in missing.items():
                _compile_elsewhere(specs, capability)  # if it fails, the load below compiles here
        finally:
            with _IDLE:
                for record in mine:
                    _COMPILING.pop(record).set()
        for event in others:
            event.wait()
        for (record, _), (key, kernel, args, meta, device_index) in zip(records, batch, strict=True):
            try:
                _READY[key] = _load(kernel, args, meta, device_index)
                if not record.exists():  # Triton's cache holds it now
                    write_record(record)
            except Exception as e:  # the caller's thread compiles it next time, and raises Triton's error
                log.debug("background compile of %s failed: %r", kernel, e)
                _FAILED.add(key)
    except Exception as e:
        log.debug("background compiles failed: %r", e)
        for key, *_ in batch:
            _FAILED.add(key)
    finally:
        with _IDLE:
            _WORKING -= len(batch)
            _IDLE.notify_all()


def _request(
    key: tuple[Any, ...], kernel: Any, args: tuple[Any, ...], meta: dict[str, Any], device_index: int
) -> bool:
    """Hands a variant to the background thread (once); False when no thread can be started (then the
    caller's thread does the work, as with ``QBRIDGE_TRITON_COMPILE=wait``)."""
    global _WORKER, _WORKING
    with _IDLE:
        if key in _REQUESTED:
            return True
        if _WORKER is None or not _WORKER.is_alive():
            worker = threading.Thread(target=_work, name="torch_side-triton-compile", daemon=True)
            try:
                worker.start()
            except RuntimeError as e:  # a thread limit, or interpreter shutdown
                log.debug(
                    "no background thread for Triton compiles (%s): compiling on the caller's thread", e
                )
                _FAILED.add(key)
                return False
            _WORKER = worker
        _REQUESTED.add(key)
        _WORKING += 1
    # stand-ins only: the queue holds no reference to the caller's tensors
    _QUEUE.put((key, kernel, stand_ins(args), dict(meta), device_index))
    return True


def kernels_imported(wait: bool) -> None:
    """Returns when the caller may import the Triton kernels' module (``_triton``) without waiting: it is
    imported already, or ``wait``, or ``QBRIDGE_TRITON_COMPILE=wait``. Importing it imports Triton (about
    0.15 s), so otherwise the background thread imports it.

    Raises:
        KernelNotReady: the module is being imported in the background.
    """
    if _IMPORTED.is_set() or wait or IMPORT_KEY in _FAILED or _waiting():
        return
    module = sys.modules.get(KERNELS_MODULE)
    if module is not None and not getattr(module.__spec__, "_initializing", False):  # imported elsewhere
        _IMPORTED.set()
        return
    if _request(IMPORT_KEY, None, (), {}, -1):
        raise KernelNotReady


def ready_kernel(
    kernel: Any, args: tuple[Any, ...], meta: dict[str, Any], device_index: int, *, wait: bool
) -> Any:
    """Triton's ``CompiledKernel`` for launching ``kernel`` with ``args`` and ``meta`` on CUDA device
    ``device_index`` (current on this thread).

    Args:
        wait: compile or load on this thread if needed (also when ``QBRIDGE_TRITON_COMPILE=wait``, and for
            a variant whose background compile failed, so that Triton's error reaches the caller).

    Raises:
        KernelNotReady: ``wait`` is false and the variant is being made ready in the background.
    """
    key = variant_key(kernel, device_index, args, meta)
    compiled = _READY.get(key)
    if compiled is not None:
        return compiled
    if not wait and key not in _FAILED and not _waiting():
        if _request(key, kernel, args, meta, device_index):
            raise KernelNotReady
    compiled = _load(kernel, stand_ins(args), meta, device_index)
    _READY[key] = compiled
    return compiled


def ask(kernel: Any, args: tuple[Any, ...], meta: dict[str, Any], device_index: int) -> None:
    """Starts making a variant ready in the background, as a call with ``wait=False`` would, without
    launching it: for a variant that later calls will need (the grouped launch of weights whose single
    launch is being compiled), so that one compile process makes both. ``args`` may be stand-ins. Does
    nothing where calls wait for their kernels, or for a variant ready, asked for, or failed already."""
    key = variant_key(kernel, device_index, args, meta)
    if key not in _READY and key not in _FAILED and not _waiting():
        _request(key, kernel, args, meta, device_index)


def _waiting() -> bool:
    return _WAIT_FROM_NOW or compile_mode() == "wait"


def wait_for_kernels(timeout: float | None = None) -> bool:
    """Waits for the Triton kernels being imported, compiled or loaded in the background, and makes every
    later call of this process wait for the kernel it needs instead of answering another way (as
    ``QBRIDGE_TRITON_COMPILE=wait`` does; it cannot be undone).

    On CUDA, calls with the default ``backend="auto"`` answer from the exact torch path (or bitsandbytes'
    kernel) while Triton and a kernel they need are made ready in the background: the same bits, more
    slowly. Call this once where every call must run the compiled kernels, then make one call of each
    kind (which compiles or loads what was not asked for yet) before timing them or capturing them in a
    CUDA graph. On the CPU, the first 4-bit call of a machine builds qbridge's C kernel in the background
    (about a second, ``torch_side/_native.py``; the torch path answers meanwhile): this waits for that
    build too. Where nothing runs in the background it returns True at once.

    Args:
        timeout: seconds to wait at most; None waits as long as it takes.

    Returns:
        True when nothing is left in the background, False when ``timeout`` ran out first.
    """
    global _WAIT_FROM_NOW
    _WAIT_FROM_NOW = True
    deadline = None if timeout is None else time.monotonic() + timeout
    with _IDLE:
        while _WORKING:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            _IDLE.wait(left)
    return wait_for_build(None if deadline is None else max(0.0, deadline - time.monotonic()))
