"""Reading quantized PyTorch checkpoints: which tensors there are, in which format, from headers alone.

Formats:
    ``bitsandbytes-4bit``  transformers ``save_pretrained`` of a 4-bit model: ``<m>.weight`` (packed uint8)
                           with ``.absmax``, ``.quant_map``, ``.nested_absmax``, ``.nested_quant_map`` and
                           ``.quant_state.bitsandbytes__nf4|fp4`` (a JSON document stored as uint8).
    ``bitsandbytes-8bit``  ``<m>.weight`` int8 with ``<m>.SCB`` (row absmax): ``weight * SCB / 127``.
    ``fp8``                HF fine-grained FP8: ``<m>.weight`` float8 with ``<m>.weight_scale_inv`` (or
                           ``weight_scale``); block size from ``quantization_config.weight_block_size``.
    ``torchao``            ``torch.save`` state dicts of torchao tensor subclasses (read with
                           ``weights_only=True``), or torchao's safetensors layout (``tensor_names`` metadata).
    ``safetensors``/``torch``  plain (unquantized) tensors.

No pickle code is ever executed: torch files are read with ``weights_only=True`` only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import difflib
import functools
import json
import math
import mmap
import os
import pathlib
import pickle
import re
import stat
import threading
import warnings
from collections.abc import Callable, Collection, Container, Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np
import torch

import torch_side
from jax_side._tree import warn_at_caller
from torch_side import _native
from torch_side._checks import BlockSizeUnknown
from torch_side._fp8 import check_scale_dtype

from . import _staging
from ._classify import Classification, ConfigMismatch, ModuleInfo, classify, config_mismatches, module_info
from ._dtypes import safetensors_dtype
from ._errors import CheckpointError, FormatError

BNB_STATE = re.compile(r"^(?P<name>.+)\.quant_state\.bitsandbytes__(?P<qt>nf4|fp4)$")
BNB_PIECES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
FP8_SCALES = ("_scale_inv", "_scale")
DTYPES = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
    "torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16, "torch.float32": torch.float32,
}  # fmt: skip
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# files that sit beside a model's weights without being them (PEFT adapters, optimizer and trainer state)
NOT_MODEL_FILES = {
    "adapter_model.safetensors",
    "adapter_model.bin",
    "optimizer.pt",
    "optimizer.bin",  # accelerate's save_state
    "scheduler.pt",
    "scheduler.bin",
    "training_args.bin",
    "rng_state.pth",
    "scaler.pt",
}
_RNG_STATES = re.compile(r"rng_state_\d+\.pth")  # transformers' Trainer, one per process


def not_model_file(name: str) -> bool:
    """Whether a file of this name, beside a model's weights, holds something else (adapters, a trainer's
    optimizer, scheduler, random states)."""
    return name in NOT_MODEL_FILES or _RNG_STATES.fullmatch(name) is not None


@dataclasses.dataclass
class Entry:
    """One weight as the checkpoint stores it.

    Attributes:
        name: the torch parameter name (``model.layers.0.mlp.down_proj.weight``).
        kind: ``"dense"``, ``"bnb4"``, ``"bnb8"``, ``"fp8"`` or ``"torchao"``.
        shape: the dequantized shape.
        dtype: the dequantized dtype.
        stored_bytes: bytes the checkpoint holds for it (all pieces).
        keys: role -> checkpoint key (``{"weight": ..., "absmax": ...}``).
        info: format details (the bitsandbytes quant-state JSON, the FP8 block size, the torchao type).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stored_bytes: int
    keys: dict[str, str]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def dense_bytes(self) -> int:
        """Bytes of the dequantized weight, ``prod(shape) * dtype.itemsize``."""
        return math.prod(self.shape) * self.dtype.itemsize


class _Entries(dict[str, Entry]):
    """weight name -> :class:`Entry`; a name that is no weight's raises a KeyError saying what it is instead
    (a stored piece of a weight, with that weight's name) or the closest weight name."""

    def __missing__(self, key: str) -> Entry:
        for entry in self.values():
            for role, stored in entry.keys.items():
                if stored == key and role != "weight":
                    raise KeyError(
                        f"{key!r} is the {role!r} piece of weight {entry.name!r}: entries are keyed by weight "
                        f"name (entries[{entry.name!r}].keys[{role!r}] is this key; read it with read({key!r}))"
                    )
        raise KeyError(f"the checkpoint has no weight {key!r}{_did_you_mean(str(key), self, 0.8)}")


# Flax's names of a torch module's ``weight`` (Dense, LayerNorm / RMSNorm, Embed)
_FLAX_LEAF = re.compile(r"\.(kernel|scale|embedding)$")


