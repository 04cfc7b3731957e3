"""Handing over, the pipeline's fourth stage: a decoded torch tensor (or a weight's stored pieces, kept
quantized) to a ``jax.Array`` on one JAX device. Placing shards over many devices is ``_sharding``'s.

On GPUs each result is copied once, on the device, into memory XLA allocated, with no host wait per
tensor (torch copies into arrays from ``_handoff.XlaDestinations``, into which the loader has a 4-bit
weight's kernel decode directly, and the loader waits once at the end;
XLA copies a shape whose allocation is still being compiled); a load's small unquantized tensors (norms,
biases) go from their host bytes to the GPU together, in one ``jax.device_put`` (:func:`put_from_host`). On
the CPU results alias torch's memory, except tensors that may still be a mapped torch file's memory, which are
copied before the load returns.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import torch

import jax_side
import torch_side
from jax_side._codes import dynamic_code
from jax_side._fp8 import OUT_DTYPES

from ._checkpoint import SMALL_TENSOR_BYTES, Checkpoint, Entry
from ._decode import bnb4_pieces, check_scales, materialize
from ._dtypes import TORCH_TO_JAX
from ._errors import CheckpointError
from ._handoff import _FILLABLE, XlaDestinations, jax_owned_copy, to_jax

# an unquantized tensor of at most this many stored bytes (read when asked for, not ahead), loaded onto a GPU
# as stored (no cast), goes there from its host bytes with the load's others (:func:`from_host`)
HOST_PUT_BYTES = SMALL_TENSOR_BYTES


def hand_over(t: torch.Tensor, jdev: jax.Device, into: XlaDestinations | None = None) -> jax.Array:
    """A loaded tensor as a ``jax.Array`` on ``jdev``: on GPUs copied into memory XLA allocated (a
    parameter in torch's memory breaks XLA's command-buffer updates, see :func:`qbridge.to_jax`): by torch
    into an array from ``into`` where it has one (valid once ``into.settle()`` returns), else by XLA; on the
    CPU aliased zero-copy, unless it is memory torch did not allocate, which may still be the checkpoint
    file's (a mapped torch file, or a tensor read from a safetensors file as it stands: an array over it
    would change, or fault, when the file does). ``t`` is ordered on the current stream."""
    if jdev.platform != "cpu":  # the loader's own tensor, written by nothing else: no host wait for the copy
        out = into.write(t, jdev) if into is not None else None
        return out if out is not None else jax_owned_copy(t, jdev, "current", wait=False)
    if not t.untyped_storage().resizable():  # the file may change after the load: copied by its return
        return jax_owned_copy(t, jdev, "current", wait=True)
    return to_jax(t, device=jdev, producer="current")


def from_host(entry: Entry, loaded: torch.dtype | None) -> bool:
    """Whether a GPU load reads ``entry`` (loaded as ``loaded``) with :func:`host_bytes` and puts it with the
    load's others by :func:`put_from_host`: an unquantized tensor of at most ``HOST_PUT_BYTES``, not cast, of
    a dtype that torch and XLA share bit for bit. By itself each took about 0.5 ms of the loading thread's
    wall time on an H100, 0.25 ms of its CPU (a read, a copy to the GPU, an allocation call of XLA's, the
    handover of its array to torch and torch's copy into it); a tiny DeepSeek-V3 layer's five (four norms,
    the router's bias), put together, 0.67 ms."""
    return (
        entry.kind == "dense"
        and 0 < entry.stored_bytes <= HOST_PUT_BYTES
        and loaded == entry.dtype
        and entry.dtype in _FILLABLE
    )


def host_bytes(ckpt: Checkpoint, entry: Entry, rule: jax_side.LeafRule) -> np.ndarray:
    """A tensor that :func:`from_host` takes, read on the calling thread (counted as read) and laid out for
    Flax by ``rule``, as a numpy array over memory of its own (a mapped torch file's tensor is copied), for
    :func:`put_from_host`.

    Raises:
        CheckpointError: its bytes cannot be read (naming the tensor).
    """
    t = materialize(ckpt, entry, torch.device("cpu"), rule)
    if not t.untyped_storage().resizable():  # memory torch did not allocate: perhaps a mapped file's
        t = t.clone()
    # a numpy view of its bytes (bfloat16 too: JAX's numpy dtype for it)
    return t.reshape(-1).view(torch.uint8).numpy().view(TORCH_TO_JAX[t.dtype]).reshape(t.shape)


def put_from_host(hosts: list[np.ndarray], jdev: jax.Device) -> list[jax.Array]:
    """The arrays on ``jdev`` of a load's :func:`host_bytes`, copied by one ``jax.device_put``, without a host
    wait: XLA's own arrays, each the stored bytes bit for bit. JAX holds each host array until its copy is
    made (nothing else writes them)."""
    return list(jax.device_put(hosts, jdev))


def keeps_quantized(entry: Entry, rule: jax_side.LeafRule) -> bool:
    """Whether a weight can stay quantized in JAX: a 4-bit or FP8 Linear kernel or 2-D embedding table."""
    if entry.kind not in ("bnb4", "fp8") or len(entry.shape) != 2 or rule.flip:
        return False
    perm = jax_side.permutation(rule, 2)  # the quantized layers use [out, in] as the kernel's transpose
    return (rule.flax_name == "kernel" and perm == (1, 0)) or (rule.flax_name == "embedding" and perm is None)


_DYNAMIC_BITS = torch.from_numpy(dynamic_code()).view(torch.int32)


def held_table(table: torch.Tensor) -> torch.Tensor | None:
    """A nested absmax's table as a kept weight holds it: None where it is bitsandbytes' standard one bit for
    bit (``jax_side.NF4Weight.nested_code``: one array fewer to hand over on every jitted call), else
    ``table``. A table not in host memory is kept as it is (comparing it would wait for its device)."""
    if table.device.type == "cpu" and table.dtype == torch.float32 and table.numel() == _DYNAMIC_BITS.numel():
        if torch.equal(table.reshape(-1).view(torch.int32), _DYNAMIC_BITS):
            return None
    return table


def check_pieces(
    ckpt: Checkpoint, entry: Entry, packed: torch.Tensor, pieces: dict[str, torch.Tensor]
) -> None:
    """The dense load's checks of a 4-bit weight's pieces (torch_side's: dtypes, sizes, the nested table),
    made on the checkpoint's tensors before a kept weight's pieces are handed over: a bad piece is refused at
    load time, with the dense load's message, not when the weight is first used, and a float64 table is not
    rounded to float32 on its way into JAX.

    Raises:
        CheckpointError: naming the weight and what is wrong."""
    doc = entry.info["quant_state"]
    nested = "nested_absmax" in pieces
    try:
        torch_side._nf4._check_pieces(
            torch_side._nf4._packed_bytes(packed, tuple(entry.shape)), pieces["absmax"], shape=tuple(entry.shape),
            blocksize=int(doc["blocksize"]), code=None, nested_absmax=pieces.get("nested_absmax"),
            nested_code=pieces.get("nested_quant_map"), nested_blocksize=int(doc.get("nested_blocksize", 256)),
            offset=float(doc.get("nested_offset", 0.0)) if nested else None, quant_type=entry.info["quant_type"],
            dtype=entry.dtype,
        )  # fmt: skip
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.where(entry.name)}: {e}") from e


def quantized_leaf(ckpt: Checkpoint, entry: Entry, jdev: jax.Device, dtype: Any) -> Any:
    """The stored pieces of a 4-bit or FP8 weight on ``jdev`` (see :func:`hand_over`), as a
    :class:`jax_side.NF4Weight` / :class:`jax_side.FP8Weight` (torch layout; dequantizing to ``dtype``, or
    the checkpoint's dtype when None, through a rounding to the checkpoint's dtype: its ``decode_dtype``)."""
    # what the checkpoint decodes to (bitsandbytes' quant_state.dtype)
    stored = str(entry.dtype).replace("torch.", "")
    name = np.dtype(dtype).name if dtype is not None else stored
    if np.dtype(name) not in OUT_DTYPES:  # what a kept weight may decode to
        raise ValueError(
            f"{entry.name}: keep_quantized decodes to float16, bfloat16 or float32, and this leaf is "
            f"to be {name} (the target's dtype or dtype=); load it without keep_quantized, or into one of those"
        )
    if np.dtype(stored) not in OUT_DTYPES:
        raise ValueError(
            f"{entry.name}: the checkpoint decodes this weight to {stored}, and a kept weight decodes through "
            "float16, bfloat16 or float32 only; load it without keep_quantized"
        )
    # rounded to the checkpoint's dtype first, then cast to the model's, as the dense load does
    decode_dtype = stored if stored != name else None

    def put(t: torch.Tensor) -> jax.Array:  # from host memory straight into XLA's (or aliased on the CPU)
        return hand_over(t.contiguous(), jdev)

    if entry.kind == "fp8":
        scale = ckpt.read(entry.keys["scale"])
        check_scales(ckpt, entry.keys["scale"], scale)
        layout = entry.info["layout"]
        return jax_side.FP8Weight(put(ckpt.read(entry.keys["weight"])), put(scale.float().reshape(layout.grid)),
                                  block=tuple(layout.block), dtype=name, decode_dtype=decode_dtype)  # fmt: skip
    doc = entry.info["quant_state"]
    pieces = bnb4_pieces(ckpt, entry)
    packed = ckpt.read(entry.keys["weight"])
    check_pieces(ckpt, entry, packed, pieces)
    packed = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    nested = "nested_absmax" in pieces
    table = held_table(pieces["nested_quant_map"]) if nested else None
    return jax_side.NF4Weight(
        packed=put(packed[: (np.prod(entry.shape) + 1) // 2]), absmax=put(pieces["absmax"]),
        nested_absmax=put(pieces["nested_absmax"]) if nested else None,
        nested_code=put(table) if table is not None else None,
        offset=put(torch.tensor(float(doc.get("nested_offset", 0.0)), dtype=torch.float32)) if nested else None,
        shape=tuple(entry.shape), blocksize=int(doc["blocksize"]), nested_blocksize=int(doc.get("nested_blocksize", 256)),
        quant_type=entry.info["quant_type"], dtype=name, decode_dtype=decode_dtype,
    )  # fmt: skip
