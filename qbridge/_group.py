"""Decoding many FP8 weights of one kind together on a GPU, straight into arrays XLA allocated: the
loader's route for a checkpoint's repeated weights (a mixture-of-experts model's experts), which shares the
host work of reading, copying, decoding and handing over across a group instead of paying it per weight.

On a GPU the loader hands this stage every FP8 weight that the decode writes in one pass in the Flax
layout (as stored, or transposed) and that keeps its dtype, whether it is placed on the load's device or
split over GPUs that are all this process's (a ``jax.sharding.Sharding``; see below). Weights of one kind
(shape, float8 dtype, scale shape and dtype, block size, output dtype, layout, sharding) wait until a
group of them is gathered (or until the pending weights hold ``max_bytes``, or the load ends); then

1. their scales are read with one system call each into one tensor, checked for NaN/Inf together, and
   copied to the device in one copy; their float8 bytes (read ahead into pinned host memory by the
   loader's reading threads, or, when small, read like the scales) go into one device tensor. The scales
   and small float8 bytes of a kind's next group are read in a background thread while the loader goes on
   (:meth:`FP8Groups.expect` gives the weights to come, in order; at most ``AHEAD_BYTES`` are read ahead);
   a group that turns out otherwise (decoded early, see below) reads its own;
2. XLA allocates their results in one call (``XlaDestinations.take_many``);
3. one launch decodes every weight into its result (``torch_side``'s grouped FP8 kernel: the bits of one
   call per weight).

A sharded kind's group is decoded on one of its devices (the groups take turns) into one torch buffer
of at most ``SHARDED_BYTES`` of results, instead of into arrays XLA allocated, and each weight's shards
are cut from it and copied into their devices' arrays (:func:`qbridge._sharding.load_sharded_leaf`): that
device holds a group's decoded weights besides their shards while the group is placed.

The first weight of a kind in a process is decoded by itself (its call checks the kind), and until a
kind's allocation call and the grouped kernel are compiled (in the background: the grouped kernel together
with the single weight's, a group's allocation call from the first time it is asked for) its weights are
decoded one by one into results handed over as the loader's other weights are. Either
way the values are the same.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch

import jax_side
import torch_side
from torch_side._checks import on_device
from torch_side._fp8 import dequantize_fp8_group_into, fp8_planned

from ._checkpoint import READ_AHEAD_MIN_BYTES, Checkpoint, Entry, _readers, scale_error
from ._decode import all_finite, check_scales
from ._dtypes import torch_dtype
from ._handoff import XlaDestinations, _torch_view, load_library
from ._place import hand_over
from ._sharding import torch_device

GROUP = 256  # weights per grouped decode, at most (see group_size)
AHEAD_BYTES = 64 << 20  # scales and small float8 bytes of groups to come, read ahead, at most
# a sharded kind's group: its decoded weights (the buffer its shards are cut from), at most
SHARDED_BYTES = 256 << 20


def group_size(weight_bytes: int, max_bytes: int) -> int:
    """Weights per group of a kind whose weights store ``weight_bytes`` each: as many as half of ``max_bytes``
    holds, rounded down to a power of two (few allocation programs per shape), between 1 and :data:`GROUP`.
    A group's fixed host work (its reads' and copies' calls, the allocation call, the launch) is shared by
    more small weights; large weights (DeepSeek-V3's experts, 14.7 MB: 32 in half of the loader's 1 GiB) keep the
    pending bytes within the bound."""
    n = min(GROUP, max(1, max_bytes // 2 // max(1, weight_bytes)))
    return 1 << (n.bit_length() - 1)


def _weights_stacked(kind: tuple[Any, ...]) -> bool:
    """Whether a kind's float8 bytes are read like its scales, stacked in one tensor (each weight at most
    ``READ_AHEAD_MIN_BYTES``); larger ones are read ahead one by one by the loader's reading threads."""
    wshape, wdtype = kind[1]
    return math.prod(wshape) * wdtype.itemsize <= READ_AHEAD_MIN_BYTES


