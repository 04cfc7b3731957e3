"""Decoding, the pipeline's third stage: a checkpoint weight's stored pieces (read by ``_checkpoint``) to a
dense torch tensor on a torch device, in the Flax layout.

Runs on the calling thread; on CUDA devices its work is queued on the device's current stream, and the
only host waits are the checks of scales on the CPU (NaN/Inf is a damaged checkpoint). It holds one
weight's pieces and its result at a time: the caller drops them before the next weight.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

import jax_side
import torch_side

from ._checkpoint import Checkpoint, Entry, scale_error
from ._errors import CheckpointError, first_line

_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _checkable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or float8 scales (e8m0) widened to float32: exact, and where isfinite is defined."""
    return t if t.dtype in (torch.bfloat16, *_NUMPY_FLOATS) else t.float()


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of a floating tensor is finite (no NaN, no Inf)."""
    if t.dtype in _NUMPY_FLOATS and t.device.type == "cpu" and not t.is_neg():
        # numpy: a few microseconds, where torch's two CPU ops took 30-40 on the GPU host; detach: a torch
        # file may hold its scales as Parameters
        return bool(np.isfinite(t.detach().numpy()).all())
    return bool(torch.isfinite(_checkable(t)).all())


def check_scales(
    ckpt: Checkpoint, key: str, t: torch.Tensor, what: str = "scale(s)", *, infinite_ok: bool = False
) -> None:
    """Raises CheckpointError naming ``key`` where the floating tensor ``t`` holds NaN or Inf: ``"{count}
    {what} are NaN or Inf"``; with ``infinite_ok``, where it holds NaN: ``"{count} {what} are NaN"``."""
    if not t.is_floating_point() or not t.numel():
        return
    if infinite_ok:
        bad, said = int(torch.isnan(_checkable(t)).sum()), "NaN"
    else:
        bad, said = (0 if all_finite(t) else int((~torch.isfinite(_checkable(t))).sum())), "NaN or Inf"
    if bad:
        raise CheckpointError(f"{ckpt.where(key)}: {bad} {what} are {said}: the checkpoint is damaged there")


