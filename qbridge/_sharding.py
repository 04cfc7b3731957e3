"""Sharded loading: every addressable device reads and dequantizes only its own slice of each weight.

A shard is produced from the checkpoint directly: the slice's rows and columns are read from the file
(safetensors reads only those), the quantized pieces covering them are moved to the shard's device and
dequantized there, and the exact slice is cut out on that device. Quantization blocks that straddle a
shard boundary are dequantized whole and then cut (FP8 tiles; bitsandbytes' flat 4-bit blocks, which
run across rows). The shards become one global array with ``jax.make_array_from_single_device_arrays``
without any further copy. Only addressable devices are served, so each process of a multi-host job
produces just its own shards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import torch

import jax_side
import torch_side

from ._checkpoint import Checkpoint, Entry
from ._loader import _bnb4_pieces, check_scales, materialize

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
        return spec(name, shape)
    mesh, rules = spec
    for pattern, partition in rules:
        if re.search(pattern, name):
            return jax.sharding.NamedSharding(mesh, partition)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _torch_device(device: jax.Device) -> torch.device:
    return torch.device("cuda", device.local_hardware_id) if device.platform == "gpu" else torch.device("cpu")


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    return [s.indices(n)[:2] for s, n in zip(index, shape)]


def _fp8_slice(
    ckpt: Checkpoint, entry: Entry, rows: tuple[int, int], cols: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """The torch-layout slice of an FP8 weight: dequantize the scale tiles that cover it, then cut."""
    layout = entry.info["layout"]
    (r0, r1), (c0, c1) = rows, cols
    height, width = entry.shape
    scale = ckpt.read(entry.keys["scale"])
    check_scales(ckpt, entry.keys["scale"], scale)
    if layout.kind == "tensor":
        w = ckpt.read_slice(entry.keys["weight"], (slice(r0, r1), slice(c0, c1)))
        return torch_side.dequantize_fp8(w.to(device), scale.to(device), entry.dtype)
    bo, bi = layout.block
    R0, R1 = r0 // bo * bo, min(-(-r1 // bo) * bo, height)
    C0, C1 = c0 // bi * bi, min(-(-c1 // bi) * bi, width)
    w = ckpt.read_slice(entry.keys["weight"], (slice(R0, R1), slice(C0, C1))).to(device)
    s = scale.reshape(layout.grid)[R0 // bo : -(-R1 // bo), C0 // bi : -(-C1 // bi)].contiguous().to(device)
    dense = torch_side.dequantize_fp8(w, s, entry.dtype, block_size=(bo, bi))
    return dense[r0 - R0 : r1 - R0, c0 - C0 : c1 - C0]


def _bnb4_slice(
    ckpt: Checkpoint, entry: Entry, bounds: list[tuple[int, int]], device: torch.device, budget: int
) -> torch.Tensor:
    """The torch-layout slice of a 1-D or 2-D bitsandbytes 4-bit weight. Its blocks run over the flat
    row-major weight, so rows are decoded in chunks (whole blocks, about ``budget`` elements) and cut."""
    doc = entry.info["quant_state"]
    blocksize = int(doc["blocksize"])
    n = math.prod(entry.shape)
    width = entry.shape[1] if len(entry.shape) == 2 else 1  # a 1-D weight: one element per "row"
    rows, cols = bounds[0], (bounds[1] if len(entry.shape) == 2 else (0, 1))
    pieces = _bnb4_pieces(ckpt, entry)
    absmax = pieces["absmax"].to(device)
    if "nested_absmax" in pieces:  # decoded once, exactly as bitsandbytes does, then sliced per chunk
        absmax = torch_side.decode_nested_absmax_reference(
            absmax, pieces["nested_absmax"].to(device), pieces["nested_quant_map"].to(device),
            int(doc.get("nested_blocksize", 256)), float(doc.get("nested_offset", 0.0)),
        )  # fmt: skip
    code = pieces.get("code")
    out = torch.empty((rows[1] - rows[0], cols[1] - cols[0]), dtype=entry.dtype, device=device)
    step = max(1, budget // width)
    for a in range(rows[0], rows[1], step):
        b = min(a + step, rows[1])
        blk0, blk1 = a * width // blocksize, -(-(b * width) // blocksize)
        n_seg = min(blk1 * blocksize, n) - blk0 * blocksize
        byte0 = blk0 * blocksize // 2  # blocks hold an even number of elements: byte-aligned
        packed = ckpt.read_slice(entry.keys["weight"], (slice(byte0, byte0 + (n_seg + 1) // 2),)).to(device)
        seg = torch_side.dequantize_nf4(
            packed, absmax[blk0:blk1].contiguous(), shape=(n_seg,), blocksize=blocksize,
            quant_type=entry.info["quant_type"], dtype=entry.dtype, code=None if code is None else code.to(device),
        )  # fmt: skip
        start = a * width - blk0 * blocksize
        out[a - rows[0] : b - rows[0]] = seg[start : start + (b - a) * width].view(b - a, width)[
            :, cols[0] : cols[1]
        ]
    return out if len(entry.shape) == 2 else out.reshape(-1)


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
    # bitsandbytes 8-bit, torchao, higher ranks: the whole weight on the device, then the slice
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
) -> jax.Array:
    """One global ``jax.Array`` with ``sharding``, each addressable shard made on its own device."""
    from ._loader import hand_over

    shape = jax_side.flax_shape(rule, entry.shape)
    try:
        indices = sharding.addressable_devices_indices_map(shape)
    except Exception as e:
        raise ValueError(f"{entry.name}: sharding {sharding} does not fit the Flax shape {shape}: {e}") from e
    arrays = []
    for device, index in indices.items():
        shard = cast(load_shard(ckpt, entry, rule, index, _torch_device(device)))
        arrays.append(hand_over(shard, device, ckpt))
        del shard
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def check_spec(spec: Any) -> None:
    if spec is None or callable(spec):
        return
    if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], jax.sharding.Mesh)):
        raise TypeError(
            "sharding must be a callable (name, shape) -> Sharding or a pair (mesh, [(regex, PartitionSpec), ...]), "
            f"got {type(spec).__name__}"
        )
    for rule in spec[1]:
        if not (
            isinstance(rule, (tuple, list))
            and len(rule) == 2
            and isinstance(rule[1], jax.sharding.PartitionSpec)
        ):
            raise TypeError(f"sharding rules are (regex, PartitionSpec) pairs, got {rule!r}")
