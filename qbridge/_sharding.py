"""Sharded loading: each weight made as per-device shards, one global ``jax.Array``.

In one process that holds every device of a leaf's sharding, the weight is read whole once (ahead, by the
loader's reading threads, as in an unsharded load), decoded on one of those devices (the leaves take
turns, spreading the copies to the devices and the decoding over them), and each shard is cut from it on
that device and copied to its own: every stored byte is read once, and that device holds one whole decoded
weight besides its shards while the leaf is made. In a process of a multi-controller job (``jax.distributed``),
which holds only some of the devices, every addressable device reads and dequantizes only its own slice.
Such a shard is produced from the checkpoint directly: the slice's rows and columns are read from the file
(safetensors reads only those), the quantized pieces covering them are moved to the shard's device and
dequantized there, and the exact slice is cut out on that device. Quantization blocks that straddle a
shard boundary are dequantized whole and then cut (FP8 tiles; bitsandbytes' flat 4-bit blocks, which
run across rows). The shards become one global array with ``jax.make_array_from_single_device_arrays``
without any further copy. Only addressable devices are served, so each process of a multi-controller
job (``jax.distributed``) produces just its own shards.

What a process of a multi-controller job reads from the files (``LoadReport.read_bytes`` counts it):

- plain weights: the rows and columns of its shards (safetensors slices);
- FP8 weights: the scale tiles that cover its shards, rows and columns rounded out to whole tiles, and
  the (small) scale tensor whole;
- bitsandbytes 4-bit weights: the packed bytes of the blocks that hold its shards. Blocks run over the
  flat row-major weight; when every row holds whole blocks (the width a multiple of the block size, as in
  every transformers checkpoint) a split along columns reads only the blocks of its columns in each
  row. The absmax of its rows comes with them (1/32 of their packed bytes when nested, 1/8 otherwise);
- torchao weights: torchao slices its own tensor subclass, rebuilt over the mapped file, so only the
  slice's pieces are read; where torchao refuses a split (across quantization groups), as below;
- bitsandbytes 8-bit weights and weights of rank 3 and more: the whole weight, decoded once per process
  on its first device and cut for each of its devices.

Replicated leaves are read whole by every process that holds a replica.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import torch

import jax_side
import torch_side

from ._checkpoint import Checkpoint, Entry
from ._decode import bnb4_pieces, check_scales, check_torchao_scales, materialize, torchao_weight
from ._errors import CheckpointError
from ._handoff import XlaDestinations
from ._place import hand_over

ShardingSpec = Callable[[str, tuple[int, ...]], Any] | tuple[Any, Sequence[tuple[str, Any]]]


def sharding_for(spec: ShardingSpec | None, name: str, shape: tuple[int, ...], existing: Any = None) -> Any:
    """The ``jax.sharding.Sharding`` of leaf ``name`` (dotted Flax path) of ``shape``, or None.

    ``spec`` is a callable ``(name, shape) -> Sharding`` or ``(mesh, rules)`` with ``rules`` a sequence of
    ``(regex, PartitionSpec)`` searched against ``name`` (first match wins; no match: replicated over the
    mesh). ``existing``, a target leaf's own sharding over several devices, wins over ``spec``.
    """
    if existing is not None and len(existing.device_set) > 1:
        return existing
    if spec is None:
        return None
    if callable(spec):
        got = spec(name, shape)
        if got is not None and not isinstance(got, jax.sharding.Sharding):
            raise TypeError(
                f"{name}: the sharding= callable returned {got!r} ({type(got).__name__}), not a "
                "jax.sharding.Sharding or None; one device d is placed with jax.sharding.SingleDeviceSharding(d)"
            )
        return got
    mesh, rules = spec
    found = matching_rule(rules, name)
    if found is not None:
        pattern, partition = found
        if len(partition) > len(shape):
            raise ValueError(
                f"{name}: the sharding rule {pattern!r} gives it {partition}, {len(partition)} entries for "
                f"{len(shape)} ax{'i' if len(shape) == 1 else 'e'}s (its Flax shape is {shape}); a "
                "PartitionSpec has at most one entry per axis: narrow the rule's regex or its spec"
            )
        return jax.sharding.NamedSharding(mesh, partition)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def matching_rule(rules: Sequence[tuple[str, Any]], name: str) -> tuple[str, Any] | None:
    """The first ``(regex, PartitionSpec)`` rule whose regex is found in leaf ``name`` (dotted Flax path), or None."""
    return next((rule for rule in rules if re.search(rule[0], name)), None)


def fits(sharding: Any, name: str, shape: tuple[int, ...]) -> None:
    """Checks that ``sharding`` can lay out leaf ``name`` (dotted Flax path) of Flax ``shape``: the loader asks it
    of every sharded leaf while planning, before anything is read (:func:`load_sharded_leaf` then takes the
    same map of shards, which JAX keeps).

    Raises:
        ValueError: it cannot (an axis its mesh splits into parts the dimension does not divide into, say,
            or memory other than the devices'), naming the leaf and the reason.
    """
    memory = getattr(sharding, "memory_kind", None)
    if memory not in (None, "device"):
        raise ValueError(
            f"{name}: its sharding puts it in {memory!r} memory; leaves are loaded into device memory: load with "
            f"the sharding's memory_kind left as 'device', then move the arrays (jax.device_put(x, "
            f"sharding.with_memory_kind({memory!r})))"
        )
    try:
        sharding.addressable_devices_indices_map(shape)
    except Exception as e:
        raise ValueError(
            f"{name}: {e} (its Flax shape is {shape}); narrow the rule or pick another spec"
        ) from e


def torch_device(device: jax.Device) -> torch.device:
    """The torch device of a JAX device (a GPU, else the CPU)."""
    return torch.device("cuda", device.local_hardware_id) if device.platform == "gpu" else torch.device("cpu")


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    return [s.indices(n)[:2] for s, n in zip(index, shape)]


def _fp8_slice(
    ckpt: Checkpoint, entry: Entry, rows: tuple[int, int], cols: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """The torch-layout slice of an FP8 weight: dequantize the scale tiles that cover it, then cut."""
    layout = entry.info["layout"]
    (r0, r1), (c0, c1) = rows, cols
    scale = ckpt.read(entry.keys["scale"])
    check_scales(ckpt, entry.keys["scale"], scale)
    if layout.kind == "tensor":
        w = ckpt.read_slice(entry.keys["weight"], (slice(r0, r1), slice(c0, c1)))
        return torch_side.dequantize_fp8(w.to(device), scale.to(device), entry.dtype)
    bo, bi = layout.block
    R0, C0 = r0 // bo * bo, c0 // bi * bi  # the slice's first tile starts here
    w = ckpt.read_slice(entry.keys["weight"], (slice(r0, r1), slice(c0, c1)))  # only the slice's bytes
    if (R0, C0) != (r0, c0):  # put it where it sits in its tiles; the padding decodes to nothing used
        padded = torch.zeros((r1 - R0, c1 - C0), dtype=w.dtype)
        padded[r0 - R0 :, c0 - C0 :] = w
        w = padded
    s = scale.reshape(layout.grid)[R0 // bo : -(-r1 // bo), C0 // bi : -(-c1 // bi)].contiguous().to(device)
    dense = torch_side.dequantize_fp8(w.to(device), s, entry.dtype, block_size=(bo, bi))
    return dense[r0 - R0 :, c0 - C0 :]


def _bnb4_slice(
    ckpt: Checkpoint, entry: Entry, bounds: list[tuple[int, int]], device: torch.device, budget: int
) -> torch.Tensor:
    """The torch-layout slice of a 1-D or 2-D bitsandbytes 4-bit weight. Its blocks run over the flat
    row-major weight, so rows are decoded in chunks (whole blocks, about ``budget`` elements) and cut.

    Reads only the packed bytes of the blocks that hold the slice: its rows, and, when each row holds whole
    blocks (the width a multiple of the block size), only the blocks of its columns in each row; the
    absmax of its rows (1/32 of their packed bytes when nested, 1/8 otherwise)."""
    doc = entry.info["quant_state"]
    blocksize = int(doc["blocksize"])
    n = math.prod(entry.shape)
    width = entry.shape[1] if len(entry.shape) == 2 else 1  # a 1-D weight: one element per "row"
    rows, cols = bounds[0], (bounds[1] if len(entry.shape) == 2 else (0, 1))
    if rows[1] <= rows[0] or cols[1] <= cols[0]:
        return torch.empty(
            (rows[1] - rows[0], cols[1] - cols[0])[: len(entry.shape)], dtype=entry.dtype, device=device
        )
    nested = "nested_absmax" in entry.keys
    nb = int(doc.get("nested_blocksize", 256))
    first, last = (
        rows[0] * width // blocksize,
        -(-(rows[1] * width) // blocksize),
    )  # absmax blocks of the rows
    base = first // nb * nb if nested else first
    pieces = bnb4_pieces(ckpt, entry, (base, last))
    absmax = pieces["absmax"].to(device)
    if nested:  # decoded once, exactly as bitsandbytes does, then sliced per chunk
        absmax = torch_side.decode_nested_absmax_reference(
            absmax, pieces["nested_absmax"].to(device), pieces["nested_quant_map"].to(device), nb,
            float(doc.get("nested_offset", 0.0)),
        )  # fmt: skip
    decode = dict(blocksize=blocksize, quant_type=entry.info["quant_type"], dtype=entry.dtype)
    out = torch.empty((rows[1] - rows[0], cols[1] - cols[0]), dtype=entry.dtype, device=device)
    # a window of whole blocks per row: only when rows hold whole blocks and the slice leaves some out
    windowed = len(entry.shape) == 2 and width % blocksize == 0 and (cols[1] - cols[0]) < width
    c0, c1 = (
        (cols[0] // blocksize * blocksize, -(-cols[1] // blocksize) * blocksize) if windowed else (0, width)
    )
    step = max(1, budget // max(1, c1 - c0))
    for a in range(rows[0], rows[1], step):
        b = min(a + step, rows[1])
        if windowed:
            per_row = width // blocksize
            packed = ckpt.read_window(entry.keys["weight"], width // 2, (a, b), (c0 // 2, c1 // 2)).to(device)
            scales = absmax.view(-1)[a * per_row - base : b * per_row - base].view(b - a, per_row)
            scales = scales[:, c0 // blocksize : c1 // blocksize].contiguous().view(-1)
            seg = torch_side.dequantize_nf4(packed.view(-1), scales, shape=((b - a) * (c1 - c0),), **decode)
            out[a - rows[0] : b - rows[0]] = seg.view(b - a, c1 - c0)[:, cols[0] - c0 : cols[1] - c0]
            continue
        blk0, blk1 = a * width // blocksize, -(-(b * width) // blocksize)
        n_seg = min(blk1 * blocksize, n) - blk0 * blocksize
        byte0 = blk0 * blocksize // 2  # blocks hold an even number of elements: byte-aligned
        packed = _packed_bytes(ckpt, entry.keys["weight"], byte0, (n_seg + 1) // 2).to(device)
        try:
            seg = torch_side.dequantize_nf4(
                packed, absmax[blk0 - base : blk1 - base].contiguous(), shape=(n_seg,), **decode
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt.where(entry.name)}: {e}") from e
        start = a * width - blk0 * blocksize
        out[a - rows[0] : b - rows[0]] = seg[start : start + (b - a) * width].view(b - a, width)[
            :, cols[0] : cols[1]
        ]
    return out if len(entry.shape) == 2 else out.reshape(-1)


def _packed_bytes(ckpt: Checkpoint, key: str, start: int, count: int) -> torch.Tensor:
    """Bytes ``start:start + count`` of a 4-bit weight's packed storage, whatever dtype stores them
    (bitsandbytes' ``quant_storage`` may be bfloat16 or float32, two or four bytes per element)."""
    size = ckpt.source.shapes[key][1].itemsize
    first, last = start // size, -(-(start + count) // size)
    raw = ckpt.read_slice(key, (slice(first, last),)).reshape(-1).view(torch.uint8)
    return raw[start - first * size : start - first * size + count]


class _NoSlice(Exception):
    """torchao cannot slice this weight there (a split across its quantization groups)."""


def _torchao_slice(
    ckpt: Checkpoint, entry: Entry, torch_index: tuple[slice, ...], device: torch.device
) -> torch.Tensor:
    """A torchao weight's slice through torchao's own slicing of its subclass, over the mapped file: only
    the slice's pieces are read. Raises ``_NoSlice`` where torchao refuses the split."""
    weight = torchao_weight(ckpt, entry, mapped=True)
    try:
        part = weight[torch_index]
    except (AssertionError, NotImplementedError, RuntimeError, ValueError, IndexError) as e:
        raise _NoSlice(str(e)) from e
    ckpt.source.count(part)
    check_torchao_scales(ckpt, entry, part)  # the slice's own scales
    dense = torch_side.dequantize_weight(part.to(device))
    want = tuple(b - a for a, b in _bounds(torch_index, entry.shape))
    if tuple(dense.shape) != want:
        raise _NoSlice(f"torchao's slice of {entry.name} has shape {tuple(dense.shape)}, expected {want}")
    return dense


def _slice_torch(
    ckpt: Checkpoint, entry: Entry, torch_index: tuple[slice, ...], device: torch.device, budget: int
) -> torch.Tensor:
    """``weight[torch_index]`` in torch layout, dequantized on ``device``."""
    bounds = _bounds(torch_index, entry.shape)
    if entry.kind == "dense":
        if entry.info.get("stored_in_out"):  # a plain Conv1D weight: stored [in, out], sliced in [out, in]
            return ckpt.read_slice(entry.keys["weight"], tuple(reversed(torch_index))).to(device).t()
        return ckpt.read_slice(entry.keys["weight"], torch_index).to(device)
    if entry.kind == "fp8" and len(entry.shape) == 2:
        return _fp8_slice(ckpt, entry, bounds[0], bounds[1], device)
    if entry.kind == "bnb4" and len(entry.shape) <= 2:
        return _bnb4_slice(ckpt, entry, bounds, device, budget)
    if entry.kind == "torchao" and len(entry.shape) == 2:
        return _torchao_slice(ckpt, entry, torch_index, device)
    # bitsandbytes 8-bit, higher ranks: the whole weight on the device, then the slice
    whole = materialize(ckpt, entry, device, jax_side.rule_for("param", "weight"))
    return whole[torch_index]


def load_shard(
    ckpt: Checkpoint, entry: Entry, rule: jax_side.LeafRule, index: tuple[slice, ...], device: torch.device
) -> torch.Tensor:
    """The Flax-layout slice ``index`` of one checkpoint weight, made on ``device``, contiguous."""
    ndim = len(entry.shape)
    perm = jax_side.permutation(rule, ndim)
    flax_shape = jax_side.flax_shape(rule, entry.shape)
    index = tuple(index) + (slice(None),) * (ndim - len(index))
    if (
        rule.flip
        and perm is not None
        and any(_bounds((index[a],), (flax_shape[a],))[0] != (0, flax_shape[a]) for a in rule.flip)
    ):
        whole = materialize(ckpt, entry, device, rule)  # a flipped axis cut across: lay out whole, then cut
        return whole[index].contiguous()
    torch_index = list(index) if perm is None else [slice(None)] * ndim
    if perm is not None:
        for flax_axis, torch_axis in enumerate(perm):
            torch_index[torch_axis] = index[flax_axis]
    budget = max(1, math.prod(b - a for a, b in _bounds(tuple(torch_index), entry.shape)))
    t = _slice_torch(ckpt, entry, tuple(torch_index), device, budget)
    if perm is not None:
        t = t.permute(perm)
    if rule.flip and perm is not None:
        t = t.flip(rule.flip)
    return t.contiguous()


def load_sharded_leaf(
    ckpt: Checkpoint,
    entry: Entry,
    rule: jax_side.LeafRule,
    sharding: Any,
    cast: Callable[[torch.Tensor], torch.Tensor],
    *,
    turn: int = 0,
    into: XlaDestinations | None = None,
    whole: torch.Tensor | None = None,
) -> jax.Array:
    """One global ``jax.Array`` with ``sharding``, each addressable shard made on its own device (on GPUs
    copied into an array from ``into`` where it has one, valid once ``into.settle()`` returns; see
    :func:`hand_over`).

    Where every device of ``sharding`` is this process's (one process serves every shard), the weight is
    read whole once (the loader reads it ahead, as an unsharded load does), decoded on one of them, device
    ``turn`` modulo their count (so that a load's leaves spread their host-to-device copies and decoding
    over the devices), and each shard cut from it and copied to its device: every stored byte is read once.
    Otherwise (a process of a multi-process job) each shard reads only its own slice, as the module says.
    ``whole``: the weight decoded already (Flax layout, on one of the devices; an FP8 group's result), cut
    for each device as a weight decoded here is; nothing is read."""
    shape = jax_side.flax_shape(rule, entry.shape)
    indices = sharding.addressable_devices_indices_map(shape)  # its fit checked by fits() while planning
    arrays = []
    if whole is None and (sharding.is_fully_addressable or not reads_slices(entry)):  # decoded once, cut
        devices = list(indices)
        whole = materialize(ckpt, entry, torch_device(devices[turn % len(devices)]), rule)
    made: dict[str, torch.Tensor] = {}  # replicas within this process are read once and copied
    for device, index in indices.items():
        key = repr(tuple((s.start, s.stop, s.step) for s in index))
        if key in made:  # a copy: arrays of different devices never share memory
            shard = made[key].to(torch_device(device), copy=True)
        elif whole is not None:
            shard = cast(whole[tuple(index)].contiguous().to(torch_device(device)))
        else:
            try:
                shard = cast(load_shard(ckpt, entry, rule, index, torch_device(device)))
            except _NoSlice:  # from here on: decoded whole once, cut for each device
                whole = materialize(ckpt, entry, torch_device(device), rule)
                shard = cast(whole[tuple(index)].contiguous().to(torch_device(device)))
        made.setdefault(key, shard)
        arrays.append(hand_over(shard, device, into))
        del shard
    made.clear()
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def reads_slices(entry: Entry) -> bool:
    """Whether a shard of ``entry`` reads only its own byte ranges: plain weights, FP8 block/row/tensor
    scaled 2-D weights, bitsandbytes 4-bit weights of rank 1 or 2, and 2-D torchao weights where torchao
    slices them. Others (bitsandbytes 8-bit, higher ranks) are read and decoded whole, once per process."""
    return (
        entry.kind == "dense"
        or (entry.kind in ("fp8", "torchao") and len(entry.shape) == 2)
        or (entry.kind == "bnb4" and len(entry.shape) <= 2)
    )


def spec_problem(spec: jax.sharding.PartitionSpec, axes: Sequence[Any]) -> str | None:
    """What makes ``spec`` unfit to lay out a stored weight over a mesh of ``axes``, in words, or None: an
    entry that is no axis of the mesh, an axis named twice, reduced or unreduced axes."""
    if getattr(spec, "unreduced", None) or getattr(spec, "reduced", None):
        return (
            f"{spec} has reduced or unreduced axes, which describe partial sums of a computation, not how a "
            "stored weight is laid out: give a PartitionSpec of axis names and None"
        )
    named = [  # each entry: None, UNCONSTRAINED, an axis name or a tuple of them
        a
        for entry in spec
        if entry is not None and entry is not jax.sharding.PartitionSpec.UNCONSTRAINED
        for a in (entry if isinstance(entry, tuple) else (entry,))
    ]
    unknown = list(dict.fromkeys(a for a in named if a not in axes))
    if unknown:
        return (
            f"{spec} names {', '.join(map(repr, unknown))}, which the mesh lacks (its axes: "
            f"{', '.join(map(repr, axes))})"
        )
    twice = list(dict.fromkeys(a for a in named if named.count(a) > 1))
    if twice:
        return (
            f"{spec} names {', '.join(map(repr, twice))} more than once; a mesh axis splits at most one dimension "
            "of an array (split two dimensions over two axes, or one dimension over a tuple of axes)"
        )
    return None


def check_spec(spec: Any) -> Any:
    """``spec`` checked, with ``(mesh, rules)`` rules made a tuple (an iterator is read once), and each
    rule's regex compiled.

    Raises:
        TypeError: not a callable ``(name, shape)``, nor a ``(mesh, rules)`` pair of ``(regex, PartitionSpec)``
            rules (a list, an iterator or a ``{regex: PartitionSpec}`` dict); a bare mesh included.
        ValueError: a rule's regex does not compile; a rule's spec is unfit (:func:`spec_problem`).
    """
    if isinstance(spec, jax.sharding.Mesh):  # callable too (a context decorator), but no (name, shape) one
        raise TypeError(
            "sharding=mesh: give the mesh with its rules, sharding=(mesh, [(regex, PartitionSpec), ...]) (leaves no "
            "rule matches are replicated over the mesh), or a callable (name, shape) -> Sharding"
        )
    if spec is None:
        return spec
    if callable(spec):
        try:
            inspect.signature(spec).bind("model.layers.0.mlp.down_proj.kernel", (1, 1))
        except TypeError as e:
            raise TypeError(
                f"the sharding= callable is called as f(name, shape) (a leaf's dotted Flax path and its shape), "
                f"and {getattr(spec, '__name__', type(spec).__name__)} cannot be: {e}"
            ) from None
        except ValueError:  # no signature to read (a builtin): called as it is
            pass
        return spec
    usage = "a callable (name, shape) -> Sharding or a pair (mesh, [(regex, PartitionSpec), ...])"
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise TypeError(f"sharding must be {usage}, got {type(spec).__name__}")
    if not isinstance(spec[0], jax.sharding.Mesh):
        swapped = " (the pair's order is (mesh, rules))" if isinstance(spec[1], jax.sharding.Mesh) else ""
        raise TypeError(
            f"sharding must be {usage}: its first element is a {type(spec[0]).__name__}, not a "
            f"jax.sharding.Mesh{swapped}"
        )
    if isinstance(spec[1], jax.sharding.PartitionSpec):
        raise TypeError(
            f"sharding=(mesh, {spec[1]}): give the rules as a list of (regex, PartitionSpec) pairs, such as "
            f"[(r'.*', {spec[1]})] for every leaf (a leaf of another rank needs its own rule)"
        )
    rules = tuple(spec[1].items()) if isinstance(spec[1], Mapping) else tuple(spec[1])  # {regex: spec} too
    for rule in rules:
        if not (
            isinstance(rule, (tuple, list))
            and len(rule) == 2
            and isinstance(rule[1], jax.sharding.PartitionSpec)
        ):
            raise TypeError(f"sharding rules are (regex, PartitionSpec) pairs, got {rule!r}")
        try:
            re.compile(rule[0])
        except (re.error, TypeError) as e:
            raise ValueError(f"sharding rule {rule[0]!r} is no regular expression: {e}") from e
        problem = spec_problem(rule[1], spec[0].axis_names)
        if problem:
            raise ValueError(f"sharding rule {rule[0]!r}: {problem}")
    return (spec[0], rules)