class FP8Groups:
    """Gathers a GPU load's FP8 weights by kind and decodes each group together (see the module).

    Results go into ``values`` under each weight's leaf path, valid once ``into.settle()`` returns.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        tdev: torch.device,
        jdev: jax.Device,
        into: XlaDestinations,
        values: dict[Any, Any],
        max_bytes: int,
    ) -> None:
        self.ckpt, self.tdev, self.jdev, self.into, self.values = ckpt, tdev, jdev, into, values
        self.max_bytes = max_bytes
        self.pending: dict[tuple[Any, ...], list[tuple[Any, Entry, Any]]] = {}  # (path, entry, place)
        self.pending_bytes: dict[tuple[Any, ...], int] = {}
        self.total = 0  # stored bytes pending
        # the weights still to come of each kind, in the order they will be added (expect)
        self.upcoming: dict[tuple[Any, ...], collections.deque[Entry]] = {}
        # each kind's next group's reads, started in the background: (scale keys, float8 keys or None, the
        # reads, their bytes); counted as read when a group takes them
        self.ahead: dict[
            tuple[Any, ...], tuple[list[str], list[str] | None, concurrent.futures.Future[Any], int]
        ] = {}
        self.ahead_bytes = 0
        self._sizes: dict[tuple[Any, ...], int] = {}  # weights per group, by kind
        self.turn = 0  # the sharded groups' turns: the device a group is decoded on
        load_library()  # its reads of many ranges read a group's tensors (Checkpoint.read_stacked), once loaded

    def kind(
        self, entry: Entry, rule: jax_side.LeafRule, cast: Any, sharding: Any = None
    ) -> tuple[Any, ...] | None:
        """The group ``entry`` joins, or None when it is loaded by itself: not FP8, not 2-D, flipped, laid
        out otherwise than as stored or transposed, cast to another dtype, or with a 0-d scale. ``sharding``: the leaf's
        ``jax.sharding.Sharding`` over GPUs that are all this process's, or None (placed on the load's device);
        weights of a sharded kind are added with the function that places each (see :meth:`add`)."""
        if entry.kind != "fp8" or len(entry.shape) != 2 or rule.flip:
            return None
        if cast is not None and torch_dtype(cast) != entry.dtype:
            return None
        perm = jax_side.permutation(rule, 2)
        if perm not in (None, (1, 0)):
            return None
        shapes = self.ckpt.source.shapes
        if not shapes[entry.keys["scale"]][0]:  # a 0-d scale (one for the tensor): by itself, as it is stored
            return None
        kind = (entry.shape, shapes[entry.keys["weight"]], shapes[entry.keys["scale"]],
                entry.info["block_size"], entry.dtype, perm == (1, 0))  # fmt: skip
        return kind if sharding is None else (*kind, sharding)

    def expect(self, kind: tuple[Any, ...], entry: Entry) -> None:
        """Says that ``entry`` will be added to ``kind`` (in the order of these calls), so that its group's
        scales and small float8 bytes can be read ahead; :meth:`start` starts the first reads."""
        self.upcoming.setdefault(kind, collections.deque()).append(entry)

    def start(self) -> None:
        """Starts reading each expected kind's first group in the background (up to ``AHEAD_BYTES``)."""
        for kind in self.upcoming:
            self._read_ahead(kind)

    def _read_ahead(self, kind: tuple[Any, ...]) -> None:
        """Starts reading the next group of ``kind`` (the next weights expected, as many as a group holds)."""
        upcoming = self.upcoming.get(kind)
        # a torch file's tensors are in memory already (read_stacked reads them through read, which counts)
        if kind in self.ahead or not upcoming or self.ckpt.source._state is not None:
            return
        (wshape, wdtype), (sshape, sdtype) = kind[1], kind[2]
        entries = list(itertools.islice(upcoming, self._size(kind, upcoming[0])))
        small = _weights_stacked(kind)
        nbytes = len(entries) * (
            math.prod(sshape) * sdtype.itemsize + (math.prod(wshape) * wdtype.itemsize if small else 0)
        )
        if self.ahead_bytes + nbytes > AHEAD_BYTES:
            return
        skeys = [e.keys["scale"] for e in entries]
        wkeys = [e.keys["weight"] for e in entries] if small else None
        future = _readers("group").submit(self._read, skeys, wkeys, False)
        self.ahead[kind] = (skeys, wkeys, future, nbytes)
        self.ahead_bytes += nbytes

    def _read(
        self, skeys: list[str], wkeys: list[str] | None, count: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A group's scales (rows padded to 16 bytes) and, for small weights, float8 bytes (pinned on a GPU);
        counted as read with ``count`` (a read ahead is counted when a group takes it)."""
        rows = self.ckpt.read_stacked(skeys, count=count)
        if wkeys is None:
            return rows, None
        return rows, self.ckpt.read_stacked(wkeys, pin=self.tdev.type == "cuda", count=count)

    def _reads(
        self, kind: tuple[Any, ...], entries: list[Entry], small: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The group's reads: those read ahead when they are of these weights, else read here."""
        skeys = [e.keys["scale"] for e in entries]
        ahead = self.ahead.pop(kind, None)
        if ahead is not None:
            keys, wkeys, future, nbytes = ahead
            self.ahead_bytes -= nbytes
            if keys == skeys:
                got = future.result()
                self.ckpt.count_stacked(keys)
                if wkeys is not None:
                    self.ckpt.count_stacked(wkeys)
                return got
            future.cancel()  # another group (decoded early): its own reads below; the dropped ones uncounted
            concurrent.futures.wait([future])
        return self._read(skeys, [e.keys["weight"] for e in entries] if small else None)

    def close(self) -> None:
        """Drops the reads ahead that no group took (a load that failed or ended early), once they are done."""
        futures = [future for _, _, future, _ in self.ahead.values()]
        self.ahead.clear()
        self.ahead_bytes = 0
        for future in futures:
            future.cancel()
        concurrent.futures.wait(futures)

    def _size(self, kind: tuple[Any, ...], entry: Entry) -> int:
        """Weights per group of ``kind`` (``entry`` one of them): :func:`group_size` of their stored bytes in
        ``max_bytes``, and for a sharded kind of their decoded bytes in ``2 * SHARDED_BYTES`` too."""
        size = self._sizes.get(kind)
        if size is None:
            size = group_size(entry.stored_bytes, self.max_bytes)
            if len(kind) > 6:
                size = min(size, group_size(entry.dense_bytes, 2 * SHARDED_BYTES))
            self._sizes[kind] = size
        return size

    def add(
        self,
        kind: tuple[Any, ...],
        path: Any,
        entry: Entry,
        place: Callable[[torch.Tensor], jax.Array] | None = None,
    ) -> None:
        """Queues a weight (its result goes to ``values[path]``); decodes its group when it is full, and the
        largest group when the pending weights outgrow ``max_bytes``. A sharded kind's weight comes with
        ``place``, which makes its ``jax.Array`` from the decoded weight (Flax layout, on one of the
        sharding's devices; the loader's :func:`~qbridge._sharding.load_sharded_leaf` with ``whole=``)."""
        upcoming = self.upcoming.get(kind)
        if upcoming and upcoming[0] is entry:
            upcoming.popleft()
        members = self.pending.setdefault(kind, [])
        members.append((path, entry, place))
        stored = entry.stored_bytes
        self.pending_bytes[kind] = self.pending_bytes.get(kind, 0) + stored
        self.total += stored
        if len(members) >= self._size(kind, entry):  # one kind: one size
            self.flush(kind)
        elif self.total > self.max_bytes:
            self.flush(max(self.pending_bytes, key=self.pending_bytes.__getitem__))

    def flush_all(self) -> None:
        for kind in list(self.pending):
            self.flush(kind)

    def flush(self, kind: tuple[Any, ...]) -> None:
        members = self.pending.pop(kind)
        self.total -= self.pending_bytes.pop(kind)
        shape, (wshape, wdtype), (sshape, _), block_size, dtype, transpose = kind[:6]
        out_shape = (shape[1], shape[0]) if transpose else shape
        sharded = len(kind) > 6
        entries = [e for _, e, _ in members]
        ckpt, dev = self.ckpt, self.tdev
        if sharded:  # decoded on one of the sharding's devices, taking turns
            devices = list(kind[6].addressable_devices_indices_map(out_shape))
            dev = torch_device(devices[self.turn % len(devices)])
            self.turn += 1
        rows, stacked = self._reads(kind, entries, _weights_stacked(kind))  # each row padded to 16 bytes
        self._read_ahead(kind)  # the next group of this kind, while this one is decoded
        self._check(rows[:, : math.prod(sshape)], entries, sshape)
        with on_device(dev):
            # non_blocking: pinned memory copies asynchronously; small pageable copies are staged at once
            # (a blocking copy would make the host wait for the device's earlier work). The rows are copied
            # whole, so that every weight's scales start 16-byte aligned on the device too.
            # [n, ...] tensors whose rows are the weights and their scales (no tensor made per weight)
            S = rows.to(dev, non_blocking=True)[:, : math.prod(sshape)].unflatten(1, sshape)
            if stacked is not None:
                W = stacked.to(dev, non_blocking=True)[:, : math.prod(wshape)].unflatten(1, wshape)
            else:
                W = torch.empty((len(entries), *wshape), dtype=wdtype, device=dev)
                ckpt.read_into([e.keys["weight"] for e in entries], W.unbind(0))
            args = dict(block_size=block_size, transpose=transpose)
            start = 0 if fp8_planned(W[0], S[0], dtype, **args) else 1  # a first call checks the kind
            if sharded:
                self._sharded(members, W, S, start, out_shape, dtype, args)
                return
            # one allocation call for the whole group, the weight checked by its own call included: a
            # group's size, and so its allocation program, is the same in a process's first load and later
            if len(members) - start > 1:
                arrays = self.into.take_many(len(members), out_shape, dtype, self.jdev, dev)
            else:  # a group of one weight (a kind's last, or its only one) is handed over as a single weight:
                # its array expected, so that its allocation call makes one (not a pool of a shape nobody said
                # would come: tens of arrays at a small shape). A group whose allocation call is not compiled
                # yet (a process's first loads) takes pools as before: expecting its weights would ask for a
                # program per count that the compiled group call makes useless
                arrays = None
                self.into.expect(out_shape, dtype, self.jdev, len(members))
            if start:
                self._one(members[0], W[0], S[0], arrays[0] if arrays is not None else None, dtype, args)
            rest = members[start:]
            if arrays is not None:
                addresses = [a.unsafe_buffer_pointer() for a in arrays[start:]]
                if dequantize_fp8_group_into(W[start:], S[start:], addresses, dtype, **args):
                    for (path, _, _), array in zip(rest, arrays[start:], strict=True):
                        self.values[path] = array
                    return
            for j, member in enumerate(rest):
                into = arrays[start + j] if arrays is not None else None
                self._one(member, W[start + j], S[start + j], into, dtype, args)

    def _sharded(
        self,
        members: list[tuple[Any, Entry, Any]],
        W: torch.Tensor,
        S: torch.Tensor,
        start: int,
        out_shape: tuple[int, ...],
        dtype: torch.dtype,
        args: dict[str, Any],
    ) -> None:
        """A sharded kind's group, on the current device: decoded by one launch into one buffer (each result
        16-byte aligned), then each weight's ``place``; one by one while the launch cannot be made."""
        if start:
            self._one(members[0], W[0], S[0], None, dtype, args)
        rest = members[start:]
        if len(rest) > 1 and fp8_planned(W[start], S[start], dtype, **args):  # else no launch can be made
            numel, size = math.prod(out_shape), dtype.itemsize
            stride = -(-numel * size // 16) * 16 // size  # elements from one result to the next
            buffer = torch.empty(len(rest) * stride, dtype=dtype, device=W.device)
            addresses = (buffer.data_ptr() + np.arange(len(rest), dtype=np.int64) * (stride * size)).tolist()
            if dequantize_fp8_group_into(W[start:], S[start:], addresses, dtype, **args):
                for j, (path, _, place) in enumerate(rest):
                    self.values[path] = place(buffer[j * stride : j * stride + numel].view(out_shape))
                return
        for j, member in enumerate(rest):
            self._one(member, W[start + j], S[start + j], None, dtype, args)

    def _one(
        self,
        member: tuple[Any, Entry, Any],
        W: torch.Tensor,
        scale: torch.Tensor,
        array: jax.Array | None,
        dtype: torch.dtype,
        args: dict[str, Any],
    ) -> None:
        """One weight by itself (its own call, as the loader decodes a weight), into ``array`` if given, or
        placed by its ``place``."""
        path, entry, place = member
        try:
            t = torch_side.dequantize_fp8(W, scale, dtype, **args)
        except (TypeError, ValueError) as e:
            raise scale_error(self.ckpt, entry.keys["scale"], e, scale.shape) from e
        if place is not None:
            self.values[path] = place(t)
        elif array is not None:
            _torch_view(array, self.tdev).copy_(t)
            self.values[path] = array
        else:
            self.values[path] = hand_over(t.contiguous(), self.jdev, self.into)

    def _check(self, scales: torch.Tensor, entries: list[Entry], sshape: tuple[int, ...]) -> None:
        """NaN/Inf scales are a damaged checkpoint: checked for the whole group, then named one by one."""
        if not all_finite(scales):
            for e, row in zip(entries, scales, strict=True):
                check_scales(self.ckpt, e.keys["scale"], row.reshape(sshape))