def bnb4_pieces(
    ckpt: Checkpoint,
    entry: Entry,
    absmax_range: tuple[int, int] | None = None,
    *,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """A 4-bit weight's scales and the nested absmax's table, checked: on the CPU, or on ``device``, copied
    without the host waiting (each checked in host memory first: the absmax in the pinned memory it was
    read ahead into, where it was). The 16-entry ``quant_map`` is checked but not returned: bitsandbytes'
    ``dequantize_4bit`` never reads it (its kernels take the table of ``quant_type``), so the weight is
    decoded with that table; one that differs is warned about.

    ``absmax_range`` ``(a0, a1)`` reads only absmax blocks ``a0:a1`` (``a0`` a multiple of the nested block
    size when nested) and the nested absmax values that cover them."""
    sliced: dict[str, tuple[slice, ...]] = {}
    if absmax_range is not None:
        a0, a1 = absmax_range
        sliced["absmax"] = (slice(a0, a1),)
        if "nested_absmax" in entry.keys:
            nb = int(entry.info["quant_state"].get("nested_blocksize", 256))
            sliced["nested_absmax"] = (slice(a0 // nb, -(-a1 // nb)),)
    checked = functools.partial(check_scales, ckpt)  # scales and tables: finite
    pieces: dict[str, torch.Tensor] = {}
    for role in ("absmax", "nested_absmax", "quant_map", "nested_quant_map"):  # checked in this order
        key = entry.keys.get(role)
        if key is None:
            continue
        if role in sliced:
            pieces[role] = ckpt.read_slice(key, sliced[role])
        elif device is not None and role != "quant_map":  # quant_map is compared in host memory below
            pieces[role] = ckpt.read_to(key, device, check=checked)
            continue
        else:
            pieces[role] = ckpt.read(key)
        checked(key, pieces[role])
    offset = float(entry.info["quant_state"].get("nested_offset", 0.0))
    if abs(offset) > float(np.finfo(np.float32).max):
        raise CheckpointError(
            f"{ckpt.where(entry.keys['quant_state'])}: nested_offset {offset} does not fit float32"
        )
    code = pieces.pop("quant_map", None)
    standard = torch_side.standard_code(entry.info["quant_type"])
    # told once per weight (a sharded load reads it per slice); a table only stored in a narrower dtype
    # holds the standard values rounded, and is no news
    if code is not None and entry.keys["quant_map"] not in ckpt.warned:
        ckpt.warned.add(entry.keys["quant_map"])
        rounded = standard.to(code.dtype).float() if code.is_floating_point() else standard
        if not (code.shape == standard.shape and bool(torch.equal(code.float(), rounded))):
            warnings.warn(
                f"{ckpt.where(entry.keys['quant_map'])}: differs from bitsandbytes' {entry.info['quant_type']} "
                "table; bitsandbytes' dequantize_4bit decodes this weight with its own table for the quant "
                "type regardless (it does not read quant_map), and so does qbridge",
                stacklevel=2,
            )
    return pieces


def _bnb4(
    ckpt: Checkpoint, entry: Entry, device: torch.device, transpose: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    doc = entry.info["quant_state"]
    # copied without waiting: a small copy from pageable memory is staged at once; a blocking one would wait
    # for the device to finish the previous weights (torch synchronizes the stream after it)
    on = bnb4_pieces(ckpt, entry, device=device)
    nested = "nested_absmax" in on
    try:
        return torch_side.dequantize_nf4(
            ckpt.read_to(entry.keys["weight"], device), on["absmax"], shape=entry.shape, blocksize=int(doc["blocksize"]),
            quant_type=entry.info["quant_type"], dtype=entry.dtype,
            nested_absmax=on.get("nested_absmax"), nested_code=on.get("nested_quant_map"),
            nested_blocksize=int(doc.get("nested_blocksize", 256)), offset=float(doc.get("nested_offset", 0.0)) if nested else 0.0,
            transpose=transpose, out=out,
        )  # fmt: skip
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.where(entry.name)}: {e}") from e


def _fp8(ckpt: Checkpoint, entry: Entry, device: torch.device, transpose: bool) -> torch.Tensor:
    scale = ckpt.read(entry.keys["scale"])
    check_scales(ckpt, entry.keys["scale"], scale)
    w = ckpt.read_to(entry.keys["weight"], device)  # async from pinned read-ahead memory
    try:
        return torch_side.dequantize_fp8(
            w,
            scale.to(device, non_blocking=True),
            entry.dtype,
            block_size=entry.info["block_size"],
            transpose=transpose,
        )
    except (TypeError, ValueError) as e:
        raise scale_error(ckpt, entry.keys["scale"], e, scale.shape) from e


# bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING: the layouts an 8-bit weight's ``weight_format`` tag names
_BNB8_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}


def _check_bnb8_format(ckpt: Checkpoint, entry: Entry) -> None:
    """Raises CheckpointError unless the weight's ``weight_format`` tag, where it has one, says ``row`` (0): the
    only layout bitsandbytes itself loads (``maybe_rearrange_weight`` refuses the others), and the one the
    decode reads."""
    key = f"{entry.keys['weight'].rpartition('.')[0]}.weight_format"
    if key not in ckpt.source.shapes:
        return
    tag = ckpt.read(key)
    integral = not (tag.dtype.is_floating_point or tag.dtype.is_complex)  # a bool too: 0/1, as bitsandbytes
    if tag.numel() != 1 or not integral:
        raise CheckpointError(
            f"{ckpt.where(key)}: a bitsandbytes 8-bit weight-layout tag must be one integer, got "
            f"{tag.dtype} of shape {list(tag.shape)} (the checkpoint is damaged)"
        )
    value = int(tag.item())
    if value != 0:
        name = _BNB8_FORMATS.get(value)
        raise CheckpointError(
            f"{ckpt.where(key)}: {entry.name} is stored in bitsandbytes' "
            + (f"{name!r} layout ({value})" if name else f"unknown layout {value}")
            + ", not 'row' (0): only row-layout 8-bit weights can be decoded (bitsandbytes itself loads no "
            "other); save the model again with a current bitsandbytes, which writes 'row'"
        )


def _bnb8(ckpt: Checkpoint, entry: Entry, device: torch.device) -> torch.Tensor:
    _check_bnb8_format(ckpt, entry)
    scb = ckpt.read(entry.keys["scb"])
    check_scales(ckpt, entry.keys["scb"], scb)
    w = ckpt.read_to(entry.keys["weight"], device)
    if scb.numel() != w.shape[0]:
        raise CheckpointError(
            f"{ckpt.where(entry.keys['scb'])}: {scb.numel()} row scales for {w.shape[0]} rows"
        )
    return torch_side.dequantize_int8(
        w, scb.to(device, non_blocking=True), dtype=entry.dtype
    )  # bitsandbytes' order of operations


def torchao_weight(ckpt: Checkpoint, entry: Entry, *, mapped: bool = False) -> torch.Tensor:
    """A torchao weight as its tensor subclass, on the CPU. ``mapped``: over the file's memory, read (and
    counted) only where it is used (see ``Checkpoint.source.map_tensor``)."""
    read = ckpt.source.map_tensor if mapped else ckpt.read
    if "qdata" in entry.keys or "file" in entry.info:  # torchao's safetensors layout
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        pieces = {key: read(key) for key in entry.keys.values()}
        try:
            rebuilt, _ = unflatten_tensor_state_dict(pieces, entry.info["metadata"])
        except Exception as e:  # metadata torchao cannot use (damaged, or of another torchao version)
            raise CheckpointError(
                f"{entry.info['file']}: torchao could not rebuild {entry.name!r} from the file's torchao "
                f"metadata ({type(e).__name__}: {first_line(e)})"
            ) from e
        if entry.name not in rebuilt:
            raise CheckpointError(f"{entry.info['file']}: torchao could not rebuild {entry.name!r}")
        return rebuilt[entry.name]
    return read(entry.name)


def _inner_tensors(t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A tensor subclass's inner tensors (``__tensor_flatten__``: torchao's qdata, scale, zero_point ...),
    those of nested subclasses included, as ``(dotted name, tensor)``."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not callable(flatten):
        return []
    found: list[tuple[str, torch.Tensor]] = []
    for name in flatten()[0]:
        inner = getattr(t, name, None)
        if isinstance(inner, torch.Tensor):
            nested = _inner_tensors(inner)
            found += [(f"{name}.{sub}", x) for sub, x in nested] if nested else [(name, inner)]
    return found


def check_torchao_scales(ckpt: Checkpoint, entry: Entry, weight: torch.Tensor) -> None:
    """Raises CheckpointError where a torchao weight's floating scales or zero points (inner tensors named
    ``scale``, ``zero_point``, ``_scale_e8m0``, ``per_tensor_scale`` ...) hold NaN or Inf, or its other
    floating inner tensors hold NaN: as a bitsandbytes absmax or an FP8 ``scale_inv`` is checked, a damaged
    checkpoint is refused. Those others may be infinite: an NF4Tensor's ``quantization_factor`` is where a
    block's absmaxes are all equal (an all-zero or ternary weight), and it decodes exactly."""
    kind = type(weight).__name__
    for name, inner in _inner_tensors(weight):
        leaf = name.rpartition(".")[2]
        scale = "scale" in leaf or leaf == "zero_point"
        check_scales(
            ckpt, entry.name, inner, f"value(s) of its torchao {kind}'s {name}", infinite_ok=not scale
        )


def _torchao(ckpt: Checkpoint, entry: Entry, device: torch.device) -> torch.Tensor:
    weight = torchao_weight(ckpt, entry)
    check_torchao_scales(ckpt, entry, weight)
    try:
        dense = torch_side.dequantize_weight(weight.to(device))
    except NotImplementedError as e:  # torchao's own dequantize failed, or no decode of this subclass
        raise CheckpointError(f"{ckpt.where(entry.name)}: {e}") from e
    if tuple(dense.shape) != entry.shape:
        raise CheckpointError(
            f"{ckpt.where(entry.name)}: rebuilt shape {tuple(dense.shape)}, expected {entry.shape}"
        )
    return dense


def written_by_kernel(entry: Entry, rule: jax_side.LeafRule) -> tuple[int, ...] | None:
    """The shape :func:`materialize` gives a 4-bit weight that its kernel writes in the Flax layout itself
    (as stored, or transposed in the same pass: no permutation or flip after it), so that it can write it
    into ``out=``; None for any other weight."""
    if entry.kind != "bnb4" or rule.flip:
        return None
    perm = jax_side.permutation(rule, len(entry.shape))
    if perm is None:
        return tuple(entry.shape)
    return (entry.shape[1], entry.shape[0]) if perm == (1, 0) else None


def materialize(
    ckpt: Checkpoint,
    entry: Entry,
    device: torch.device,
    rule: jax_side.LeafRule,
    *,
    stored: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One checkpoint weight, dequantized on ``device`` and laid out for Flax by ``rule``, contiguous.

    ``rule`` applies to the logical layout (``entry.shape``): a plain transformers ``Conv1D`` weight, stored
    ``[in, out]``, is read as ``[out, in]`` first, unless ``stored`` asks for the layout as stored. ``out``: a
    contiguous tensor of the weight's dtype on ``device``, of the shape :func:`written_by_kernel` gives (only
    for such a weight), which the kernel writes and which is returned."""
    perm = jax_side.permutation(rule, len(entry.shape))
    fused_t = perm == (1, 0) and entry.kind in ("bnb4", "fp8")  # the kernels write the transpose in one pass
    if out is not None:
        shape = written_by_kernel(entry, rule)
        if shape is None:
            raise ValueError(
                f"materialize(out=) writes 4-bit weights that need no copy after decoding, not {entry.name}"
            )
        elsewhere = out.device.type != device.type or device.index not in (None, out.device.index)
        if tuple(out.shape) != shape or out.dtype != entry.dtype or elsewhere or not out.is_contiguous():
            raise ValueError(
                f"materialize(out=) for {entry.name} takes a contiguous {shape} {entry.dtype} tensor on {device}, "
                f"got {'a' if out.is_contiguous() else 'a non-contiguous'} {tuple(out.shape)} {out.dtype} on {out.device}"
            )
    if entry.kind == "bnb4":
        t = _bnb4(ckpt, entry, device, fused_t, out)
    elif entry.kind == "fp8":
        t = _fp8(ckpt, entry, device, fused_t)
    elif entry.kind == "bnb8":
        t = _bnb8(ckpt, entry, device)
    elif entry.kind == "torchao":
        t = _torchao(ckpt, entry, device)
    else:
        t = ckpt.read_to(entry.name, device)
        if entry.info.get("stored_in_out") and not stored:
            t = t.t()
    if perm is not None and not fused_t:
        t = t.permute(perm)
    if rule.flip and perm is not None:
        t = t.flip(rule.flip)
    return t.contiguous()