def _did_you_mean(key: str, names: Collection[str], cutoff: float) -> str:
    """``"; did you mean 'name'?"`` for the name of ``names`` that ``key`` most likely meant (a module's name
    without ``.weight``, a Flax leaf name, a typo or a plural), or ``""`` (also for a key that is not a string)."""
    if not isinstance(key, str):
        return ""
    for guess in (f"{key}.weight", _FLAX_LEAF.sub(".weight", key)):
        if guess != key and guess in names:
            leaf = key.rpartition(".")[2]
            transposed = ", as [out, in]: the kernel's transpose" if leaf == "kernel" else ""
            why = f" (torch's checkpoints store Flax's {leaf!r} as 'weight'{transposed})"
            why = why if guess != f"{key}.weight" else ""
            return f"; did you mean {guess!r}?{why}"
    close = difflib.get_close_matches(key, names, n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""


# tensors up to this size (quant maps, FP8 scale grids, norms) are kept once read: every shard of a weight
# needs them whole, and reading them again for each device would multiply small reads by the device count
SMALL_TENSOR_BYTES = 1 << 16
# background readers of read_ahead (page cache to host memory); 8 made repeated loads of an NF4 checkpoint
# 0.76-0.95x the time of 4 in five rounds of fresh processes on an H200 host (benchmarks/RESULTS.md)
READ_THREADS = 8
READ_AHEAD_MIN_BYTES = SMALL_TENSOR_BYTES  # smaller tensors are read when asked for
READ_PART_BYTES = 16 << 20  # a tensor read ahead that is over twice this is read in parts this size
STAGE_SMALL_BYTES = 64 << 20  # stage_small's page-locked buffer holds at most this much


_Check = Callable[[str, torch.Tensor], None]  # sees a stored tensor in host memory; raises to refuse it


class _Source:
    """Where tensors come from: safetensors files opened lazily, or one torch state dict."""

    def __init__(self) -> None:
        self.key_file: dict[str, pathlib.Path] = {}
        # tensors an index-named file holds that the index does not list (loaded all the same): key -> file
        self.unlisted: dict[str, pathlib.Path] = {}
        # tensors of torch files that qbridge cannot read (sparse, nested, torch-quantized): left out of the
        # checkpoint, with why; a load that needs one refuses it (see Checkpoint.refuse_unreadable)
        self.unreadable: dict[str, str] = {}
        # tensors the index lists in a file that does not hold them: key -> that file (see adopt_misplaced);
        # and what each file of an index holds (safetensors: its keys; torch: its state dict)
        self.misplaced: dict[str, pathlib.Path] = {}
        self._stored: dict[pathlib.Path, Any] = {}
        # tensors adopt_misplaced found in another file: key -> (the file the index names, the file holding it)
        self.moved: dict[str, tuple[pathlib.Path, pathlib.Path]] = {}
        # tensors an index-named file holds that the index lists in another file: key -> those files (see
        # adopt_misplaced: the same bits are a harmless copy, other bits are refused)
        self.also_held: dict[str, list[pathlib.Path]] = {}
        self.shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.metadata: dict[pathlib.Path, dict[str, str]] = {}
        self._open: dict[pathlib.Path, Any] = {}
        self._state: dict[str, torch.Tensor] | None = None
        self.bytes_read = 0  # tensor bytes handed out by read / read_slice / read_window (headers aside)
        self._count_lock = threading.Lock()
        self._byte_ranges: dict[pathlib.Path, dict[str, tuple[int, int]]] = {}
        self._header_sizes: dict[pathlib.Path, int] = {}
        # byte ranges worked out at opening (every tensor of the file added): _offsets takes them at the
        # file's first read, once it has checked that the header has the size it had at opening
        self._ranges_as_opened: dict[pathlib.Path, dict[str, tuple[int, int]]] = {}
        self._small: set[str] = set()  # small tensors read (and counted) once: scales, tables
        # stage_small's tensors not yet asked for: key -> (its bytes in page-locked host memory, its copy on a
        # device); each is handed out once
        self._staged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # read_ahead's readings: the tensor, and the staging block holding it (None: memory of its own)
        self._ahead: dict[str, concurrent.futures.Future[tuple[torch.Tensor, _staging.Block | None]]] = {}
        self._pid = os.getpid()  # a forked child's copies of the futures have no thread to finish them
        # each safetensors file as opened: maps and header reads use it, so a file replaced on disk
        # afterwards (an atomic re-save) is not mixed in
        self._files: dict[pathlib.Path, Any] = {}
        self._file_lock = threading.Lock()  # reader threads share the files' positions
        self._closed = False
        # reads using the files now: close() waits for them before closing the files (a descriptor closed
        # under a read could be reused by a file opened meanwhile, and the read would return its bytes)
        self._users = 0
        self._users_done = threading.Condition()
        self._users_pid = os.getpid()

    def add_safetensors(
        self, path: pathlib.Path, keys: list[str] | None = None, listed: Container[str] = ()
    ) -> None:
        """Adds a safetensors file, opened lazily; ``keys``: an index's entries for it (those it does not hold
        are left to :meth:`adopt_misplaced`), and the tensors it holds that the index, listing ``listed``,
        names nowhere."""
        from safetensors import safe_open

        _check_tensor_file(path, ".safetensors file", keys is not None)
        f = None
        try:
            handle = safe_open(str(path), framework="pt")
            # in the order of their offsets, where safetensors (0.6 and later) gives it
            by_offset = handle.offset_keys() if hasattr(handle, "offset_keys") else None
            stored = sorted(by_offset) if by_offset is not None else list(handle.keys())  # keys() sorts too
            available = set(stored)
            meta = handle.metadata() or {}
            selected = self._selected(path, stored, available, keys, listed)  # distinct keys it holds
            # every tensor of the file added: taken in the order of their offsets. safetensors checked at
            # opening that they lie back to back from the start of the data, so their byte ranges follow from
            # their sizes (see _offsets)
            whole = by_offset is not None and len(selected) == len(stored)
            if by_offset is not None and whole:
                selected = by_offset
            f = open(path, "rb")  # closed by close()
            # the header's size as opened: a file rewritten in place since is refused (see _offsets)
            size = _header_size(f, self._file_lock) or 0
            ranges: dict[str, tuple[int, int]] = {}
            at = 8 + size
            dtypes: dict[str, torch.dtype] = {}  # a file holds few dtypes: each name looked up once
            # looked up once for the loop (a file of DeepSeek-V3's holds about 560 keys)
            shapes, get_slice, prod = self.shapes, handle.get_slice, math.prod
            for key in selected:
                sl = get_slice(key)
                name = sl.get_dtype()
                dtype = dtypes.get(name)
                if dtype is None:
                    dtype = dtypes[name] = _st_dtype(name, path, key)
                shape = tuple(sl.get_shape())
                shapes[key] = (shape, dtype)
                if whole:
                    end = at + prod(shape) * dtype.itemsize
                    ranges[key] = (at, end)
                    at = end
            self.key_file.update(dict.fromkeys(selected, path))
        except Exception as e:
            if f is not None:
                f.close()
            if isinstance(e, CheckpointError):
                raise
            # safetensors' own errors: a truncated file, a corrupt header
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({type(e).__name__}: {e}){_shorter_than_its_header(path)}"
            ) from e
        self._open[path] = handle
        self._files[path] = f
        self._header_sizes[path] = size
        if whole:
            self._ranges_as_opened[path] = ranges
        self.metadata[path] = meta

    def _selected(
        self,
        path: pathlib.Path,
        stored: list[str],
        available: Collection[str],
        keys: list[str] | None,
        listed: Container[str] = (),
    ) -> list[str]:
        """The keys of ``path`` to add: all it stores; or those of an index's ``keys`` for it that it holds
        (the others recorded in ``misplaced`` for :meth:`adopt_misplaced`), and those it stores that the index
        (``listed``: every key it maps to a file) does not list, as transformers loads a shard file whole
        (recorded in ``unlisted`` for a warning). None may be held by a file added before."""
        if keys is not None:
            # set operations first (a file of a DeepSeek-V3 index holds hundreds of keys, all listed, all its
            # own): the ordered passes below only where one finds something
            have = available if isinstance(available, (set, frozenset)) else set(available)
            subset = isinstance(listed, (set, frozenset)) and have <= listed
            extra = [] if subset else [key for key in stored if key not in listed]
            self.unlisted.update(dict.fromkeys(extra, path))
            self._stored[path] = available
            own = set(keys)
            if not have <= own:
                for key in stored:
                    if key in listed and key not in own:
                        self.also_held.setdefault(key, []).append(path)
            if not own <= have:  # perhaps in another listed file, as transformers would load it
                missing = [key for key in keys if key not in available]
                self.misplaced.update(dict.fromkeys(missing, path))  # for adopt_misplaced
                keys = [key for key in keys if key in available]
            keys = keys + extra if extra else keys
        chosen = stored if keys is None else keys
        for key in () if self.key_file.keys().isdisjoint(chosen) else chosen:
            if key in self.key_file:
                raise CheckpointError(
                    f"{path}: holds {key!r}, which {self.key_file[key]} holds too; which one is the model's is not known"
                    + (
                        " (the checkpoint's index lists neither)"
                        if key not in listed and keys is not None
                        else ""
                    )
                )
        return stored if keys is None else keys

    def adopt_misplaced(self, beside: Callable[[], Iterable[tuple[pathlib.Path, set[str]]]] = tuple) -> None:
        """Once every file of an index is added: each tensor the index lists in a file that does not hold it
        is taken from the one other listed file that does (recorded in ``moved``), as transformers, which
        loads every tensor of each listed file, would load it; a tensor that the named file and another
        listed file both hold is loaded when both copies have the same bits.

        ``beside``: the files beside the index that it never names, with their keys (searched, for the message,
        for a misplaced tensor that no listed file holds).

        Raises:
            CheckpointError: no listed file holds a misplaced tensor (naming a file beside that holds it), or
                several do (naming them); two listed
                files hold different copies of a tensor (naming both: transformers would load the later
                file's, the index names the other, and which one is the model's is not known).
        """
        for key, others in self.also_held.items():
            named = self.key_file.get(key)
            if named is None:  # not in the file the index names: a misplaced tensor, below
                continue
            for other in others:
                if not self._same_bits(key, named, other):
                    raise CheckpointError(
                        f"{other}: holds {key!r} too, with other values than {named}, the file the index lists "
                        "it in; which copy is the model's is not known: remove the stale copy or correct the index"
                    )
        self.also_held.clear()
        for key, named in self.misplaced.items():
            holders = [path for path, held in self._stored.items() if path != named and key in held]
            if not holders:
                there = next((path for path, held in beside() if key in held), None)
                raise CheckpointError(
                    f"{named}: the index lists {key!r}, which this file does not hold, nor does any other file "
                    "the index names; "
                    + (
                        f"{there} holds it, but the index never names that file: list {key!r} under it in the "
                        "index (transformers does not read that file either)"
                        if there is not None
                        else "the checkpoint is incomplete (download or save it again)"
                    )
                )
            if len(holders) > 1:
                raise CheckpointError(
                    f"{named}: the index lists {key!r}, which this file does not hold, while "
                    f"{' and '.join(map(str, holders))} each hold it; which one is the model's is not known"
                )
            (holder,) = holders
            if holder in self._open:
                sl = self._open[holder].get_slice(key)
                self.shapes[key] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype(), holder, key))
            else:
                value = self._stored[holder][key]
                self._state = {**(self._state or {}), key: value}
                self.shapes[key] = (tuple(value.shape), value.dtype)
            self.key_file[key] = holder
            self.moved[key] = (named, holder)
        self._stored.clear()

    def _same_bits(self, key: str, a: pathlib.Path, b: pathlib.Path) -> bool:
        """Whether files ``a`` and ``b`` (both added, of an index) store ``key`` with the same dtype, shape
        and bytes (a tensor subclass is compared by its plain parts where it has them; else, not the same)."""

        def stored(path: pathlib.Path) -> Any:
            if path in self._open:
                return self._open[path].get_tensor(key)
            return self._stored[path][key]

        x, y = stored(a), stored(b)
        if type(x) is not type(y) or x.dtype != y.dtype or tuple(x.shape) != tuple(y.shape):
            return False
        try:
            return bool(
                torch.equal(
                    x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8)
                )
            )
        except Exception:  # a tensor subclass without a byte view: not known to be the same
            return False

    def add_torch(
        self, path: pathlib.Path, keys: list[str] | None = None, listed: Container[str] = ()
    ) -> None:
        """Adds a torch state-dict file (loaded mapped, ``weights_only``); ``keys``: an index's entries for
        this file (those it does not hold are left to :meth:`adopt_misplaced`), and the tensors it holds that
        the index, listing ``listed``, names nowhere."""
        _check_tensor_file(path, "torch file", keys is not None)
        _import_torchao_quietly()
        try:
            # mapped, unless saved in torch's format before 1.6 (not a zip archive; transformers' old
            # pytorch_model.bin files), which torch reads only whole
            with open(path, "rb") as f:
                zipped = f.read(4) == b"PK\x03\x04"
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipped)
        except Exception as e:
            lines = str(e).splitlines()
            # torch's own reason, where its message wraps it in advice about trusting the file
            reason = [line.strip() for line in lines if line.strip().startswith("WeightsUnpickler error:")]
            first = reason[0] if reason else lines[0] if lines else ""
            if (
                isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e).lower()
            ) or "Weights only load failed" in str(e):
                raise CheckpointError(
                    f"{path}: torch.load(weights_only=True) refused it ({type(e).__name__}: {first}). "
                    "qbridge never runs pickle code; re-save the checkpoint as a plain state dict of tensors"
                ) from e
            raise CheckpointError(
                f"{path}: the file is damaged (truncated or corrupt: {type(e).__name__}: {first}); download or save "
                "it again"
            ) from e
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
        if keys is not None:  # what the index leaves out is taken where it is a tensor (not a step count)
            state = {k: v for k, v in state.items() if k in listed or isinstance(v, torch.Tensor)}
        state = {key: state[key] for key in self._selected(path, list(state), state, keys, listed)}
        if keys is not None:
            self._stored[path] = {k: v for k, v in self._stored[path].items() if isinstance(v, torch.Tensor)}
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    f"{path}: expected a state dict of tensors; {key!r} holds a {type(value).__name__}"
                )
            if value.is_nested or value.layout != torch.strided:
                what, how = (
                    ("a nested tensor", "torch.nested.to_padded_tensor(t, 0.0)")
                    if value.is_nested
                    else (f"a sparse tensor ({value.layout})", "t.to_dense()")
                )
                self.unreadable[key] = (
                    f"{path} [{key}]: {what}; qbridge reads dense tensors: save it as {how}"
                )
            elif value.is_quantized:
                self.unreadable[key] = (
                    f"{path} [{key}]: a torch-quantized tensor ({value.dtype}); qbridge reads bitsandbytes, "
                    "FP8 and torchao quantization: save it with .dequantize()"
                )
        state = {key: value for key, value in state.items() if key not in self.unreadable}
        self._state = {**(self._state or {}), **state}
        for key, value in state.items():
            self.key_file[key] = path
            self.shapes[key] = (tuple(value.shape), value.dtype)

    @contextlib.contextmanager
    def _using_files(self, key: str) -> Iterator[None]:
        """Holds the files open while reading ``key``: :meth:`close` waits until no read uses them.

        Raises:
            CheckpointError: the checkpoint is closed (or closing).
        """
        users_done = self._users_here()
        with users_done:
            if self._closed:
                raise CheckpointError(f"reading {key!r} failed: the checkpoint is closed")
            self._users += 1
        try:
            yield
        finally:
            with users_done:
                self._users -= 1
                if not self._users:
                    users_done.notify_all()

    def _users_here(self) -> threading.Condition:
        """The condition guarding the count of reads using the files; a forked child starts from none (its
        parent's reading threads are not in it, and their lock may have been held when it forked)."""
        if os.getpid() != self._users_pid:
            self._users, self._users_done, self._users_pid = 0, threading.Condition(), os.getpid()
        return self._users_done

    def _reading(self) -> dict[str, concurrent.futures.Future[tuple[torch.Tensor, _staging.Block | None]]]:
        """The reads ahead this process may wait for: in a child forked while reads were running, none (the
        parent's threads, which would finish them, are not in the child: waiting would hang)."""
        if os.getpid() != self._pid:
            self._ahead, self._pid = {}, os.getpid()
        return self._ahead

    def read_ahead(self, key: str, *, pin: bool) -> int:
        """Starts reading the stored tensor ``key`` in a background thread, into pinned host memory with
        ``pin`` (so that its host-to-device copy can run asynchronously); the next :meth:`read`,
        :meth:`read_to` or :meth:`read_into` of ``key`` returns it. Returns the bytes it holds, 0 when
        nothing is read ahead: tensors of torch files (mapped already), small ones, keys read ahead
        already."""
        if self._closed or key in self._reading():
            return 0
        if key not in self.key_file:
            raise self._no_tensor(key)
        if self._state is not None:
            return 0
        shape, dtype = self.shapes[key]
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes <= READ_AHEAD_MIN_BYTES:
            return 0
        with self._users_here():  # close() takes the reads ahead under this lock: none is added after it
            if self._closed or key in self._reading():
                return 0
            self._ahead[key] = _readers().submit(self._copy_out, key, pin)
        return nbytes

    def _take_ahead(
        self, key: str
    ) -> concurrent.futures.Future[tuple[torch.Tensor, _staging.Block | None]] | None:
        """Takes ``key``'s read ahead, if there is one (then close() no longer sees it)."""
        with self._users_here():
            return self._reading().pop(key, None)

    def _copy_out(self, key: str, pin: bool) -> tuple[torch.Tensor, _staging.Block | None]:
        shape, dtype = self.shapes[key]
        nbytes = math.prod(shape) * dtype.itemsize
        block = _staging.take(nbytes) if pin else None
        out = torch.empty(shape, dtype=dtype, pin_memory=pin) if block is None else block.tensor(dtype, shape)
        try:
            # positioned reads, without the GIL: a copy from the file's map (torch's copy_) ran an OpenMP team
            # of every core in each reading thread, which starved the loader's own thread, and a file cut
            # short in place made it crash (SIGBUS) where a read ends early (benchmarks/RESULTS.md)
            self._read_bytes(self.key_file[key], key, out)
            return out, block
        except BaseException:
            if block is not None:
                block.give_back()
            raise

    def _read_ahead_result(
        self, key: str, ahead: concurrent.futures.Future[tuple[torch.Tensor, _staging.Block | None]]
    ) -> tuple[torch.Tensor, _staging.Block | None]:
        try:
            return ahead.result()
        except CheckpointError:  # closed while it was waiting to be read
            raise
        except concurrent.futures.CancelledError as e:  # dropped by close() before it started
            raise CheckpointError(f"reading {key!r} failed: the checkpoint is closed") from e
        except Exception as e:
            raise _read_error(self.key_file[key], key, e) from e

    def read(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key``, on the CPU."""
        if self._closed:
            raise CheckpointError(f"reading {key!r} failed: the checkpoint is closed")
        staged = self._staged.pop(key, None)
        if staged is not None:  # the host's copy of a tensor stage_small read: memory of its own
            return self._count_small(key, staged[0].clone())
        ahead = self._take_ahead(key)  # read by read_ahead's thread: its result, or its error
        state = self._state  # once: close() sets it to None
        # a torch file's tensor (a tensor subclass, torchao's, stays as stored), or None
        stored = state.get(key) if ahead is None and state is not None else None
        if stored is not None:
            t = stored
        elif ahead is not None:
            t, block = self._read_ahead_result(key, ahead)
            if block is not None:  # its own memory: the staging block goes back to the region now
                t = t.clone()
                block.give_back()
        else:
            path = self.key_file.get(key)
            if path is None:
                raise self._no_tensor(key)
            t = self._read_whole(path, key)
        # a small tensor read again (tables and scales, for another shard) is counted once; one read ahead
        # was not read before
        return self._count_read(key, t, again=ahead is None)

    def _no_tensor(self, key: str) -> CheckpointError:
        """The error for a key the checkpoint lacks, with the closest key it holds (a typo, a plural)."""
        return CheckpointError(f"checkpoint has no tensor {key!r}{_did_you_mean(key, self.key_file, 0.9)}")

    def _read_whole(self, path: pathlib.Path, key: str) -> torch.Tensor:
        """A stored tensor read into memory of its own (torch's, resizable, so that a CPU load's JAX array may
        share it) with positioned reads. Not a view of the file's map (``get_tensor``): for a small tensor
        that cost about 35 us on a GPU host, its copy faulted the map's pages in, and using such a view
        after the file was cut short in place crashed the process (SIGBUS)."""
        shape, dtype = self.shapes[key]
        t = torch.empty(shape, dtype=dtype)
        try:
            self._read_bytes(path, key, t)
        except CheckpointError:  # closed
            raise
        except Exception as e:  # a file or its header cut short since it was opened, say
            raise _read_error(path, key, e) from e
        return t

    def _read_bytes(self, path: pathlib.Path, key: str, t: torch.Tensor) -> None:
        """Reads the stored tensor ``key``'s bytes into ``t`` (contiguous CPU memory of its size) with
        positioned reads, written through its address (a numpy view would make torch's storage fixed-size).

        Raises:
            EOFError: the file ends before the tensor does (cut short since it was opened).
            ValueError: the header's byte range for ``key`` does not hold ``t``'s bytes.
            CheckpointError: the checkpoint is closed.
        """
        with self._using_files(key):
            self._read_bytes_open(path, key, t)

    def _read_bytes_open(self, path: pathlib.Path, key: str, t: torch.Tensor) -> None:
        begin, end = self._offsets(path)[key]
        if end - begin != t.numel() * t.element_size():
            raise ValueError(
                f"the header gives it {end - begin} bytes, its shape and dtype {t.numel() * t.element_size()}"
            )
        n = end - begin
        if not n:
            return
        raw = memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")
        f, lock = self._files[path], self._file_lock
        # a large tensor in parts: the first read here, the others on the part readers at once (one thread's
        # read of a whole embedding table took several times what the page cache gives several)
        parts = range(0, n, READ_PART_BYTES) if n > 2 * READ_PART_BYTES else range(0, n, n)
        others: list[concurrent.futures.Future[int]] = []
        try:
            for a in parts[1:]:
                others.append(
                    _readers("part").submit(_read_at, f, begin + a, raw[a : a + READ_PART_BYTES], lock)
                )
            got = _read_at(f, begin, raw[: min(n, parts.step)], lock)
        finally:
            if others:  # nothing writes into t once this returns or raises
                concurrent.futures.wait(others)
        got += sum(part.result() for part in others)
        if got != n:
            self._check_header(path)  # rewritten in place rather than cut short: says so
            raise _cut_short(got, n)

    def _check_not_cut(self, path: pathlib.Path, key: str) -> None:
        """Raises EOFError when the file, as opened, no longer holds all of ``key``'s bytes: a copy out of a
        map of a file cut short in place since it was mapped ends the process (SIGBUS) instead of failing."""
        begin, end = self._offsets(path)[key]
        size = os.fstat(self._files[path].fileno()).st_size
        if size < end and end > begin:  # an empty tensor has no bytes to lose
            self._check_header(path)  # rewritten in place rather than cut short: says so
            raise _cut_short(max(0, size - begin), end - begin)

    def count_stacked(self, keys: Sequence[str]) -> None:
        """Counts the stored tensors ``keys`` (of one shape and dtype) as read, as :meth:`read_stacked` counts
        them: a small one only the first time (then remembered)."""
        if not keys:
            return
        shape, dtype = self.shapes[keys[0]]
        nbytes = math.prod(shape) * dtype.itemsize
        with self._count_lock:  # a group's reads ahead are read in a reading thread, counted in the loader's
            if nbytes <= SMALL_TENSOR_BYTES:  # as _count_held(key, nbytes, again=True) for each, in one pass
                fresh = set(keys).difference(self._small)
                self._small.update(fresh)
                self.bytes_read += nbytes * len(fresh)
            else:
                self.bytes_read += nbytes * len(keys)

    def _count_read(self, key: str, t: torch.Tensor, *, again: bool = False) -> torch.Tensor:
        """Counts a tensor read from its file (see :meth:`_count_held`), under the lock (threads may read
        together)."""
        with self._count_lock:
            self._count_held(key, _tensor_nbytes(t), again=again)
        return t

    def _count_held(self, key: str, nbytes: int, *, again: bool) -> None:
        """Counts ``nbytes`` of ``key`` as read, the count lock held: a small tensor is remembered, so that
        reading it again (``again``: it may have been read before) is not counted."""
        if nbytes <= SMALL_TENSOR_BYTES:
            if again and key in self._small:
                return
            self._small.add(key)
        self.bytes_read += nbytes

    def _count_small(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """Counts a small tensor unless it was read (and counted) before, as :meth:`read` does."""
        return self._count_read(key, t, again=True)

    def stage_small(self, keys: Sequence[str], device: torch.device) -> int:
        """Reads the small stored tensors among ``keys`` (at most ``SMALL_TENSOR_BYTES`` each; of safetensors
        files) into one page-locked buffer, at most ``STAGE_SMALL_BYTES`` in all, and queues one copy of it
        to the CUDA ``device`` on its current stream; returns the bytes staged. The next :meth:`read_to` of
        such a key for that device returns its part of that copy (with ``check`` seeing its host bytes) and
        the next :meth:`read` its host bytes, each once. Keys not staged (larger, read ahead, unknown, of a
        torch file, or whose bytes cannot be read: their read says why) are read as before. Checked by
        :meth:`Checkpoint.stage_small`: ``keys`` a sequence, ``device`` a CUDA device torch has."""
        if self._state is not None:
            return 0
        chosen: list[tuple[str, int, int]] = []  # key, offset in the buffer, bytes
        total = 0
        for key in dict.fromkeys(keys):
            if key in self._staged or key not in self.key_file or key in self._reading():
                continue
            shape, dtype = self.shapes[key]
            n = math.prod(shape) * dtype.itemsize
            if not 0 < n <= SMALL_TENSOR_BYTES or total + n > STAGE_SMALL_BYTES:
                continue
            chosen.append((key, total, n))
            total += -(-n // 16) * 16  # each tensor 16-byte aligned
        if not chosen:
            return 0
        host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        views: dict[str, torch.Tensor] = {}
        for key, at, n in chosen:
            shape, dtype = self.shapes[key]
            view = host[at : at + n].view(dtype).view(shape)
            try:
                self._read_bytes(self.key_file[key], key, view)
            except CheckpointError:  # closed
                raise
            except Exception:  # a file cut short, a header that does not hold it: its own read will say
                continue
            views[key] = view
        on_device = host.to(device, non_blocking=True)  # the buffer lives while a view of it does
        with self._users_here():  # close() drops what is staged under this lock: nothing is added after it
            if self._closed:
                raise CheckpointError("staging failed: the checkpoint is closed")
            for key, at, n in chosen:
                if key in views:
                    shape, dtype = self.shapes[key]
                    self._staged[key] = (views[key], on_device[at : at + n].view(dtype).view(shape))
        return sum(n for key, _, n in chosen if key in views)

    def read_into(
        self, keys: Sequence[str], outs: Sequence[torch.Tensor], *, check: _Check | None = None
    ) -> None:
        """Copies each stored tensor ``keys[i]`` into ``outs[i]`` (its shape and dtype, on any device), on the
        current stream of that device, without waiting for the copy, after ``check(key, tensor)`` has seen
        it in host memory. A key read ahead into the staging region gives its block back once the device
        has copied it."""
        if isinstance(keys, str) or len(keys) != len(outs):
            raise ValueError(
                f"read_into takes a sequence of keys, one per tensor, got {keys!r} for {len(outs)}"
            )
        for key, out in zip(keys, outs, strict=True):
            if out.device.type == "meta":  # a copy into it would do nothing
                raise ValueError(f"read_into: the tensor for {key!r} is a meta tensor, which holds no data")
            if key in self.shapes and (tuple(out.shape), out.dtype) != self.shapes[key]:
                shape, dtype = self.shapes[key]
                raise ValueError(
                    f"read_into: {key!r} is {list(shape)} {dtype}, the tensor for it {list(out.shape)} {out.dtype}"
                )
        returning: list[tuple[_staging.Block, torch.device]] = []
        try:
            for key, out in zip(keys, outs, strict=True):
                ahead = self._take_ahead(key)
                if ahead is None:
                    t = self.read(key)
                    if check is not None:
                        check(key, t)
                    out.copy_(t, non_blocking=True)
                    continue
                t, block = self._read_ahead_result(key, ahead)
                if block is not None:
                    returning.append((block, out.device))
                if check is not None:
                    check(key, t)
                out.copy_(t, non_blocking=True)
                self._count_read(key, t)
        finally:
            events: dict[torch.device, torch.cuda.Event] = {}
            for block, device in returning:
                if device.type != "cuda":  # copied already
                    block.give_back()
                    continue
                if device not in events:
                    events[device] = torch.cuda.Event()
                    events[device].record(torch.cuda.current_stream(device))
                block.give_back(events[device])

    def read_to(self, key: str, device: torch.device, *, check: _Check | None = None) -> torch.Tensor:
        """The tensor stored under ``key`` on ``device``, copied on its current stream without waiting, after
        ``check(key, tensor)`` has seen it in host memory."""
        device = torch.device(device)
        staged = self._staged.get(key) if not self._closed else None
        if (
            staged is not None
            and _same_device(staged[1].device, device)
            and self._staged.pop(key, None) is staged
        ):
            if check is not None:
                check(key, staged[0])
            return self._count_small(key, staged[1])
        if device.type == "cpu" or key not in self._reading():
            t = self.read(key)
            if check is not None:
                check(key, t)
            return t.to(device, non_blocking=True)
        shape, dtype = self.shapes[key]
        out = torch.empty(shape, dtype=dtype, device=device)
        self.read_into([key], [out], check=check)
        return out

    def read_stacked(self, keys: Sequence[str], *, pin: bool, count: bool = True) -> torch.Tensor:
        """The stored tensors ``keys`` (plain tensors of one shape and dtype) as the rows of one new CPU tensor
        ``[len(keys), row]`` of their dtype: row ``i`` holds tensor ``i``'s elements in order, then padding
        (unset) up to a multiple of 16 bytes. Pinned memory with ``pin`` (CUDA needed). A safetensors file's
        tensor is read with positioned reads straight into its row (tensors close together in one read); each
        key is counted as :meth:`read` counts it, or, without ``count``, left for :meth:`count_stacked` (a
        read ahead that may be dropped; keys of safetensors files not read ahead by themselves only: others are
        read through :meth:`read`, which counts)."""
        if isinstance(keys, str) or not keys:
            raise ValueError(f"read_stacked takes a non-empty sequence of keys, got {keys!r}")
        for key in keys:
            if key not in self.key_file:
                raise self._no_tensor(key)
        if self._closed:
            raise CheckpointError(f"reading {keys[0]!r} failed: the checkpoint is closed")
        shape, dtype = self.shapes[keys[0]]
        numel = math.prod(shape)
        row = -(-numel * dtype.itemsize // 16) * 16 // dtype.itemsize
        out = torch.empty((len(keys), row), dtype=dtype, pin_memory=pin)
        nbytes, row_bytes = numel * dtype.itemsize, row * dtype.itemsize
        flat = out.view(torch.uint8).numpy().data.cast("B") if nbytes else memoryview(b"")
        for key in keys:
            if self.shapes[key] != (shape, dtype):
                raise ValueError(f"read_stacked: {key!r} is {self.shapes[key]}, not {(shape, dtype)}")
        reading = self._reading()
        direct = self._state is None and nbytes > 0
        # the files are held once for the whole batch (close() waits for it), each file's byte ranges looked
        # up once: a batch is a group of weights' scales, dozens of tiny reads. Tensors that lie close
        # together in a file (a group's scales are every third one of a layer's experts) are read with one
        # positioned read of many buffers: their rows, and a scratch buffer for the bytes between them
        with self._using_files(keys[0]):
            if direct and reading.keys().isdisjoint(keys) and self._read_evenly_spaced(keys, out, nbytes):
                if count:
                    self.count_stacked(keys)
                return out
            direct_reads: dict[pathlib.Path, list[tuple[int, int, str]]] = {}  # path -> (begin, row, key)
            path: pathlib.Path | None = None  # the last key's file (compared by identity: no hash per key)
            bucket: list[tuple[int, int, str]] = []
            offsets: dict[str, tuple[int, int]] = {}
            for i, key in enumerate(keys):
                if not direct or key in reading:
                    out[i, :numel].copy_(self.read(key).reshape(-1))
                    continue
                held = self.key_file[key]
                try:
                    if held is not path:
                        path, bucket = held, direct_reads.setdefault(held, [])
                        offsets = self._offsets(held)  # a header cut short since opening: ValueError
                    begin, end = offsets[key]
                except (OSError, ValueError, KeyError) as e:  # as read() says it (KeyError: a header read
                    raise _read_error(held, key, e) from e  # again that no longer lists it)
                if end - begin != nbytes:
                    raise CheckpointError(
                        f"{held}: reading {key!r} failed: {end - begin} bytes stored where {nbytes} belong (a "
                        "truncated or damaged file)"
                    )
                bucket.append((begin, i, key))
            for held, wanted in direct_reads.items():
                wanted.sort()
                f = self._files[held]
                runs = _runs(wanted, nbytes)  # tensors at most _GAP_READ apart: one read each where it can
                # the tensors alone in their runs (far apart: one projection of a layer's experts) in one call;
                # else read below with the runs, where what fails is named
                alone = [wanted[j] for j, k in runs if k - j == 1]
                if len(alone) > 1 and _read_ranges(f, alone, out.data_ptr(), nbytes, row_bytes):
                    runs = [(j, k) for j, k in runs if k - j > 1]
                for j, k in runs:
                    if k - j == 1 or not _read_together(f, wanted[j:k], flat, nbytes, row_bytes):
                        for begin, i, key in wanted[j:k]:  # one at a time: short reads repeated, errors named
                            try:
                                got = _read_at(
                                    f, begin, flat[i * row_bytes : i * row_bytes + nbytes], self._file_lock
                                )
                            except OSError as e:  # as read() says it
                                raise _read_error(held, key, e) from e
                            if got != nbytes:
                                self._check_header(held)  # rewritten in place rather than cut short
                                raise CheckpointError(
                                    f"{held}: reading {key!r} failed: {got} of its {nbytes} bytes read (a truncated or "
                                    "damaged file)"
                                )
            if count:  # once read: a read that failed counts nothing
                self.count_stacked([key for wanted in direct_reads.values() for _, _, key in wanted])
        return out

    def _read_evenly_spaced(self, keys: Sequence[str], out: torch.Tensor, nbytes: int) -> bool:
        """:meth:`read_stacked`'s reads where its tensors (``nbytes`` each) lie evenly spaced in one safetensors
        file, in any order, at most ``_GAP_READ`` bytes apart (a group's scales: a file stores the tensors of one
        dtype together, by name, so one projection's scales are every third of a layer's experts'): one
        positioned read of the bytes from the first to the last, put in their rows by one copy. False, with
        nothing counted, where they are not so, or the read fails or comes up short: the general reads then
        read them and name what failed. The files are held by the caller."""
        held = self.key_file[keys[0]]
        key_file = self.key_file
        if len(keys) < 2 or not all(key_file[key] is held for key in keys):
            return False
        try:
            offsets = self._offsets(held)
            spans = np.array([offsets[key] for key in keys], dtype=np.int64).reshape(len(keys), 2)
        except (CheckpointError, OSError, ValueError, KeyError):
            return False
        if (spans[:, 1] - spans[:, 0] != nbytes).any():
            return False
        order = np.argsort(spans[:, 0], kind="stable")  # file order: order[j] is the row of the j-th tensor
        begins = spans[order, 0]
        step = int(begins[1] - begins[0])
        n = len(keys)
        span = (n - 1) * step + nbytes
        if not nbytes <= step <= nbytes + _GAP_READ or (np.diff(begins) != step).any() or span > _RUN_BYTES:
            return False
        data = np.empty(n * step, dtype=np.uint8)
        try:
            got = _read_at(self._files[held], int(begins[0]), data.data[:span], self._file_lock)
        except OSError:
            return False
        if got != span:
            return False
        out.view(torch.uint8).numpy()[order, :nbytes] = data.reshape(n, step)[:, :nbytes]
        return True

    def read_slice(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        """``tensor[index]`` read without reading the rest (safetensors reads only the requested rows)."""
        state = self._state  # once: close() sets it to None
        if state is not None and key in state:
            return self._counted(state[key][index].clone(memory_format=torch.contiguous_format))
        path = self.key_file.get(key)
        if path is None:
            raise self._no_tensor(key)
        try:
            with self._using_files(key):
                self._check_not_cut(path, key)
                # safetensors' slice is a view of its map of the file: copied out here, so that the result is
                # memory of its own (a view would end the process with SIGBUS if the file were cut later)
                t = self._open[path].get_slice(key)[index]
                return self._counted(t.clone(memory_format=torch.contiguous_format))
        except CheckpointError:  # closed
            raise
        except EOFError as e:
            raise _read_error(path, key, e) from e
        except Exception as e:
            raise CheckpointError(
                f"{path}: reading {key!r}{list(index)} failed ({type(e).__name__}: {e})"
            ) from e

    def _counted(self, t: torch.Tensor) -> torch.Tensor:
        n = _tensor_nbytes(t)
        with self._count_lock:
            self.bytes_read += n
        return t

    def read_window(
        self, key: str, row_bytes: int, rows: tuple[int, int], cols: tuple[int, int]
    ) -> torch.Tensor:
        """Bytes ``[rows[0]:rows[1], cols[0]:cols[1]]`` of the stored tensor ``key`` with its bytes viewed
        as rows of ``row_bytes``: a new uint8 CPU tensor. Only those byte ranges are copied, from the file's
        memory (:meth:`map_tensor`)."""
        (r0, r1), (c0, c1) = rows, cols
        path = self.key_file.get(key)
        state = self._state  # once: close() sets it to None
        if state is not None and key in state:
            flat = state[key].reshape(-1).view(torch.uint8)
        elif path is None:
            raise self._no_tensor(key)
        else:
            try:
                with self._using_files(key):
                    self._check_not_cut(path, key)
                    flat = self._map_open(path, key).reshape(-1).view(torch.uint8)
            except CheckpointError:  # closed
                raise
            # ValueError: a header cut short, a map past the end; KeyError: a header read again without it
            except (EOFError, OSError, ValueError, KeyError) as e:
                raise _read_error(path, key, e) from e
        if (
            row_bytes < 1
            or flat.numel() % row_bytes
            or not 0 <= r0 <= r1 <= flat.numel() // row_bytes
            or not 0 <= c0 <= c1 <= row_bytes
        ):
            raise CheckpointError(
                f"{self.key_file[key]}: reading {key!r} failed: its {flat.numel()} bytes do not hold rows {rows}, "
                f"columns {cols} of rows of {row_bytes} bytes"
            )
        # copied (contiguous() keeps a full-width window as a view of the map): memory of its own
        return self._counted(
            flat.view(-1, row_bytes)[r0:r1, c0:c1].clone(memory_format=torch.contiguous_format)
        )

    def map_tensor(self, key: str) -> torch.Tensor:
        """The stored tensor ``key`` over the file's memory (a copy-on-write map of a safetensors file; a
        torch file's tensors are mapped already): nothing is read until it is used, and nothing is
        counted. Count what is used with :meth:`count`."""
        state = self._state  # once: close() sets it to None
        if state is not None and key in state:
            return state[key]
        path = self.key_file.get(key)
        if path is None:
            raise self._no_tensor(key)
        with self._using_files(key):
            # a header cut short, a map past the end of a file cut short: an error as read() gives it
            try:
                return self._map_open(path, key)
            except (OSError, ValueError, KeyError) as e:  # KeyError: a header read again without it
                raise _read_error(path, key, e) from e

    def _map_open(self, path: pathlib.Path, key: str) -> torch.Tensor:
        """:meth:`map_tensor` of a safetensors file's ``key``, in a read holding the files open."""
        shape, dtype = self.shapes[key]
        begin, end = self._offsets(path)[key]
        if end <= begin:
            return torch.empty(0, dtype=torch.uint8).view(dtype).reshape(shape)
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        # a copy-on-write map of the tensor's pages (the file never changes through it), unmapped when the
        # tensor is gone; mmap refuses a range past the file's end (a truncated file) with ValueError
        mapping = mmap.mmap(self._files[path].fileno(), end - start, offset=start, access=mmap.ACCESS_COPY)
        # a view of the map, which it keeps alive (the map is unmapped when its last view is gone)
        raw = torch.frombuffer(mapping, dtype=torch.uint8, count=end - begin, offset=begin - start)
        return raw.view(dtype).reshape(shape)

    def count(self, t: torch.Tensor) -> torch.Tensor:
        """Counts ``t``'s bytes (its inner tensors' for a tensor subclass) as read; returns ``t``."""
        return self._counted(t)

    def _check_header(self, path: pathlib.Path) -> int:
        """The size of a safetensors file's header, read from the file now.

        Raises:
            CheckpointError: another size than when it was opened (the file was rewritten in place: its
                tensors may lie elsewhere now). A rewrite that keeps the size is not seen.
        """
        opened = self._header_sizes.get(path)
        size = _header_size(self._files[path], self._file_lock)
        if size is None or opened is None:  # cut short to less than a header: the read says how short
            return opened or 0
        if size != opened:
            raise CheckpointError(
                f"{path}: the file changed on disk since the checkpoint was opened (rewritten in place); open "
                "the checkpoint again"
            )
        return size

    def _offsets(self, path: pathlib.Path) -> dict[str, tuple[int, int]]:
        """Absolute byte ranges of a safetensors file's tensors.

        safetensors, opening the file, checked that its tensors lie back to back from the start of the data in
        the order of their offsets (``Metadata::validate``), so where every tensor of the file was added, the
        ranges followed from their sizes in that order (``offset_keys``) and the header's size as the file was
        added (:meth:`add_safetensors`): they are taken here, at the file's first read. Otherwise (a file
        holding tensors an index lists elsewhere, or safetensors older than 0.6) they are read from the
        header's ``data_offsets``. A file of 91,000 tensors costs a sum per tensor instead of a parse of its
        JSON header.

        Raises:
            CheckpointError: the file's header has another size than when it was opened (rewritten in place;
                checked when the ranges are first worked out, and by a read that comes up short).
        """
        ranges = self._byte_ranges.get(path)
        if ranges is not None:
            return ranges
        self._check_header(path)
        ranges = self._ranges_as_opened.pop(path, None)
        if ranges is not None:
            self._byte_ranges[path] = ranges
            return ranges
        f = self._files[path]
        with self._file_lock:
            f.seek(0)
            size, header = _read_header(f)
        start = 8 + size
        ranges = self._byte_ranges[path] = {
            k: (start + int(v["data_offsets"][0]), start + int(v["data_offsets"][1]))
            for k, v in header.items()
        }
        return ranges

    def close(self) -> None:
        users_done = self._users_here()
        with users_done:  # from here no read starts and no read ahead is added; a second close finds none
            self._closed = True
            reads_ahead, self._ahead = self._ahead, {}
            self._staged = {}
        if os.getpid() == self._pid:  # reads not started are dropped; those running finish
            for ahead in reads_ahead.values():
                ahead.cancel()
            concurrent.futures.wait(reads_ahead.values())
        for ahead in reads_ahead.values():  # read ahead and never asked for: their blocks go back
            if (  # done: a forked child's unfinished futures have no thread to finish them
                ahead.done()
                and not ahead.cancelled()
                and ahead.exception() is None
                and (block := ahead.result()[1]) is not None
            ):
                block.give_back()
        with users_done:  # reads using the files (in other threads) finish before the files close
            users_done.wait_for(lambda: not self._users)
            files, self._files = self._files, {}
        for f in files.values():
            f.close()
        self._open.clear()
        self._small.clear()
        self._state = None


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two torch devices are one (``cuda`` alone is the current CUDA device)."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return a.index == b.index
    here = torch.cuda.current_device()
    return (here if a.index is None else a.index) == (here if b.index is None else b.index)


@functools.cache
def _cuda_here() -> bool:
    return torch.cuda.is_available()


def _has_gpu(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA device torch has here."""
    return device.type == "cuda" and _cuda_here() and (device.index or 0) < torch.cuda.device_count()


def _torch_gpus() -> str:
    """What torch sees here, in words, for an error about a CUDA device it lacks."""
    have = f"{torch.cuda.device_count()} CUDA devices" if _cuda_here() else "no CUDA GPU"
    return f"torch sees {have} here"


def _check_pin(pin: bool, method: str) -> None:
    """Refuses ``pin`` at once where torch has no CUDA GPU: torch's pinned allocation would fail later, in a
    reading thread, as a failed read of the checkpoint."""
    if pin and not _cuda_here():
        raise ValueError(
            f"{method}(pin=True): pinned memory is for copies to a CUDA GPU, and torch sees none here; "
            "use pin=False"
        )


def _cut_short(held: int, n: int) -> EOFError:
    """The error for a tensor of ``n`` bytes of which the file, cut short since it was opened, holds ``held``."""
    return EOFError(f"the file ends after {held} of its {n} bytes (cut short since it was opened)")


def _read_error(path: pathlib.Path, key: str, e: BaseException) -> CheckpointError:
    """The error for a failed read of ``key``: a file cut short says so (``_read_bytes``' EOFError); any other
    failure is named by its type."""
    detail = f": {e}" if isinstance(e, EOFError) else f" ({type(e).__name__}: {e})"
    return CheckpointError(f"{path}: reading {key!r} failed{detail}")


_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _readers(name: str = "read") -> concurrent.futures.ThreadPoolExecutor:
    """The process's reading threads, ``READ_THREADS`` per ``name`` (``"read"``: whole tensors read ahead;
    ``"part"``: the parts of a large one), shared by every checkpoint and started once: starting them for
    every load cost about a tenth of a small checkpoint's load on a GPU host."""
    with _pools_lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = concurrent.futures.ThreadPoolExecutor(
                READ_THREADS, thread_name_prefix=f"qbridge-{name}"
            )
        return pool


def _readers_after_fork() -> None:
    """A forked child has none of its parent's threads: it starts its own readers when it reads ahead."""
    global _pools, _pools_lock
    _pools, _pools_lock = {}, threading.Lock()


os.register_at_fork(after_in_child=_readers_after_fork)

_PREADV = getattr(os, "preadv", None)  # reads at an offset, leaving the file's position alone (POSIX)
_PREAD = getattr(os, "pread", None)
# read_stacked reads tensors at most this many bytes apart in a file with one positioned read (the bytes
# between them into a scratch buffer), up to _RUN_BYTES and _RUN_BUFFERS buffers a read (IOV_MAX is 1024)
_GAP_READ = 16 << 10
_RUN_BYTES = 16 << 20
_RUN_BUFFERS = 500


# bytes of a safetensors header read for messages (safetensors refuses larger ones)
_HEADER_LIMIT = 100 * 2**20


def _shorter_than_its_header(path: pathlib.Path) -> str:
    """For the message about a safetensors file that safetensors refused: ``"; it is N bytes, where its header
    ..."`` when the file is shorter than its header says (a download or copy cut short), else ``""``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if 8 <= size < 8 + n <= 8 + _HEADER_LIMIT:
                return f"; the file is {size} bytes, shorter than its {n}-byte header: it was cut short (an interrupted download or copy?)"
            f.seek(0)
            n, header = _read_header(f, _HEADER_LIMIT)
        ends = []
        for v in header.values():
            start, end = (int(o) for o in v["data_offsets"])
            dtype = safetensors_dtype(v["dtype"])
            # a header whose offsets disagree with its shapes is corrupt, not a file cut short
            if dtype is not None and end - start != math.prod(v["shape"]) * dtype.itemsize:
                return ""
            ends.append(end)
    except Exception:  # not a safetensors header at all: safetensors' words say it
        return ""
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"; the file is {size} bytes where its header describes {need}: it was cut short (an interrupted download or copy?)"
    return ""


def _header_size(f: Any, lock: threading.Lock) -> int | None:
    """A safetensors file's header size (its first 8 bytes, little-endian), read from the file itself where
    positioned reads exist (the file object's buffer may hold the bytes as they were); None when the file is
    shorter than 8 bytes now."""
    if _PREAD is not None:
        head = _PREAD(f.fileno(), 8, 0)
    else:
        with lock:
            f.seek(0)
            head = f.read(8)
    return int.from_bytes(head, "little") if len(head) == 8 else None


def _read_at(f: Any, offset: int, into: memoryview, lock: threading.Lock) -> int:
    """Reads ``len(into)`` bytes of file ``f`` from ``offset`` into ``into``; returns how many were read
    (fewer at the file's end). One call reads at most about 2 GiB on Linux: it is repeated until done."""
    done = 0
    while done < len(into):
        if _PREADV is not None:
            got = int(_PREADV(f.fileno(), [into[done:]], offset + done))
        else:
            with lock:
                f.seek(offset + done)
                got = int(f.readinto(into[done:]) or 0)
        if not got:
            break
        done += got
    return done


def _read_together(
    f: Any, run: list[tuple[int, int, str]], flat: memoryview, nbytes: int, row_bytes: int
) -> bool:
    """Reads the tensors of ``run`` (``(begin, row, key)`` in file order, ``nbytes`` each, at most
    ``_GAP_READ`` bytes apart) into their rows of ``flat`` (``row_bytes`` apart) with one positioned read of
    many buffers, the bytes between them into scratch. False where the system has no ``preadv`` or the read
    came up short or failed: the caller then reads them one by one."""
    if _PREADV is None:
        return False
    scratch = memoryview(bytearray(_GAP_READ))
    buffers: list[memoryview] = []
    at = run[0][0]  # where the bytes read so far end in the file
    for begin, i, _ in run:
        if begin > at:
            buffers.append(scratch[: begin - at])
        buffers.append(flat[i * row_bytes : i * row_bytes + nbytes])
        at = begin + nbytes
    try:
        return int(_PREADV(f.fileno(), buffers, run[0][0])) == at - run[0][0]
    except OSError:
        return False


def _runs(wanted: list[tuple[int, int, str]], nbytes: int) -> list[tuple[int, int]]:
    """The runs ``wanted[j:k]`` of :meth:`_Source.read_stacked`'s tensors (``(begin, row, key)`` in file order,
    ``nbytes`` each) that one positioned read of many buffers takes: at most ``_GAP_READ`` bytes apart, up to
    ``_RUN_BYTES`` and ``_RUN_BUFFERS`` tensors."""
    runs, j, n = [], 0, len(wanted)
    while j < n:
        first, k = wanted[j][0], j + 1
        at = first + nbytes
        while (
            k < n
            and 0 <= wanted[k][0] - at <= _GAP_READ
            and wanted[k][0] + nbytes - first <= _RUN_BYTES
            and k - j < _RUN_BUFFERS
        ):
            at = wanted[k][0] + nbytes
            k += 1
        runs.append((j, k))
        j = k
    return runs


def _read_ranges(f: Any, wanted: list[tuple[int, int, str]], base: int, nbytes: int, row_bytes: int) -> bool:
    """Reads the tensors of ``wanted`` (``(begin, row, key)``, ``nbytes`` each, in file order) into their rows
    of the host memory at address ``base`` (``row_bytes`` apart) with one call of torch_side's library
    (``qb_read_ranges``), which reads them all in one C loop without holding the GIL: read one by one from
    Python, every read gives the GIL up and waits to take it back from the thread that loads. False, with
    some rows perhaps written, where the library is not loaded (yet, or ever: ``QBRIDGE_CPU_KERNEL=off``), the
    system has no positioned reads, or a read failed or came up short: the caller then reads them again one
    by one and names what failed. The library is only used here once loaded (a GPU load starts loading it:
    :func:`qbridge._handoff.load_library`): a read never builds it."""
    read = _native.read_ranges(start=False) if _PREAD is not None else None
    if read is None:
        return False
    n = len(wanted)
    begins = np.fromiter((w[0] for w in wanted), dtype=np.int64, count=n)
    dests = np.fromiter((w[1] for w in wanted), dtype=np.int64, count=n) * row_bytes + base
    lengths = np.full(n, nbytes, dtype=np.int64)
    got, error = ctypes.c_int64(0), ctypes.c_int(0)
    first = read(f.fileno(), n, begins.ctypes.data, lengths.ctypes.data, dests.ctypes.data,
                 ctypes.byref(got), ctypes.byref(error))  # fmt: skip
    return bool(first == -1)


def _tensor_nbytes(t: Any) -> int:
    """Bytes a tensor holds; for a tensor subclass (torchao), the bytes of its inner tensors."""
    if not isinstance(t, torch.Tensor):
        return 0
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None:
        return sum(_tensor_nbytes(getattr(t, name, None)) for name in flatten()[0])
    return t.numel() * t.element_size()


def _st_dtype(name: str, path: pathlib.Path, key: str) -> torch.dtype:
    dtype = safetensors_dtype(name)
    if dtype is None:
        raise CheckpointError(
            f"{path}: {key!r} has dtype {name}, which torch {torch.__version__} has no dtype for"
        )
    return dtype


def _import_torchao_quietly() -> None:
    """torchao registers its tensor subclasses as safe for ``weights_only`` loading when imported."""
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        pass


class Checkpoint:
    """A checkpoint's entries, read from headers (and the small bitsandbytes quant-state documents).

    Use :func:`qbridge.open_checkpoint`; close it (or use it as a context manager) when done.

    Attributes:
        path: the checkpoint directory or file.
        config: its ``config.json`` (empty when there is none).
        format: ``"bitsandbytes-4bit"``, ``"bitsandbytes-8bit"``, ``"fp8"``, ``"torchao"`` or ``"safetensors"``
            (unquantized), as :class:`qbridge.CheckpointSummary` reports it.
        entries: weight name -> :class:`~qbridge._checkpoint.Entry`, one per weight with all its stored pieces.
    """

    def __init__(self, path: pathlib.Path, source: _Source, config: dict[str, Any], fmt: str):
        self.path = path
        self.source = source
        self.config = config
        self.format = fmt
        self.entries: dict[str, Entry] = _Entries()
        self._classification: Classification | None = None
        self._asked_model = False
        self._modules: ModuleInfo | None = None  # the torch model's answers, once asked
        self.warned: set[str] = set()  # keys a warning was given for (once per key, however often read)
        self.index: pathlib.Path | None = None  # the safetensors index that chose the files, if one did

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the files (memory maps of safetensors files, opened torch files), after reads running in
        other threads have finished; reads not yet started are dropped. Reading afterwards raises
        :class:`CheckpointError`."""
        self.source.close()

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read from the files so far through :meth:`read`, :meth:`read_slice` and
        :meth:`read_window` (headers and the small quant-state documents aside): a slice counts only its
        own bytes."""
        return self.source.bytes_read

    @property
    def quantization_config(self) -> dict[str, Any]:
        """``config.json``'s ``quantization_config`` (empty for an unquantized checkpoint)."""
        return self.config.get("quantization_config") or {}

    def read(self, key: str) -> torch.Tensor:
        """The stored tensor ``key`` as it is on disk (quantized pieces stay quantized), on the CPU.

        Raises:
            CheckpointError: ``key`` is not in the checkpoint (the message names the closest key it holds),
                its bytes cannot be read, or the checkpoint is closed.
        """
        return self.source.read(key)

    def read_to(self, key: str, device: torch.device, *, check: _Check | None = None) -> torch.Tensor:
        """The stored tensor ``key`` on ``device``: a new tensor, copied on the device's current stream without
        the host waiting (on the CPU: :meth:`read`'s tensor). ``check(key, tensor)``, when given, sees the
        tensor in host memory first (pinned memory where it was read ahead), and may raise to refuse it.
        Counted as :meth:`read` counts.

        Raises:
            CheckpointError: ``key`` is not in the checkpoint, or its bytes cannot be read.
            ValueError: ``device`` is a CUDA device torch does not have here.
        """
        device = torch.device(device)
        if device.type == "cuda" and not _has_gpu(device):
            raise ValueError(f"read_to({key!r}, {str(device)!r}): {_torch_gpus()}; read to 'cpu' instead")
        return self.source.read_to(key, device, check=check)

    def read_into(
        self, keys: Sequence[str], outs: Sequence[torch.Tensor], *, check: _Check | None = None
    ) -> None:
        """Copies each stored tensor ``keys[i]`` into ``outs[i]`` (a tensor of its shape and dtype, on any
        device) on that device's current stream, without the host waiting; ``check(key, tensor)``, when
        given, sees each tensor in host memory before its copy, and may raise to refuse it (the tensors
        before it are copied). Counted as :meth:`read` counts.

        Work queued on the device's current stream after this call sees the tensors; another stream, or the
        host, must wait for it first (``torch.cuda.current_stream().synchronize()``, or an event recorded
        on it). Staging memory a read ahead used goes back only once the device has copied out of it.

        Raises:
            CheckpointError: a key the checkpoint lacks, or a tensor whose bytes cannot be read.
            ValueError: ``keys`` is not a sequence of keys as long as ``outs``, or an ``outs[i]`` of another
                shape or dtype than its stored tensor, or on the meta device (nothing copied).
        """
        self.source.read_into(keys, outs, check=check)

    def read_ahead(self, key: str, *, pin: bool = False) -> int:
        """Starts reading the stored tensor ``key`` in a background thread (into pinned host memory with
        ``pin``: the process's staging region, ``qbridge._staging``, where it has room); the next
        :meth:`read`, :meth:`read_to` or :meth:`read_into` of ``key`` returns it. Returns the bytes read
        ahead (0 for small tensors, torch files' tensors, keys read ahead already, and after :meth:`close`).

        Raises:
            CheckpointError: ``key`` is not in the checkpoint.
            ValueError: ``pin`` where torch sees no CUDA GPU (pinned memory is for copies to one).
        """
        _check_pin(pin, "read_ahead")
        return self.source.read_ahead(key, pin=pin)

    def stage_small(self, keys: Sequence[str], device: torch.device | str) -> int:
        """Reads the small stored tensors among ``keys`` (scales, tables: at most 64 KiB each) in one pass
        into one page-locked buffer and queues a single copy of it to the CUDA ``device`` on its current
        stream, instead of a read and a copy per tensor. The next :meth:`read_to` of such a key for that
        device returns its part of the device's copy (a view of memory nothing else uses; ``check`` sees the
        host bytes), the next :meth:`read` a CPU tensor of its own; each once, later reads read the file.
        Returns the bytes staged (0 for keys larger, read ahead, of a torch file, or unreadable: their own
        reads say why).

        Raises:
            CheckpointError: the checkpoint is closed.
            ValueError: ``keys`` is a string, or ``device`` is not a CUDA device torch has here.
        """
        if isinstance(keys, (str, bytes)):
            raise ValueError(f"stage_small takes a sequence of keys, got the string {keys!r}")
        if self.source._closed:
            raise CheckpointError("staging failed: the checkpoint is closed")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:  # torch's names only; an index alone needs an accelerator
            raise ValueError(f"stage_small(device={device!r}): not a torch device ({e})") from None
        if not _has_gpu(device):
            raise ValueError(f"stage_small(device={str(device)!r}) stages for a CUDA device; {_torch_gpus()}")
        return self.source.stage_small(keys, device)

    def read_stacked(self, keys: Sequence[str], *, pin: bool = False, count: bool = True) -> torch.Tensor:
        """The stored tensors ``keys``, all of one shape and dtype, as the rows of one new CPU tensor
        ``[len(keys), row]``: row ``i`` holds tensor ``i``'s elements in order, then padding up to a multiple
        of 16 bytes (``row * itemsize``). Pinned memory with ``pin``. Counted as :meth:`read` counts; without
        ``count``, the bytes of safetensors files' keys are left for :meth:`count_stacked` (a read ahead that
        may be dropped, counted when used), except those of keys read ahead by themselves (:meth:`read_ahead`),
        which are taken through :meth:`read` and counted there: don't pass those to :meth:`count_stacked`.

        Raises:
            CheckpointError: a key the checkpoint lacks, a tensor whose bytes cannot be read (a truncated
                file), or a closed checkpoint.
            ValueError: no keys, tensors that differ in shape or dtype, or ``pin`` where torch sees no CUDA
                GPU.
        """
        _check_pin(pin, "read_stacked")
        return self.source.read_stacked(keys, pin=pin, count=count)

    def count_stacked(self, keys: Sequence[str]) -> None:
        """Counts ``keys`` (tensors of one shape and dtype) as read, as :meth:`read_stacked` counts them: what a
        ``read_stacked(..., count=False)`` read, once it is used."""
        self.source.count_stacked(keys)

    def read_slice(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        """Rows/columns ``index`` of the stored tensor ``key``, reading only those bytes from safetensors
        files (torch files are read whole). A new CPU tensor.

        Raises:
            CheckpointError: ``key`` is not in the checkpoint, or its bytes cannot be read.
        """
        return self.source.read_slice(key, index)

    def read_window(
        self, key: str, row_bytes: int, rows: tuple[int, int], cols: tuple[int, int]
    ) -> torch.Tensor:
        """Bytes ``[rows[0]:rows[1], cols[0]:cols[1]]`` of the stored tensor ``key``, its bytes viewed as rows
        of ``row_bytes`` (a 4-bit weight's packed bytes as a matrix): a new uint8 CPU tensor, read without
        reading the rest.

        Raises:
            CheckpointError: ``key`` is not in the checkpoint, or the window does not fit its bytes.
        """
        return self.source.read_window(key, row_bytes, rows, cols)

    def where(self, key: str) -> str:
        """``"<file> [<key>]"``: the file holding ``key``, for error messages."""
        return f"{self.source.key_file.get(key, self.path)} [{key}]"

    def refuse_unreadable(self) -> None:
        """Raises CheckpointError naming the first tensor of a torch file that qbridge cannot read (sparse,
        nested or torch-quantized: left out when the file was opened), if any: for what takes every tensor
        (a load without a target or with ``strict``, ``dequantized_state``, ``inspect``)."""
        unreadable = self.source.unreadable
        if unreadable:
            first = next(iter(unreadable.values()))
            more = f" ({len(unreadable) - 1} more such tensor(s))" if len(unreadable) > 1 else ""
            raise CheckpointError(first + more)

    def unlisted(self, *keys: str) -> str:
        """For the message about missing ``keys``: where a safetensors file holds one that the checkpoint's
        index does not list (so it was not read), ``" ({file} holds {key}, but the index does not list
        it)"``; else ``""``."""
        for path, held in self._every_file():
            for key in keys:
                if key in held and key not in self.source.key_file:
                    return f" ({path} holds {key}, but the checkpoint's index does not list it)"
        return ""

    def _every_file(self) -> Iterator[tuple[pathlib.Path, set[str]]]:
        """Each safetensors file opened, then, where a safetensors index chose the files, each other regular
        safetensors file in the index's directory that it never names (:func:`_files_beside`), with the keys
        it holds."""
        for path, handle in self.source._open.items():
            yield path, set(handle.keys())
        if self.index is not None:
            yield from _files_beside(self.index, self.source._open)

    def classify(self, *, ask_model: bool = False) -> Classification:
        """Classifies the tensors (see ``qbridge._classify``): which are no parameters, which torch module
        kind owns each parameter. ``ask_model`` builds the torch model on the meta device (transformers
        needed); the answer is kept, and asked again only to add the model's view."""
        if self._classification is not None and (self._asked_model or not ask_model):
            return self._classification
        modules, note = (
            module_info(self.config, len(self.source.shapes))
            if ask_model
            else (None, "the torch model was not asked")
        )
        self._asked_model = ask_model
        self._modules = modules
        shapes = {name: (e.shape, e.dtype) for name, e in self.entries.items()}
        quantized = {name for name, e in self.entries.items() if e.kind != "dense"}
        self._classification = classify(
            shapes, quantized, self.config, self.read, modules=modules, modules_note=note
        )
        for (
            key
        ) in self._classification.conv1d:  # a plain Conv1D weight is stored [in, out]: read it as [out, in]
            entry = self.entries.get(key)
            if (
                entry is not None
                and entry.kind == "dense"
                and len(entry.shape) == 2
                and not entry.info.get("stored_in_out")
            ):
                entry.info["stored_in_out"] = True
                entry.shape = entry.shape[::-1]
        return self._classification

    def config_mismatches(self) -> ConfigMismatch | None:
        """How the tensors differ from the torch model of ``config.json`` (see
        ``qbridge._classify.config_mismatches``): None where they agree, or where the model was not built
        (``classify(ask_model=True)`` builds it when transformers knows the architecture)."""
        classification = self.classify(ask_model=self._asked_model)
        shapes = {name: tuple(e.shape) for name, e in self.entries.items()}
        return config_mismatches(shapes, classification, self._modules)


def _read_index(index: pathlib.Path) -> tuple[list[pathlib.Path], dict[pathlib.Path, list[str]]]:
    """A sharded checkpoint's files and the keys each holds, from its ``*.index.json`` (``weight_map``:
    key -> file name). Every file must be a plain name inside the index's directory (an index is untrusted
    input); each is checked once, however many keys it holds (DeepSeek-V3: 163 files, 91,000 keys).

    Raises:
        CheckpointError: not an index, an empty or malformed ``weight_map``, a name that is no file name
            or leads outside the directory (naming the index and the entry).
    """
    try:
        weight_map = json.loads(_regular_text(index))["weight_map"]
    except Exception as e:
        raise CheckpointError(f"{index}: not a checkpoint index ({type(e).__name__}: {e})") from e
    # JSON's strings are str itself: the types of the keys and values, gathered in one pass of C
    types = (
        {*map(type, weight_map), *map(type, weight_map.values())} if isinstance(weight_map, dict) else None
    )
    if types is None or not types <= {str}:
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names (strings)")
    if not weight_map:
        raise CheckpointError(f"{index}: weight_map lists no tensors")
    by_name: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        by_name.setdefault(name, []).append(key)
    root = index.parent
    files: dict[pathlib.Path, list[str]] = {}
    for name, keys in by_name.items():
        what = f"{index} [{keys[0]}]"
        file = root / name
        if not name or "\0" in name or file == root or pathlib.PurePath(name).name in (".", ".."):
            raise CheckpointError(f"{what}: {name!r} is not a file name")
        inside(root, file, what)
        files.setdefault(file, []).extend(keys)  # "./a" and "a" name one file
    return sorted(files), files


@contextlib.contextmanager
def _open_regular(path: pathlib.Path) -> Iterator[BinaryIO]:
    """``path`` opened for reading without waiting, once the open file is known to be a regular file (a
    pipe in its place, even one put there after a check, would block a read forever).

    Raises:
        OSError: it cannot be opened; ValueError: it is no regular file.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            yield f
    finally:
        os.close(fd)


def _check_tensor_file(path: pathlib.Path, kind: str, indexed: bool) -> None:
    """Raises CheckpointError unless ``path`` is a regular file (a link to one included): for a missing file,
    a link to nothing (an interrupted download leaves one in a Hugging Face cache), a directory, or another
    kind of file (a FIFO would block the read forever), saying which. ``indexed``: an index named it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise CheckpointError(
                f"{path}: a link to {os.readlink(path)}, which does not exist (an interrupted download leaves "
                "such links): download the checkpoint again"
            ) from None
        listed = " (listed in the checkpoint's index)" if indexed else ""
        raise CheckpointError(f"{path}: file missing{listed}") from None
    except OSError as e:  # a name too long for the file system, a loop of links
        raise CheckpointError(f"{path}: cannot be opened ({type(e).__name__}: {e})") from e
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path}: a directory where a {kind} belongs")
    if not stat.S_ISREG(st.st_mode):
        what = (
            "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        )
        raise CheckpointError(f"{path}: {what}, not a regular file, where a {kind} belongs")


def _regular_text(path: pathlib.Path) -> str:
    """The text of ``path`` (see :func:`_open_regular`).

    Raises:
        OSError: it cannot be opened or read; ValueError: it is no regular file or no UTF-8 text.
    """
    with _open_regular(path) as f:
        return f.read().decode("utf-8")


def _read_header(f: BinaryIO, limit: int | None = None) -> tuple[int, dict[str, Any]]:
    """A safetensors file's header read from ``f`` (at its start): its size in bytes and its tensors' entries
    (``__metadata__`` left out).

    Raises:
        ValueError: the size is 0 or above ``limit``, or the header is no JSON object.
    """
    size = int.from_bytes(f.read(8), "little")
    if not 0 < size <= (size if limit is None else limit):
        raise ValueError(f"a safetensors header of {size} bytes")
    header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError("a safetensors header is a JSON object")
    return size, {k: v for k, v in header.items() if k != "__metadata__"}


def _files_beside(
    index: pathlib.Path, opened: Iterable[pathlib.Path]
) -> Iterator[tuple[pathlib.Path, set[str]]]:
    """Each regular safetensors file in ``index``'s directory but the ``opened`` ones, with the keys it holds
    (for messages: its header is read here; links out of the directory and files beside the model, such as
    adapters, are passed over)."""
    root = index.parent
    seen = {p.resolve() for p in opened}
    for path in sorted(root.glob("*.safetensors")):
        try:
            real = inside(root, path, str(path)).resolve()
        except CheckpointError:  # a link out of the directory or in a loop
            continue
        if real in seen or not_model_file(path.name) or not_model_file(real.name):
            continue
        keys = _header_keys(real)
        if keys is not None:
            yield path, keys


def _header_keys(path: pathlib.Path, limit: int = _HEADER_LIMIT) -> set[str] | None:
    """The tensor names in a safetensors file's header (for messages), or None where ``path`` is no regular
    file (see :func:`_open_regular`) or no readable safetensors file."""
    try:
        with _open_regular(path) as f:
            return set(_read_header(f, limit)[1])
    except (OSError, ValueError):
        return None


def inside(root: pathlib.Path, file: pathlib.Path, what: str) -> pathlib.Path:
    """``file``, once it is known to lie in ``root`` (no absolute names, no ``..``, no link out of it).

    One kind of link out is followed: the Hugging Face cache's. ``huggingface_hub`` keeps a repository's files
    in ``<repo>/blobs/`` (each named by its hash) and lists each revision in ``<repo>/snapshots/<revision>/``
    as links to them; where ``root`` is such a snapshot folder or a folder in one, a link to a blob of that
    repository is the file.

    Raises:
        CheckpointError: naming ``what`` (the file and entry that point there) and where it leads, or why
            the name cannot be followed (a link loop, a name too long).
    """
    relative = file.relative_to(root) if file.is_relative_to(root) else None
    if relative is None or relative.is_absolute() or ".." in relative.parts:
        raise CheckpointError(f"{what}: refers to {file}, outside the checkpoint directory {root}; refused")
    try:
        real_root, real = root.resolve(), file.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a link loop, a name too long, a NUL byte
        raise CheckpointError(f"{what}: {file} cannot be followed ({type(e).__name__}: {e})") from e
    if not real.is_relative_to(real_root) and not _hub_blob(real_root, real):
        raise CheckpointError(
            f"{what}: {file} is a link to {real}, outside the checkpoint directory {real_root}; refused"
        )
    return file


_HUB_REPO = re.compile(r"(models|datasets|spaces)--.+")
# a blob's name: a git object id or a SHA-256, as huggingface_hub names them
_HUB_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def _hub_blob(real_root: pathlib.Path, real: pathlib.Path) -> bool:
    """Whether ``real_root`` is in a Hugging Face cache snapshot (``<repo>/snapshots/<revision>``, or a folder
    of one such as ``text_encoder``; the repository named ``models--...``, ``datasets--...`` or
    ``spaces--...``) and ``real`` a blob of that repository: a file directly in its ``blobs`` folder, named
    by its hash (both resolved)."""
    for snapshot in (real_root, *real_root.parents):
        if snapshot.parent.name == "snapshots":
            repo = snapshot.parent.parent
            return (
                _HUB_REPO.fullmatch(repo.name) is not None
                and real.parent == repo / "blobs"
                and _HUB_BLOB.fullmatch(real.name) is not None
            )
    return False


def _find_files(
    path: pathlib.Path,
) -> tuple[list[pathlib.Path], dict[pathlib.Path, list[str]] | None, str, pathlib.Path | None]:
    """The tensor files of a checkpoint directory or file, the keys an index assigns to each (None without
    an index: every key of every file), the container, and the index that chose the files (or None)."""
    if path.is_file():
        if path.suffix == ".safetensors":
            return [path], None, "safetensors", None
        if path.suffix in TORCH_SUFFIXES:
            return [path], None, "torch", None
        if path.name.endswith(".index.json"):  # this index, not whichever the directory holds
            files, keys = _read_index(path)
            suffixes = {f.suffix for f in files}
            if suffixes == {".safetensors"}:
                return files, keys, "safetensors", path
            if suffixes <= set(TORCH_SUFFIXES):
                return files, keys, "torch", path
            raise CheckpointError(
                f"{path}: the index names files of kinds {sorted(suffixes)}; qbridge reads an index of "
                ".safetensors files or of torch files (.bin, .pt, .pth)"
            )
        raise CheckpointError(f"{path}: not a checkpoint file (.safetensors, .bin, .pt, .pth, .index.json)")
    if not path.is_dir():
        if path.is_symlink() or path.exists():  # a link to nothing, a FIFO ...: said as such
            _check_tensor_file(path, "checkpoint file", False)
        raise CheckpointError(f"{path}: no such file or directory")
    # transformers' order: model.safetensors, its index, pytorch_model.bin, ... (a single file's name: other
    # files beside it, adapters ..., are not the model; an index beside it is not read, with a warning)
    index = path / "model.safetensors.index.json"
    for single, container in (
        (path / "model.safetensors", "safetensors"),
        (index, "safetensors"),
        (path / "pytorch_model.bin", "torch"),
    ):
        if not single.exists():
            continue
        if single == index:
            files, keys = _read_index(inside(path, index, str(index)))
            return files, keys, "safetensors", index
        for stale in (index, path / "pytorch_model.bin.index.json"):
            if stale.exists() and stale.name.startswith(single.name):
                warn_at_caller(
                    f"{path}: reading {single.name}; {stale.name} beside it is not read (the single file is "
                    "the checkpoint, as transformers reads a folder): remove whichever is stale"
                )
        return [inside(path, single, str(single))], None, container, None
    files = [
        inside(path, f, str(f)) for f in sorted(path.glob("*.safetensors")) if not not_model_file(f.name)
    ]
    if files:
        ignored = sorted(
            f.name for suffix in TORCH_SUFFIXES for f in path.glob(f"*{suffix}") if not not_model_file(f.name)
        )
        # safetensors first, as transformers reads a folder: the torch files' tensors are not loaded
        if ignored:
            warn_at_caller(
                f"{path}: reading its {len(files)} .safetensors file(s); {', '.join(ignored[:4])}"
                f"{', ...' if len(ignored) > 4 else ''} beside them are left out (with no index, the .safetensors "
                "files are the checkpoint, as transformers reads a folder); save their tensors as .safetensors to have them read"
            )
        return files, None, "safetensors", None
    torch_index = path / "pytorch_model.bin.index.json"
    if torch_index.exists():
        files, keys = _read_index(inside(path, torch_index, str(torch_index)))
        return files, keys, "torch", torch_index
    files = [inside(path, f, str(f)) for f in sorted(f for suffix in TORCH_SUFFIXES for f in path.glob(f"*{suffix}"))
             if not not_model_file(f.name)]  # fmt: skip
    if files:
        return files, None, "torch", None
    if (path / "_CHECKPOINT_METADATA").exists():  # what qbridge convert writes
        raise CheckpointError(
            f"{path}: an Orbax checkpoint, not a PyTorch one; read it with qbridge.restore_converted"
        )
    below = _checkpoint_folders(path)
    hint = f" (its folders {', '.join(below)} hold tensor files: pass one of them)" if below else ""
    if (path / "snapshots").is_dir() and _HUB_REPO.fullmatch(path.name):  # a Hugging Face cache repository
        try:
            revision = (path / "refs" / "main").read_text().strip()
        except OSError:
            revision = ""
        hint = (
            f" (a Hugging Face cache repository: pass its snapshot, {path / 'snapshots' / revision}"
            if revision
            else f" (a Hugging Face cache repository: pass one of its snapshots, {path / 'snapshots'}/<revision>"
        ) + ", as huggingface_hub.snapshot_download returns it)"
    raise CheckpointError(f"{path}: no .safetensors, .bin or .pt files{hint}")


def _checkpoint_folders(path: pathlib.Path) -> list[str]:
    """The folders right below ``path`` that hold a tensor file, for a hint (unreadable ones passed over)."""

    def holds_tensors(folder: pathlib.Path) -> bool:
        try:
            return folder.is_dir() and any(
                f.suffix in (".safetensors", *TORCH_SUFFIXES) for f in folder.iterdir()
            )
        except OSError:
            return False

    try:
        return sorted(d.name for d in path.iterdir() if holds_tensors(d))
    except OSError:
        return []


def read_config(path: pathlib.Path) -> dict[str, Any]:
    """A checkpoint's ``config.json`` (``{}`` without one), its fields checked (it is untrusted input)."""
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    if not config.exists():
        return {}
    inside(folder, config, str(config))
    try:
        doc = json.loads(_regular_text(config))
    except Exception as e:
        raise CheckpointError(f"{config}: unreadable JSON ({type(e).__name__}: {e})") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{config}: a config is a JSON object, found {type(doc).__name__}")
    qc = doc.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError(f"{config}: quantization_config must be an object, found {type(qc).__name__}")
    block = (qc or {}).get("weight_block_size")
    if block is not None and not (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 1 << 20 for b in block)
    ):
        raise CheckpointError(
            f"{config}: quantization_config.weight_block_size must be two positive integers, found {block!r}"
        )
    tie = doc.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise CheckpointError(f"{config}: tie_word_embeddings must be true or false, found {tie!r}")
    arch = doc.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise CheckpointError(f"{config}: architectures must be a list of class names, found {arch!r}")
    return doc


def config_dtype(config: dict[str, Any]) -> tuple[str, Any]:
    """The model dtype a ``config.json`` names and the field naming it: ``dtype``, else ``torch_dtype``
    (transformers 5 keeps ``dtype`` where both are given); ``("torch_dtype", None)`` when neither does."""
    field = "dtype" if config.get("dtype") else "torch_dtype"
    return field, config.get(field)


def _model_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype transformers decodes an FP8, 8-bit or torchao weight to: ``config.json``'s model dtype
    (:func:`config_dtype`), bfloat16 when it names none; another name is refused, not guessed."""
    field, name = config_dtype(ckpt.config)
    name = name or "bfloat16"
    if str(name) not in DTYPES:
        raise CheckpointError(
            f"{ckpt.path}: config.json's {field} is {name!r}, and quantized weights decode to float16, "
            "bfloat16 or float32 (the model's dtype): set it to the dtype they should decode to"
        )
    return DTYPES[str(name)]


_SHARD = re.compile(r"(.+)-(\d+)-of-(\d+)(\.safetensors|\.bin)")


def _unnamed_shards(files: list[pathlib.Path]) -> list[pathlib.Path]:
    """Files beside an index's ``files`` named as shards of the same series (``model-00003-of-00004``) that
    the index does not name."""
    series = {(m[1], int(m[3]), m[4]) for f in files if (m := _SHARD.fullmatch(f.name))}
    named = {f.name for f in files}
    folders = sorted({f.parent for f in files})
    found = []
    for folder in folders:
        for path in sorted(folder.glob("*-of-*")):  # any padding, any shard number
            m = _SHARD.fullmatch(path.name)
            if m and path.name not in named and (m[1], int(m[3]), m[4]) in series and path.is_file():
                found.append(path)
    return found


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Opens a checkpoint (a directory or a file) and classifies every tensor, reading no weight data.

    Raises:
        CheckpointError: missing or truncated files, a corrupt header, a torch file that
            ``weights_only`` refuses, a quant state that does not match its tensor (names the file and key).
        FormatError: an unknown ``quant_method``, or formats mixed in a way qbridge cannot read.
    """
    path = pathlib.Path(path)
    config = read_config(path)
    files, keys_of, container, index = _find_files(path)
    source = _Source()
    listed = set().union(*keys_of.values()) if keys_of else set()
    try:
        for f in files:
            if container == "safetensors":
                source.add_safetensors(f, None if keys_of is None else keys_of[f], listed)
            else:
                source.add_torch(f, None if keys_of is None else keys_of[f], listed)
        source.adopt_misplaced(
            (lambda: _files_beside(index, source._open))
            if index is not None and container == "safetensors"
            else tuple
        )
    except BaseException:
        source.close()  # the files opened before the one refused
        raise
    if source.moved:
        some = list(source.moved.items())[:3]
        warnings.warn(
            f"{index}: lists {len(source.moved)} tensor(s) in a file that does not hold them ("
            + ", ".join(f"{key} in {named.name}, held by {holder.name}" for key, (named, holder) in some)
            + (", ..." if len(source.moved) > 3 else "")
            + "); they are loaded from the file that holds them, as transformers loads every tensor of a listed "
            "file. Correct the index to silence this warning.",
            stacklevel=3,
        )
    if source.unlisted:
        unlisted = list(source.unlisted.items())[:3]
        warnings.warn(
            f"{index or path}: the index does not list {len(source.unlisted)} tensor(s) that the files it names hold ("
            + ", ".join(f"{key} in {f.name}" for key, f in unlisted)
            + (", ..." if len(source.unlisted) > 3 else "")
            + "); they are loaded from those files, as transformers loads every tensor of a listed file. "
            "Add them to the index to silence this warning.",
            stacklevel=3,
        )
    unnamed = _unnamed_shards(files) if index is not None else []
    if unnamed:
        warnings.warn(
            f"{index}: does not name {', '.join(f.name for f in unnamed)}, a shard of the same series as the "
            "files it names: its tensors are not loaded (nor by transformers). List them in the index if they "
            "belong to the model, or remove the file.",
            stacklevel=3,
        )
    if not source.key_file:  # nothing to load: every file empty (an index lists the keys it needs)
        source.close()
        names = ", ".join(f.name for f in files[:4]) + (", ..." if len(files) > 4 else "")
        raise CheckpointError(f"{path}: holds no tensors ({names}: empty); nothing to load")
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method not in (None, "bitsandbytes", "fp8", "torchao"):
        raise FormatError(
            f"{path}: quantization_config.quant_method is {method!r}; qbridge reads 'bitsandbytes', 'fp8' and "
            "'torchao' checkpoints and unquantized ones"
        )
    ckpt = Checkpoint(path, source, config, fmt="?")
    ckpt.index = index if container == "safetensors" else None
    try:
        _classify(ckpt)
    except Exception:
        ckpt.close()
        raise
    return ckpt


FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _companions(src: _Source) -> set[str]:
    """Keys that are pieces of another weight: FP8 scales and bitsandbytes 8-bit row scales."""
    keys = src.shapes
    out: set[str] = set()
    for key, (_, dtype) in keys.items():
        if dtype in FLOAT8:
            for suffix in FP8_SCALES:
                if key + suffix in keys:
                    out.add(key + suffix)
        elif dtype == torch.int8 and f"{key.rpartition('.')[0]}.SCB" in keys:
            out.add(f"{key.rpartition('.')[0]}.SCB")
    return out


def _bnb8_weight(ckpt: Checkpoint, base: str, leaf: str) -> bool:
    """Whether the int8 tensor ``base.leaf`` is a bitsandbytes 8-bit weight, known by its ``weight_format``
    tag or by a ``config.json`` that says the model was quantized to 8 bits by bitsandbytes."""
    if leaf != "weight":
        return False
    qc = ckpt.quantization_config
    return f"{base}.weight_format" in ckpt.source.shapes or (
        qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_8bit") or qc.get("_load_in_8bit"))
    )


def _scale_owner(key: str) -> str | None:
    """The float8 weight whose scale ``key`` would be by its name (``...weight_scale_inv``), or None."""
    if "weight_scale" not in key:
        return None
    return next((key.removesuffix(s) for s in FP8_SCALES if key.endswith(f"weight{s}")), None)


def _classify(ckpt: Checkpoint) -> None:
    src = ckpt.source
    entries: dict[str, Entry] = {}
    for key in sorted(src.shapes):  # bitsandbytes 4-bit: every weight with a quant-state document
        m = BNB_STATE.match(key) if ".quant_state." in key else None
        if m:
            entry = _bnb4_entry(ckpt, m.group("name"), m.group("qt"), key)
            entries[entry.name] = entry
    for path, meta in src.metadata.items():  # torchao's safetensors layout
        if "tensor_names" in meta:
            for entry in _torchao_safetensors_entries(ckpt, path, meta):
                entries[entry.name] = entry
    taken = {k for e in entries.values() for k in e.keys.values()} | _companions(src)
    dtype = functools.cache(lambda: _model_dtype(ckpt))  # asked for by quantized weights only
    block = ckpt.quantization_config.get("weight_block_size")
    block = tuple(int(b) for b in block) if block else None
    for key in sorted(set(src.shapes) - taken):
        shape, kdtype = src.shapes[key]
        base, _, leaf = key.rpartition(".")
        if leaf == "SCB" and f"{base}.weight" in src.shapes:  # row scales beside a weight not stored as int8
            raise CheckpointError(
                f"{ckpt.where(key)}: the row scales of a bitsandbytes 8-bit weight, but its weight {base}.weight "
                f"is stored as {src.shapes[f'{base}.weight'][1]}, not int8 (the checkpoint is damaged)"
            )
        if leaf in BNB_PIECES or ".quant_state." in key or leaf == "SCB":
            weight_key = key.partition(".quant_state.")[0] if ".quant_state." in key else base
            if leaf in BNB_PIECES and base in src.shapes:  # the weight is there: its quant state is not
                what = f"its weight {base} is here, its quant state {base}.quant_state.bitsandbytes__nf4 (or __fp4) is not"
            elif ".quant_state." in key and weight_key in src.shapes:
                # a quant state under a name bitsandbytes does not write
                what = (f"its weight {weight_key} is here, but bitsandbytes names a quant state "
                        f"{weight_key}.quant_state.bitsandbytes__nf4 or __fp4, not {key}")  # fmt: skip
            else:
                what = f"its weight {weight_key if leaf != 'SCB' else f'{base}.weight'} is missing"
            raise CheckpointError(
                f"{ckpt.where(key)}: a piece of a quantized weight whose weight or quant state is missing: {what} "
                "(the checkpoint is incomplete)"
                + ckpt.unlisted(
                    key.partition(".quant_state.")[0],
                    base,
                    f"{base}.weight",
                    *(f"{base}.quant_state.bitsandbytes__{qt}" for qt in ("nf4", "fp4")),
                )
            )
        if "._" in key and _torchao_piece(src, key):  # (the pattern needs "._": no call for the others)
            if "tensor_names" in src.metadata.get(src.key_file[key], {}):
                # the file's torchao tensors were taken by their metadata: this one's tensor is not listed there
                piece = _TORCHAO_PIECE.fullmatch(key)
                assert piece is not None  # _torchao_piece matched it
                name = f"{piece[1]}.{piece[2]}"
                raise CheckpointError(
                    f"{ckpt.where(key)}: a piece of the torchao tensor {name} in torchao's safetensors layout, but "
                    f"the file's torchao metadata ('tensor_names') does not list {name}, without which it cannot "
                    "be rebuilt: the metadata is incomplete; save the model again with torchao's safetensors "
                    "support (or torch.save)"
                )
            raise CheckpointError(
                f"{ckpt.where(key)}: a piece of a torchao tensor in torchao's safetensors layout "
                "(module._weight_qdata, ._weight_scale, ...), but the file's header has no torchao metadata "
                "('tensor_names' and each tensor's type), without which the weight cannot be rebuilt: the "
                "file was re-saved without it; save the model again with torchao's safetensors support (or "
                "torch.save)"
            )
        owner = _scale_owner(key) if "weight_scale" in key else None
        if owner is not None:  # a float8 weight's scale whose weight is not float8 (those took theirs)
            held = f"is stored as {src.shapes[owner][1]}, not float8" if owner in src.shapes else "is missing"
            raise CheckpointError(
                f"{ckpt.where(key)}: the scale of a float8 weight, but its weight {owner} {held} (the checkpoint "
                "is incomplete or damaged; if its weights were dequantized already, leave the scales out)"
                + ckpt.unlisted(owner)
            )
        if kdtype in FLOAT8:
            entry = _fp8_entry(ckpt, key, shape, dtype(), block)
        elif kdtype == torch.int8 and f"{base}.SCB" not in src.shapes and _bnb8_weight(ckpt, base, leaf):
            raise CheckpointError(
                f"{ckpt.where(key)}: a bitsandbytes 8-bit weight without its row scales {base}.SCB (the "
                "checkpoint is incomplete or damaged): its int8 values alone are not the weight"
                + ckpt.unlisted(f"{base}.SCB")
            )
        elif kdtype == torch.int8 and f"{base}.SCB" in src.shapes:
            scb = f"{base}.SCB"
            entry = Entry(
                key,
                "bnb8",
                shape,
                dtype(),
                _nbytes(src, key) + _nbytes(src, scb),
                {"weight": key, "scb": scb},
            )
        elif src._state is not None and torch_side.is_quant_tensor_subclass(src._state.get(key)):
            value = src._state[key]
            entry = Entry(key, "torchao", shape, value.dtype, _subclass_bytes(value), {"weight": key},
                          {"type": type(value).__name__})  # fmt: skip
        else:
            entry = Entry(key, "dense", shape, kdtype, _nbytes(src, key), {"weight": key})
        entries[key] = entry
    ckpt.entries = _Entries(entries)
    _check_format(ckpt, {e.kind for e in entries.values()} - {"dense"})


def _check_format(ckpt: Checkpoint, quantized: set[str]) -> None:
    method = ckpt.quantization_config.get("quant_method")
    # llm_int8_has_fp16_weight: bitsandbytes' 8-bit layers keep their floating weights, saved as they are
    fp16_weights = bool(ckpt.quantization_config.get("llm_int8_has_fp16_weight"))
    if method == "bitsandbytes" and not quantized & {"bnb4", "bnb8"} and not fp16_weights:
        qc = ckpt.quantization_config
        four_bit = bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit"))
        storage = str(qc.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")
        packed = [  # bytes, or 4-bit weights packed into a column of bnb_4bit_quant_storage's dtype
            e.name
            for e in ckpt.entries.values()
            if e.dtype in (torch.uint8, torch.int8)
            or (
                four_bit
                and e.name.endswith("weight")
                and len(e.shape) == 2
                and e.shape[1] == 1
                and str(e.dtype).removeprefix("torch.") == storage
            )
        ]
        if packed or not any(e.dtype.is_floating_point for e in ckpt.entries.values()):
            raise CheckpointError(
                f"{ckpt.path}: config says bitsandbytes but no tensor carries a bitsandbytes quant state"
                + (
                    f" ({packed[0]} is stored as {ckpt.entries[packed[0]].dtype} {list(ckpt.entries[packed[0]].shape)}, "
                    "packed bytes: its quant state is missing)"
                    if packed
                    else ""
                )
            )
        # the producer quantized no layer (transformers 5 leaves Falcon's FalconLinear layers dense, say) and
        # saved its floating weights: loaded as stored, as transformers loads them
        warn_at_caller(
            f"{ckpt.path}: config.json says bitsandbytes, but every weight is stored unquantized (the producer "
            "quantized no layer): loaded as stored"
        )
    if method == "fp8" and "fp8" not in quantized:
        raise CheckpointError(f"{ckpt.path}: config says fp8 but no float8 weight was found")
    if len(quantized) > 1:
        raise FormatError(
            f"{ckpt.path}: mixes quantization formats {sorted(quantized)}; qbridge reads one per checkpoint"
        )
    names = {"bnb4": "bitsandbytes-4bit", "bnb8": "bitsandbytes-8bit", "fp8": "fp8", "torchao": "torchao"}
    ckpt.format = (
        names[next(iter(quantized))] if quantized else ("safetensors" if ckpt.source.metadata else "torch")
    )


def _nbytes(src: _Source, key: str) -> int:
    shape, dtype = src.shapes[key]
    return math.prod(shape) * dtype.itemsize


def _subclass_bytes(t: torch.Tensor) -> int:
    names = list(getattr(type(t), "tensor_data_names", [])) + list(
        getattr(type(t), "optional_tensor_data_names", []) or []
    )
    pieces = [getattr(t, n, None) for n in names] or [
        getattr(t, "quantized_data", None),
        getattr(t, "quantized_scalers", None),
    ]
    return sum(p.numel() * p.element_size() for p in pieces if isinstance(p, torch.Tensor))


def _bnb4_entry(ckpt: Checkpoint, name: str, quant_type: str, state_key: str) -> Entry:
    src = ckpt.source
    where = ckpt.where(state_key)
    try:
        document = src.read(state_key).detach()  # uint8, as bitsandbytes stores it; another dtype as values
        raw = document.numpy().tobytes() if document.dtype == torch.uint8 else bytes(document.tolist())
        doc = json.loads(raw.decode("utf-8"))
    except Exception as e:
        raise CheckpointError(f"{where}: the bitsandbytes quant state is not readable JSON ({e})") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where}: the bitsandbytes quant state is not a JSON object")
    for field in ("blocksize", "shape", "dtype"):
        if field not in doc:
            raise CheckpointError(f"{where}: the quant state lacks {field!r}")

    def positive(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 24

    if not positive(doc["blocksize"]) or (
        "nested_blocksize" in doc and not positive(doc["nested_blocksize"])
    ):
        raise CheckpointError(f"{where}: blocksize and nested_blocksize must be positive integers, found "
                              f"{doc['blocksize']!r} and {doc.get('nested_blocksize')!r}")  # fmt: skip
    if not (
        isinstance(doc["shape"], list)
        and doc["shape"]
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in doc["shape"])
    ):
        raise CheckpointError(
            f"{where}: the quant state's shape must be a list of non-negative integers, found {doc['shape']!r}"
        )
    offset = doc.get("nested_offset", 0.0)
    if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
        raise CheckpointError(f"{where}: nested_offset must be a finite number, found {offset!r}")
    if doc.get("quant_type", quant_type) != quant_type:
        raise CheckpointError(
            f"{where}: the key says {quant_type} but the quant state says {doc.get('quant_type')!r}"
        )
    if name not in src.shapes:
        raise CheckpointError(f"{where}: quant state for {name!r}, which the checkpoint does not hold")
    out_dtype = DTYPES.get(str(doc["dtype"]))
    if out_dtype is None:
        raise CheckpointError(
            f"{where}: the quant state's dtype {doc['dtype']!r} is not float16, bfloat16 or float32"
        )
    shape = tuple(int(s) for s in doc["shape"])
    keys = {"weight": name, "quant_state": state_key}
    for piece in BNB_PIECES:
        key = f"{name}.{piece}"
        if key in src.shapes:
            keys[piece] = key
    if "absmax" not in keys:
        raise CheckpointError(
            f"{ckpt.where(name)}: 4-bit weight without {name}.absmax{ckpt.unlisted(f'{name}.absmax')}"
        )
    nested = "nested_absmax" in keys
    if nested and ("nested_quant_map" not in keys or "nested_offset" not in doc):
        missing = " and ".join(
            ([f"{name}.nested_quant_map"] if "nested_quant_map" not in keys else [])
            + (["the quant state's nested_offset"] if "nested_offset" not in doc else [])
        )
        raise CheckpointError(
            f"{where}: a nested absmax ({name}.nested_absmax) needs {name}.nested_quant_map and the quant "
            f"state's nested_offset; {missing} missing (the checkpoint is incomplete)"
            + ckpt.unlisted(f"{name}.nested_quant_map")
        )
    if not nested and "nested_quant_map" not in keys and src.shapes[keys["absmax"]][1] == torch.uint8:
        raise CheckpointError(
            f"{ckpt.where(keys['absmax'])}: a nested absmax's uint8 codes, but {name}.nested_absmax and "
            f"{name}.nested_quant_map, which decode them, are missing (the checkpoint is incomplete)"
            + ckpt.unlisted(f"{name}.nested_absmax", f"{name}.nested_quant_map")
        )
    if not nested and "nested_quant_map" in keys:  # the table of a nested absmax that is not there
        raise CheckpointError(
            f"{ckpt.where(name)}: 4-bit weight with {name}.nested_quant_map but without {name}.nested_absmax, "
            f"the nested absmax it decodes (the checkpoint is incomplete){ckpt.unlisted(f'{name}.nested_absmax')}"
        )
    # the sizes must fit before any byte is dequantized
    n = math.prod(shape)
    blocksize = int(doc["blocksize"])
    (pshape, pdtype) = src.shapes[name]
    have = math.prod(pshape) * pdtype.itemsize
    if have < (n + 1) // 2 or have > (n + 1) // 2 + pdtype.itemsize:
        raise CheckpointError(
            f"{ckpt.where(name)}: {have} packed bytes, but the quant state's shape {shape} needs {(n + 1) // 2}"
        )
    nblocks = -(-n // blocksize)
    if math.prod(src.shapes[keys["absmax"]][0]) != nblocks:
        raise CheckpointError(
            f"{ckpt.where(keys['absmax'])}: {math.prod(src.shapes[keys['absmax']][0])} entries, but {n} elements in "
            f"blocks of {blocksize} need {nblocks}"
        )
    stored = sum(_nbytes(src, k) for k in keys.values())
    return Entry(name, "bnb4", shape, out_dtype, stored, keys, {"quant_state": doc, "quant_type": quant_type})


@functools.lru_cache(maxsize=1024)
def _fp8_facts(
    shape: tuple[int, ...],
    scale_shape: tuple[int, ...],
    scale_dtype: torch.dtype,
    block: tuple[int, int] | None,
) -> tuple[torch_side.ScaleLayout, bool, int]:
    """Of a float8 weight's (shape, scale shape, scale dtype, block) (a checkpoint repeats few across its layers
    and experts): the scale layout, whether its blocks leave a partial tile, and the bytes stored for both; or
    the TypeError of a scale dtype no decode takes, or the ValueError of scales that do not tile the weight."""
    check_scale_dtype(scale_dtype)
    layout = torch_side.fp8_scale_layout(shape, scale_shape, block)
    partial = layout.kind == "block" and any(d % b for d, b in zip(shape[-2:], layout.block))
    stored = math.prod(shape) + math.prod(scale_shape) * scale_dtype.itemsize  # float8: one byte each
    return layout, partial, stored


def _scale_words(key: str, msg: str, stored: Sequence[int] | None) -> str:
    """``msg``, from a decode that calls its scale argument ``scale_inv``, calling the scale by the
    checkpoint's own name for it (``weight_scale_inv``, ``weight_scale``). Where the shape it gives is one
    matrix's (a stacked weight's scales, checked matrix by matrix), the stored shape ``stored`` comes first."""
    if not msg.startswith("scale_inv "):
        return msg
    leaf = key.rpartition(".")[2]
    said = re.match(r"scale_inv has shape (\([^)]*\))", msg)
    if said is not None and stored is not None and said.group(1) != str(tuple(stored)):
        return (
            f"{leaf} has shape {tuple(stored)}: each matrix's scales have shape {said.group(1)}"
            + msg[said.end() :]
        )
    return leaf + msg[len("scale_inv") :]


def scale_error(
    ckpt: Checkpoint, key: str, e: Exception, stored: Sequence[int] | None = None
) -> CheckpointError:
    """``e``, raised by a decode that calls its scale argument ``scale_inv``, as a CheckpointError naming the
    tensor ``key`` (stored with shape ``stored``) and calling it by the checkpoint's own name for it."""
    return CheckpointError(f"{ckpt.where(key)}: {_scale_words(key, str(e), stored)}")


def _fp8_entry(
    ckpt: Checkpoint, key: str, shape: tuple[int, ...], dtype: torch.dtype, block: tuple[int, int] | None
) -> Entry:
    """``block``: ``quantization_config.weight_block_size``, or None."""
    shapes = ckpt.source.shapes
    inv, plain = key + FP8_SCALES[0], key + FP8_SCALES[1]  # weight_scale_inv, weight_scale
    has_inv, has_plain = inv in shapes, plain in shapes
    if not (has_inv or has_plain):
        raise CheckpointError(
            f"{ckpt.where(key)}: float8 weight without {inv} or {plain}"
            + (
                ckpt.unlisted(inv, plain)
                or "; an FP8 checkpoint stores each weight's scale beside it: this "
                "one is incomplete (download or save it again)"
            )
        )
    if has_inv and has_plain:
        raise CheckpointError(
            f"{ckpt.where(key)}: float8 weight with two scales, {inv} and {plain}; which one it is "
            "multiplied by cannot be told (the checkpoint is damaged or mixes two formats)"
        )
    scale = inv if has_inv else plain
    scale_shape, scale_dtype = shapes[scale]
    try:  # a scale dtype no decode takes is refused by every path alike (a kept weight would convert it)
        layout, partial, stored = _fp8_facts(shape, scale_shape, scale_dtype, block)
    except TypeError as e:
        raise scale_error(ckpt, scale, e) from e
    except BlockSizeUnknown as e:  # torch_side's hint is to a caller; here the block size is the config's
        raise CheckpointError(
            f"{ckpt.where(scale)}: {_scale_words(scale, e.reason, scale_shape)}; the checkpoint's config.json "
            "must say which: quantization_config.weight_block_size (e.g. [128, 128])"
        ) from e
    except ValueError as e:
        raise scale_error(ckpt, scale, e, scale_shape) from e
    info = {"block_size": block, "layout": layout, "partial": partial}
    return Entry(key, "fp8", shape, dtype, stored, {"weight": key, "scale": scale}, info)


# the pieces torchao's safetensors layout writes for a tensor subclass ``module.weight``: ``module._weight_qdata``
# (its data) and ``module._weight_scale`` etc., described by the file's metadata
_TORCHAO_PIECE = re.compile(r"(.+)\._([A-Za-z0-9_]+?)_(qdata|scale|zero_point|act_scale)")


def _torchao_piece(src: _Source, key: str) -> bool:
    """Whether ``key`` is, by its name and its partners, a piece of a torchao tensor in torchao's layout: its
    tensor's ``_qdata`` (integer or float8, not a floating dtype of 16 or more bits) and ``_scale`` are both
    held, under the same file."""
    piece = _TORCHAO_PIECE.fullmatch(key) if "._" in key else None  # the pattern needs "._"
    if piece is None:
        return False
    qdata, scale = (f"{piece[1]}._{piece[2]}_{name}" for name in ("qdata", "scale"))
    return (
        qdata in src.shapes
        and scale in src.shapes
        and src.shapes[qdata][1] not in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        and src.key_file.get(qdata) == src.key_file.get(scale) == src.key_file.get(key)
    )


def _torchao_safetensors_entries(
    ckpt: Checkpoint, path: pathlib.Path, meta: dict[str, str]
) -> Iterator[Entry]:
    try:
        names = json.loads(meta["tensor_names"])
    except Exception as e:
        raise CheckpointError(f"{path}: torchao metadata 'tensor_names' is not JSON ({e})") from e
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: torchao metadata 'tensor_names' is not a list of names: {names!r}")
    for name in names:
        try:
            doc = json.loads(meta[name])
        except Exception as e:
            raise CheckpointError(f"{path}: torchao metadata for {name!r} missing or not JSON ({e})") from e
        pieces = doc.get("_tensor_data_names", []) if isinstance(doc, dict) else None
        if (
            not isinstance(doc, dict)
            or not isinstance(doc.get("_type", ""), str)
            or not isinstance(doc.get("_data", {}), dict)
            or not isinstance(pieces, list)
            or not all(isinstance(p, str) for p in pieces)
        ):
            raise CheckpointError(
                f"{path}: torchao metadata for {name!r} is not torchao's description of a tensor (an object with "
                "a '_type' name, a '_data' object and a '_tensor_data_names' list; the file is damaged): "
                f"{meta[name][:200]}"
            )
        if doc.get("_type") in ("Tensor", "torch.Tensor"):
            continue  # a plain tensor: classified as dense
        module, _, leaf = name.rpartition(".")
        prefix = f"{module}._{leaf}_"
        # by name, whatever order the file's tensors were added in
        keys = dict(sorted((k[len(prefix) :], k) for k in ckpt.source.shapes if k.startswith(prefix)))
        missing = [n for n in doc.get("_tensor_data_names", []) if n not in keys]
        if missing:
            raise CheckpointError(f"{path}: torchao tensor {name!r} lacks its pieces {missing}")
        data = doc.get("_data", {})
        # the logical shape is qdata's for the unpacked layouts torchao writes here (Int8, Float8, IntxUnpacked);
        # it is checked against the rebuilt tensor when the weight is read
        shape = (
            ckpt.source.shapes[keys["qdata"]][0]
            if "qdata" in keys
            else ckpt.source.shapes[next(iter(keys.values()))][0]
        )
        stored_dtype = data.get("dtype", {})
        stored_name = stored_dtype.get("_data", "") if isinstance(stored_dtype, dict) else str(stored_dtype)
        dtype = DTYPES[stored_name] if stored_name in DTYPES else _model_dtype(ckpt)
        stored = sum(_nbytes(ckpt.source, k) for k in keys.values())
        yield Entry(
            name,
            "torchao",
            shape,
            dtype,
            stored,
            keys,
            # torchao's metadata of this tensor alone: torchao rebuilds it without reading the file's others
            {
                "type": doc.get("_type"),
                "metadata": {"tensor_names": json.dumps([name]), name: meta[name]},
                "file": path,
            },
        )
