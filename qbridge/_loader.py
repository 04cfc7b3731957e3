"""``load_checkpoint``: a quantized PyTorch checkpoint into Flax parameters, one tensor at a time.

This module orchestrates; each stage of the pipeline has its own home, and only this module knows their
order:

1. reading stored pieces: ``_checkpoint`` (headers, classification, byte ranges);
2. matching to a target and planning: ``jax_side`` (``plan_load`` here calls it);
3. decoding, on the device the result is for: ``_decode`` (the quantized bytes move to the device, and
   ``torch_side`` writes the dense result directly in the Flax layout);
4. handing over to JAX on one device: ``_place``; placing shards over many devices: ``_sharding``;
   on a GPU, FP8 weights of one kind are decoded and handed over together: ``_group``.

Every temporary is dropped before the next weight, so that peak device memory stays near the size of
the result plus one tensor; on a GPU, plus one group of FP8 weights' quantized bytes (``_group``: at most
half of ``READ_AHEAD_BYTES``, or one weight, and the weights waiting for their groups hold at most
``READ_AHEAD_BYTES`` of host memory).
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import PartitionSpec as P

import jax_side
from jax_side._target import warn_misfit
from jax_side._tree import kind_override, warn_at_caller, warn_unmatched

from . import _gc, _staging
from ._checkpoint import Checkpoint, Entry, open_checkpoint
from ._classify import architecture_uses_conv1d
from ._decode import materialize, written_by_kernel
from ._devices import resolve_device
from ._dtypes import TORCH_TO_JAX, torch_dtype
from ._errors import CheckpointError
from ._group import FP8Groups, _weights_stacked
from ._place import (
    XlaDestinations,
    from_host,
    hand_over,
    host_bytes,
    keeps_quantized,
    put_from_host,
    quantized_leaf,
)
from ._sharding import check_spec, fits, load_sharded_leaf, matching_rule, sharding_for

log = logging.getLogger("qbridge")

READ_AHEAD_BYTES = 1 << 30  # pinned host memory holding the upcoming weights' bytes during a GPU load


class _ReadAhead:
    """Keeps the stored bytes of the next weights being read (``Checkpoint.read_ahead``: background
    threads; pinned host memory for a GPU load, so that host-to-device copies run asynchronously) while
    the current one is copied, decoded and handed over, at most ``READ_AHEAD_BYTES`` at a time (one weight
    more when a single weight is larger)."""

    def __init__(self, ckpt: Checkpoint, keys: Sequence[Sequence[str]], *, pin: bool) -> None:
        self.ckpt, self.keys, self.pin = ckpt, keys, pin
        self.next = 0
        self.inflight: collections.deque[tuple[int, int]] = collections.deque()  # (plan index, bytes)
        self.bytes = 0

    def advance(self, i: int) -> None:
        """Called before weight ``i`` is loaded: the weights before it are done."""
        while self.inflight and self.inflight[0][0] < i:
            self.bytes -= self.inflight.popleft()[1]
        while self.next < len(self.keys) and (self.bytes < READ_AHEAD_BYTES or not self.inflight):
            n = sum(self.ckpt.read_ahead(key, pin=self.pin) for key in self.keys[self.next])
            if n:
                self.inflight.append((self.next, n))
                self.bytes += n
            self.next += 1


def _stored_keys(entry: Any) -> tuple[str, ...]:
    """The keys of the stored tensors holding a weight's bulk, read ahead: its packed or float8 bytes, and a
    4-bit weight's absmax (at a blocksize of 64, a 32nd of the packed bytes when nested, an 8th when not)."""
    if entry.kind in ("bnb4", "fp8", "bnb8"):
        return tuple(entry.keys[role] for role in ("weight", "absmax") if role in entry.keys)
    if entry.kind == "torchao":
        return ()
    return (entry.name,)


def _small_pieces(entry: Any) -> tuple[str, ...]:
    """The keys of a 4-bit weight's scales and tables (``Checkpoint.stage_small`` keeps those that are
    small): read and copied to a GPU in one pass for a whole load, where one read and one copy each cost
    most of the loading loop's host work per weight (``benchmarks/RESULTS.md``)."""
    if entry.kind != "bnb4":
        return ()
    return tuple(
        entry.keys[r] for r in ("absmax", "nested_absmax", "quant_map", "nested_quant_map") if r in entry.keys
    )


@dataclasses.dataclass
class LoadReport:
    """What :func:`load_checkpoint` read and where it put it.

    Attributes:
        format: the checkpoint format (``bitsandbytes-4bit``, ``fp8``, ``torchao``, ``safetensors`` ...).
        leaves: number of parameters produced.
        skipped: checkpoint tensors left out as no parameters (tied copies, buffers, activation scales).
        skip_reasons: ``key -> why`` for each skipped tensor.
        match: the target-matching report (None without a target).
        stored_bytes: bytes the checkpoint stores for the loaded leaves (all their pieces).
        dense_bytes: bytes of the result (whole arrays; a sharded array counts once).
        seconds: wall time of the load.
        device: where the result lives: one device (``cuda:0``, ``cpu:0``), or with ``sharding=`` the devices
            its arrays span (``8 devices: cuda:0-7``).
        guessed: parameters whose module kind came from name rules, not from the torch model (with a
            target: only those where that kind decided the layout; the target's nnx module types and
            ``kinds`` decide first).
        classified_by: where the module kinds came from, in words (with a target: how many leaves the
            target's module types laid out).
        read_bytes: tensor bytes this process read from the checkpoint's files (headers aside). A load in one
            process, sharded or not, reads every stored byte of its leaves once; under ``jax.distributed`` a
            process reads the byte ranges of its own shards, about its share (the README's *Several
            processes* says what is read).
    """

    format: str
    leaves: int
    skipped: list[str]
    match: jax_side.MatchReport | None
    stored_bytes: int
    dense_bytes: int
    seconds: float
    device: str
    skip_reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    guessed: list[str] = dataclasses.field(default_factory=list)
    classified_by: str = ""
    read_bytes: int = 0

    def __str__(self) -> str:
        return (
            f"{self.format}: {self.leaves} leaves, {self.read_bytes / 1e6:.1f} MB read -> "
            f"{self.dense_bytes / 1e6:.1f} MB on {self.device} in {self.seconds:.2f} s"
            + (
                f"; skipped {', '.join(f'{k} ({self.skip_reasons[k]})' if k in self.skip_reasons else k for k in self.skipped)}"
                if self.skipped
                else ""
            )
            + "".join(f"; {line}" for line in (self.match.cast_summary() if self.match else []))
        )


def _where(values: Mapping[Any, Any], jdev: Any) -> str:
    """The devices a sharded load's arrays span, in words: ``cuda:0`` alone, or ``8 devices: cuda:0-7``."""
    devices: set[Any] = set()
    for leaf in jax.tree.leaves(list(values.values())):  # a kept leaf is a tree of arrays
        devices.update(leaf.sharding.device_set if isinstance(leaf, jax.Array) else (jdev,))
    if len(devices) <= 1:
        return str(next(iter(devices), jdev))
    kinds: dict[str, list[int]] = {}  # platform as devices print it (cuda, cpu) -> ids
    for d in devices:
        kinds.setdefault(str(d).rpartition(":")[0] or d.platform, []).append(d.id)
    spans = []
    for kind, ids in sorted(kinds.items()):
        ids.sort()
        whole = ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 1
        spans.append(f"{kind}:{ids[0]}-{ids[-1]}" if whole else f"{kind}:" + ",".join(map(str, ids)))
    return f"{len(devices)} devices: {', '.join(spans)}"


def _torch_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch_dtype(dtype)


def _loaded_dtype(entry: Entry, cast: Any) -> torch.dtype | None:
    """The torch dtype of ``entry`` as loaded: the leaf's dtype ``cast`` for floating weights (see
    :func:`_convert`), else its own."""
    return _torch_dtype(cast) if cast is not None and entry.dtype.is_floating_point else entry.dtype


def _convert(t: torch.Tensor, cast: Any) -> torch.Tensor:
    """A loaded tensor cast to the leaf's dtype ``cast`` (None: kept), floating tensors only."""
    return t.to(_torch_dtype(cast)) if cast is not None and t.is_floating_point() else t


def plan_load(
    ckpt: Checkpoint,
    target: Any,
    *,
    dtype: Any = None,
    kinds: Mapping[str, str] | None = None,
    rename: Mapping[str, str] | None = None,
    strict: bool = True,
) -> tuple[Any, list[jax_side.PlannedLeaf], jax_side.MatchReport | None, dict[str, str]]:
    """Where every tensor of ``ckpt`` goes: ``(target, plan, match report, {skipped key: reason})``.

    The torch model is asked about its modules (``Checkpoint.classify``) when it can change the answer:
    without a target (layouts by module type), for architectures with transformers ``Conv1D`` modules
    (their stored order), and, with a target, when tensors remain that no leaf takes (tied copies and
    caches the name rules do not know).
    """
    ask = target is None or architecture_uses_conv1d(ckpt.config)
    if target is None or strict:  # every tensor is to be loaded, or used by the target
        ckpt.refuse_unreadable()
    elif ckpt.source.unreadable:
        warn_at_caller(
            f"{len(ckpt.source.unreadable)} tensor(s) of the checkpoint cannot be read and are left out: "
            + "; ".join(ckpt.source.unreadable.values())
        )
    while True:
        classes = ckpt.classify(ask_model=ask)
        shapes = {name: (e.shape, TORCH_TO_JAX.get(e.dtype, e.dtype)) for name, e in ckpt.entries.items()}
        if target is None:
            unfit = ckpt.config_mismatches()
            if unfit is not None:
                text = (
                    f"{ckpt.path}: the checkpoint does not fit its config.json's model "
                    f"({classes.source}): {unfit.summary()}:\n  {unfit.describe()}"
                )
                if strict:
                    stale = (
                        " If transformers' modeling code changed since the model's record was remembered (a "
                        "development install of the same version), delete that record."
                        if "remembered" in classes.source
                        else ""
                    )
                    sizes = " (a quantized weight's size is its quant state's shape)" if unfit.shapes else ""
                    counts = (
                        " Where config.json counts fewer layers or experts (num_hidden_layers ...) than the files "
                        "hold, correct it: a model built from it has no place for the others."
                        if unfit.unexpected
                        else ""
                    )
                    raise CheckpointError(
                        f"{text}\nThe files and config.json may belong to different models, or the files are "
                        f"incomplete or damaged{sizes}.{counts} Pass strict=False to load what the checkpoint "
                        f"holds, with a warning.{stale}"
                    )
                warn_at_caller(text)
            plan, skipped = jax_side.plan_by_name(
                shapes, kinds=kinds, rename=rename, torch_kinds=classes.kinds, optional=classes.optional
            )
            return None, plan, None, skipped
        try:
            t, plan, match = jax_side.plan_for_target(shapes, target, dtype=dtype, kinds=kinds, rename=rename, strict=strict,
                                                      torch_kinds=classes.kinds, optional=classes.optional)  # fmt: skip
        except jax_side.MatchError as e:
            if ask or not (e.report.unused or e.report.shape_mismatches):
                notes = []
                stray = [key for key in e.report.unused if key in ckpt.source.unlisted]
                if stray:  # loaded because a listed file holds them: say where they came from
                    notes.append(
                        f"({len(stray)} of the unused tensors, such as {stray[0]!r} in "
                        f"{ckpt.source.unlisted[stray[0]].name}, are not listed in the checkpoint's index: a file "
                        "it names holds them beside the model's; remove them from that file, or pass strict=False)"
                    )
                notes += [  # an output layer the config ties, stored apart: a tied target has no leaf for it
                    f"({key!r} is kept as a parameter of its own: {classes.kept_tied[key]}; load it into a target "
                    "with an output layer of its own, e.g. jax_side's Llama built from "
                    "LlamaConfig.from_hf({**config_json, 'tie_word_embeddings': False}))"
                    for key in e.report.unused
                    if key in classes.kept_tied
                ]
                if notes:  # one error holding the notes, where the plain one was raised (no chained block)
                    noted = jax_side.MatchError(e.report, "\n  ".join([str(e), *notes]))
                    raise noted.with_traceback(e.__traceback__) from None
                raise
            ask = True  # let the model explain the leftovers, then match again
            continue
        if match.unused and not ask:
            ask = True
            continue
        warn_misfit(match)  # strict=False: said once, after the last match
        return t, plan, match, dict(match.skip_reasons)


def _guesses_that_decided(
    plan: Sequence[jax_side.PlannedLeaf],
    names: Sequence[str],
    guessed: set[str],
    kinds: Mapping[str, str] | None,
) -> list[str]:
    """With a target: the checkpoint keys whose layout a name rule's guess decided. A leaf whose Flax module
    type the target knows (nnx modules), or that a ``kinds`` pattern names, was laid out without one."""
    return [
        p.key
        for p, name in zip(plan, names)
        if p.key in guessed and p.leaf.module_type is None and kind_override(name, kinds) is None
    ]


def unmatched_words(names: Sequence[str]) -> str:
    """What a warning says of a sharding rule that matched none of the leaves ``names`` (dotted Flax paths)."""
    example = (
        repr(max(names, key=lambda n: n.count("."))) if names else "'model.layers.0.mlp.down_proj.kernel'"
    )
    return (
        f"matched no leaf; it placed nothing (rules search each leaf's dotted Flax path, such as {example}, "
        "not torch's keys)"
    )


def _replicated_here(sharding: Any) -> bool:
    """Whether ``sharding`` holds a whole copy on each of its devices, all of them this process's."""
    return bool(sharding.is_fully_replicated and sharding.is_fully_addressable)


def _replicated(sharding: Any) -> Any:
    """A fully replicated ``sharding`` as one that fits arrays of any rank (a kept weight's pieces are not of
    its leaf's rank: ``P(None, None)`` cannot place a 1-D array), over the same devices and memory."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, P(), memory_kind=sharding.memory_kind)
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    if len(devices) == 1:
        return jax.sharding.SingleDeviceSharding(devices[0], memory_kind=sharding.memory_kind)
    mesh = jax.sharding.Mesh(np.array(devices), ("replicas",))
    return jax.sharding.NamedSharding(mesh, P(), memory_kind=sharding.memory_kind)


_FLOAT32 = np.dtype(np.float32)


def _routes(
    ckpt: Checkpoint,
    plan: Sequence[Any],
    names: Sequence[str],
    dtype: Any,
    sharding: Any,
    keep_quantized: bool,
    groups: FP8Groups | None,
    into: XlaDestinations,
    jdev: jax.Device,
) -> list[tuple[Any, Any, Any]]:
    """Each planned leaf's ``(cast, sharding, route)``, decided before anything is read. The route: ``"kept"``
    (kept quantized), ``"sharded"``, an FP8 group's kind (decoded with its group), ``"host"`` (on a GPU, a
    small unquantized tensor put with the others from the host: :func:`~qbridge._place.from_host`), or None
    (by itself; on a GPU its array is expected by ``into``, so that one allocation call makes its shape's
    arrays).

    Raises:
        ValueError: a leaf kept quantized that is to be sharded (split over devices); a sharding that does not
            fit its leaf's shape.
    """
    routes: list[tuple[Any, Any, Any]] = []
    dense_anyway: dict[str, int] = {}  # with keep_quantized: quantized weights that load dense, by kind
    for p, name in zip(plan, names, strict=True):
        entry = ckpt.entries[p.key]
        kept = keep_quantized and keeps_quantized(entry, p.rule)
        if keep_quantized and entry.kind != "dense" and not kept:
            dense_anyway[entry.kind] = dense_anyway.get(entry.kind, 0) + 1
        cast = jax_side.leaf_dtype(p, dtype, TORCH_TO_JAX.get(entry.dtype, _FLOAT32))
        leaf_sharding = sharding_for(sharding, name, tuple(p.leaf.shape), p.leaf.sharding)
        route: Any = None
        if kept:
            if leaf_sharding is not None and not _replicated_here(leaf_sharding):
                if p.leaf.sharding is not None and len(p.leaf.sharding.device_set) > 1:
                    by = "the target's leaf is sharded over several devices"
                elif isinstance(sharding, tuple):
                    rule = matching_rule(sharding[1], name)  # one matched: a leaf none matches is replicated
                    by = f"by the sharding rule {rule[0] if rule else None!r}"
                else:
                    by = "by the sharding= callable"
                raise ValueError(
                    f"{name}: keep_quantized does not shard, and this leaf is to be sharded ({by}): load it dense "
                    "to shard it, or replicate it (P(), or no rule matching it) or place it on one device"
                )
            route = "kept"
        elif leaf_sharding is not None:
            route = "sharded"
            fits(leaf_sharding, name, tuple(p.leaf.shape))  # before anything is read
            # on GPUs (whatever device= is) each shard is copied into an array XLA allocated on its device
            if next(iter(leaf_sharding.device_set)).platform == "gpu":
                out = _loaded_dtype(entry, cast)
                if out is not None:
                    piece = leaf_sharding.shard_shape(tuple(p.leaf.shape))
                    for device in leaf_sharding.addressable_devices:
                        into.expect(piece, out, device, 1)
            # an FP8 weight that every device's shard is cut from: decoded with its group's
            if groups is not None and leaf_sharding.is_fully_addressable:
                route = groups.kind(entry, p.rule, cast, leaf_sharding) or route
                if route != "sharded":
                    groups.expect(route, entry)
        elif groups is not None:
            route = groups.kind(entry, p.rule, cast)
            if route is not None:
                groups.expect(route, entry)
            else:
                out = _loaded_dtype(entry, cast)
                if from_host(entry, out):
                    route = "host"  # put with the load's other small tensors, from their host bytes
                elif out is not None:
                    into.expect(tuple(p.leaf.shape), out, jdev, 1)
        routes.append((cast, leaf_sharding, route))
    if dense_anyway:
        kinds = ", ".join(f"{n} {_KIND_WORDS.get(k, k)}" for k, n in sorted(dense_anyway.items()))
        warn_at_caller(
            f"keep_quantized=True: {kinds} weight(s) of this checkpoint load dense: what stays quantized is "
            "bitsandbytes 4-bit and FP8 weights of Linear kernels and embedding tables"
        )
    return routes


def _grouped(jdev: jax.Device) -> bool:
    """Whether a load onto ``jdev`` decodes FP8 weights in groups (:mod:`qbridge._group`): on a GPU. On the
    CPU each is decoded by itself, with its own read."""
    return jdev.platform == "gpu"


def _placer(
    ckpt: Checkpoint, entry: Entry, rule: jax_side.LeafRule, sharding: Any, cast: Any, into: XlaDestinations
) -> Callable[[torch.Tensor], jax.Array]:
    """How a sharded leaf's FP8 group places it: its decoded weight (Flax layout, on one of ``sharding``'s
    devices) cut into its shards, as :func:`load_sharded_leaf` cuts a weight it decodes itself."""

    def place(whole: torch.Tensor) -> jax.Array:
        convert = functools.partial(_convert, cast=cast)
        return load_sharded_leaf(ckpt, entry, rule, sharding, convert, into=into, whole=whole)

    return place


_KIND_WORDS = {"bnb8": "bitsandbytes 8-bit", "torchao": "torchao", "bnb4": "4-bit (not a Linear kernel or embedding)",
               "fp8": "FP8 (not a Linear kernel or embedding)"}  # fmt: skip


def _progress(total: int, enabled: bool, desc: str) -> Any:
    """A progress bar on a terminal or in a notebook; None where nobody watches one (a log file, a pipe)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm  # tqdm.notebook's widget bar inside Jupyter, else a text bar

    notebook = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)
    if not notebook and not getattr(sys.stderr, "isatty", lambda: False)():
        return None  # not a notebook, stderr not a terminal: redrawn bars would only fill the log
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    target: Any = None,
    device: Any = None,
    dtype: Any = None,
    strict: bool = True,
    progress: bool = True,
    kinds: Mapping[str, str] | None = None,
    rename: Mapping[str, str] | None = None,
    sharding: Any = None,
    keep_quantized: bool = False,
    return_report: bool = False,
) -> Any:
    """Loads a (quantized) PyTorch checkpoint as Flax parameters on a JAX device, or sharded over many.

    While it runs (Python up to 3.13), Python's garbage collector collects its two older generations ten
    times less often: their ``gc.set_threshold`` values are raised, and the caller's come back when the last
    load running in any thread ends, an error included. At the tensor count of a model like DeepSeek-V3 those
    collections, each walking every object of the process, made a load measurably slower
    (``benchmarks/RESULTS.md``).

    Args:
        path: a checkpoint directory (``config.json`` + ``*.safetensors`` or ``model.safetensors.index.json``,
            or ``*.bin``/``*.pt``) or one file. Formats: bitsandbytes 4-bit (NF4/FP4, nested or not) and
            8-bit, HF fine-grained FP8, torchao tensor subclasses (``torch.save`` or torchao's safetensors
            layout), and plain tensors. Torch files are read with ``weights_only=True``.
        target: None, or a Flax target to match: a linen ``params``/variables dict (leaves may be
            ``jax.ShapeDtypeStruct``), an ``nnx.Module`` or an ``nnx.State``. Every target leaf is matched by
            path and checked before any weight is read. Without one, the module kinds come from the torch
            model built on the meta device when transformers knows the architecture; that answer is
            remembered in ``$QBRIDGE_CACHE_DIR`` (default ``~/.cache/qbridge``; ``off``: not remembered),
            so later processes loading the same model skip importing transformers.
        device: where the result lives: a ``jax.Device``, ``"cpu"``, ``"cuda[:i]"`` (or that ``torch.device``),
            or None (the current GPU when torch and JAX see it, else the CPU). Dequantization runs on the
            matching torch device.
        dtype: with a target, None (or ``"target"``) casts each floating leaf to its target leaf's dtype,
            as torch's ``load_state_dict`` and transformers' ``from_pretrained`` cast into the model's
            dtypes (every cast is listed in the report); ``"checkpoint"`` keeps the checkpoint's dtypes and
            makes a difference from the target a mismatch. Without a target, None keeps each weight's
            dtype. A dtype (JAX's, numpy's, torch's or its name) casts every floating leaf to it; float64
            only with JAX's x64 mode on. A quantized weight's own dtype is the one its producer decodes it
            to: a 4-bit weight's quant state dtype; an FP8 or 8-bit weight's ``config.json`` ``dtype`` (or
            ``torch_dtype``; bfloat16 when absent), as transformers decodes them. A cast comes after that
            decode (so an FP8 weight loaded as float32 is its bfloat16 decode widened, not
            ``float32(w) * scale``; give the config ``"dtype": "float32"`` for that).
        strict: with a target, raise :class:`jax_side.MatchError` listing every problem; with False, warn
            with that list and leave unfilled leaves as the target has them (a target leaf that holds only a shape,
            ``jax.ShapeDtypeStruct``, and that nothing fills raises instead: it would have no value).
            Without a target, where the torch model of ``config.json`` was built (see ``target``): raise
            :class:`CheckpointError` for checkpoint tensors of other sizes than the model's (a quantized
            weight's size: its quant state's shape) and, where every checkpoint parameter has one of the
            model's names, for parameters and saved buffers it lacks (what transformers lets a checkpoint
            lack, or converts as it loads, aside); with False, warn and load what the checkpoint holds.
            :func:`inspect_checkpoint` lists the same.
        progress: show a progress bar (bytes and tensors) on a terminal or in a notebook; none where
            stderr is a file or a pipe.
        kinds: regex -> torch module kind overrides (``{"up\\.\\d+$": "conv_transpose2d"}``).
        rename: regex -> replacement applied to checkpoint keys first, in order: before matching a target,
            or, without one, to name the Flax module paths (a tensor's own name, ``weight`` or ``bias``,
            keeps deciding its layout; the tensors are read under their own keys).
        sharding: shard the result over devices: a callable ``(name, shape) -> jax.sharding.Sharding``, where
            ``name`` is the leaf's dotted Flax path (``"model.layers.0.mlp.down_proj.kernel"``) and ``shape``
            its Flax shape (a None result: that leaf goes to ``device``), or a pair ``(mesh, rules)`` with
            ``rules`` a sequence of ``(regex, PartitionSpec)`` (or a ``{regex: PartitionSpec}`` dict) searched
            against the name, first match wins, unmatched leaves replicated (a rule that matches no leaf
            warns). A target's own multi-device shardings win. A process that holds all of a leaf's devices reads the weight once, ahead (as an
            unsharded load reads), decodes it on one of them (the leaves take turns) and copies each shard
            to its device from there; a process of a multi-process job reads and decodes on each of its
            devices only that device's slice.
        keep_quantized: leave bitsandbytes 4-bit and FP8 Linear kernels and embedding tables quantized: those
            leaves arrive as :class:`jax_side.NF4Weight` / :class:`jax_side.FP8Weight` (their stored pieces,
            zero-copy from torch), to be used by ``jax_side``'s quantized layers
            (:func:`jax_side.load_quantized_into_nnx`). Other leaves, and other formats, arrive dense. With
            ``sharding=``, a kept leaf may be replicated (a copy of its pieces on each device; a leaf no rule
            matches is), not split: a rule that splits one raises ``ValueError``.
        return_report: also return a :class:`LoadReport`.

    Returns:
        Without a target, Flax variables ``{"params": {...}}`` (plus ``"batch_stats"``), named by Flax
        conventions (``kernel``, ``scale``, ``embedding``). With a target, exactly the target's structure
        (a pure nested dict for nnx, ready for ``nnx.update``). ``(params, report)`` with ``return_report``.
        Arrays are new device memory, contiguous, in the Flax layout; on GPUs, memory that XLA allocated
        (the dequantized result is written there once, on the GPU, by torch or by XLA: arrays in torch's
        memory would break the updates of XLA's CUDA-graph command buffers, see :func:`qbridge.to_jax`).
        Every array is ready when this returns (the host waits once, at the end, for torch's writes).

    Raises:
        CheckpointError: a missing, truncated or corrupt file, a quant state that does not fit its tensor,
            damaged (NaN/Inf) scales, a quantized weight without its scales, a ``config.json``
            model dtype quantized weights cannot decode to; without a target and with ``strict``, tensors
            that ``config.json``'s model has and the checkpoint lacks or holds at other sizes. The message
            names the file and key. Nothing partial is returned.
        FormatError: an unknown ``quant_method`` or mixed formats.
        jax_side.MatchError: ``strict`` and the checkpoint does not fit ``target``.
        TypeError: ``target`` is no linen params dict, ``nnx.Module`` or ``nnx.State``, or holds weights kept
            quantized (a model, state or tree that ``jax_side.load_quantized_into_nnx`` or ``keep_quantized``
            filled; the message names one): a target gives the dense layout. A ``sharding=`` callable that
            returns something other than a ``jax.sharding.Sharding`` or None (the leaf named).
        ValueError: a sharding rule naming an axis its mesh lacks, an axis twice, or reduced/unreduced axes
            (the rule named); a leaf's sharding that its shape does not divide into or that puts it in host
            memory (``memory_kind``), refused before anything is read (the leaf named); a bad ``dtype``.
    """

    sharding = check_spec(sharding)
    start = time.perf_counter()
    jdev, tdev = resolve_device(device)
    if target is None and dtype in ("target", "checkpoint"):
        raise ValueError(f"dtype={dtype!r} needs a target")
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")  # its name (JAX's own table narrows float64 without x64)
    if dtype not in (None, "target", "checkpoint"):
        try:
            floating = jnp.issubdtype(np.dtype(dtype), jnp.floating)
        except TypeError:  # not a dtype numpy knows (JAX registers bfloat16 there)
            names = ["bfloat16", "float16", "float32", "float64", "target", "checkpoint"]
            close = (
                difflib.get_close_matches(str(dtype), names, n=1, cutoff=0.5)
                if isinstance(dtype, str)
                else []
            )
            raise ValueError(
                f"dtype={dtype!r} is not a dtype name" + (f" (did you mean {close[0]!r}?)" if close else "")
                + ": give a floating dtype (bfloat16, float16, float32; JAX's, numpy's, torch's or its name), "
                "or 'target' / 'checkpoint' with a target"
            ) from None  # fmt: skip
        if not floating:
            raise ValueError(
                f"dtype={dtype!r}: weights are cast only to a floating dtype (bfloat16, float16, float32 ...)"
            )
        if np.dtype(dtype).itemsize > 4 and not jax.config.read("jax_enable_x64"):
            raise ValueError(
                f"dtype={np.dtype(dtype).name}: JAX runs with x64 off, so its arrays hold at most 32-bit floats; "
                "turn it on first (jax.config.update('jax_enable_x64', True)) or pick float32"
            )
    if tdev.type == "cuda" and sharding is None and not keep_quantized:
        # pinned memory for the weights read ahead (READ_AHEAD_BYTES) and for those waiting for their groups
        # (as many): made once per process, in the background, while the checkpoint is opened
        _staging.prepare(2 * READ_AHEAD_BYTES)
    with _gc.older_generations_deferred(), open_checkpoint(path) as ckpt:
        t, plan, match, skipped = plan_load(
            ckpt, target, dtype=dtype, kinds=kinds, rename=rename, strict=strict
        )
        names = [jax_side.dotted(p.leaf.path[1:] if target is None else p.leaf.path) for p in plan]
        if isinstance(sharding, tuple):  # (mesh, rules)
            warn_unmatched(
                "sharding",
                [rule[0] for rule in sharding[1]],
                names,
                unmatched_words(names),
            )
        stored = sum(ckpt.entries[p.key].stored_bytes for p in plan)
        bar = _progress(stored, progress, f"qbridge: {os.fspath(path)}")
        values: dict[Any, Any] = {}
        dense = 0
        into = XlaDestinations()  # dense results: torch writes them into arrays XLA allocated
        # FP8 weights of one kind (and sharding) decoded together on a GPU (see qbridge._group)
        groups = FP8Groups(ckpt, tdev, jdev, into, values, READ_AHEAD_BYTES) if _grouped(jdev) else None
        routes = _routes(ckpt, plan, names, dtype, sharding, keep_quantized, groups, into, jdev)
        ahead_keys = [
            _stored_keys(ckpt.entries[p.key])
            if (
                sharding is None
                and p.leaf.sharding is None
                and not keep_quantized
                # an FP8 group's kind (a tuple) whose float8 bytes are small: read with its scales
                and not (isinstance(route, tuple) and _weights_stacked(route))
            )
            # a leaf split over devices that are all this process's: read whole, ahead (see load_sharded_leaf),
            # unless its group reads its float8 bytes with its scales
            or (route == "sharded" and leaf_sharding.is_fully_addressable)
            or (leaf_sharding is not None and isinstance(route, tuple) and not _weights_stacked(route))
            else ()
            for p, (_, leaf_sharding, route) in zip(plan, routes, strict=True)
        ]
        if tdev.type == "cuda" and sharding is not None and any(ahead_keys):
            _staging.prepare(2 * READ_AHEAD_BYTES)  # pinned memory for those reads, as an unsharded load has
        ahead = _ReadAhead(ckpt, ahead_keys, pin=tdev.type == "cuda")
        try:
            if tdev.type == "cuda" and sharding is None and not keep_quantized:
                ahead.advance(0)  # the large reads start first
                ckpt.stage_small(
                    [
                        key
                        for (_, leaf_sharding, route), p in zip(routes, plan, strict=True)
                        if route is None and leaf_sharding is None
                        for key in _small_pieces(ckpt.entries[p.key])
                    ],
                    tdev,
                )
            if groups is not None:
                groups.start()  # the first groups' scales and small float8 bytes, read in the background
            hosted: list[tuple[Any, np.ndarray]] = []  # (leaf path, host bytes), put at the end
            for i, p in enumerate(plan):
                ahead.advance(i)
                entry = ckpt.entries[p.key]
                cast, leaf_sharding, route = routes[i]
                if route == "kept":
                    kept = quantized_leaf(ckpt, entry, jdev, cast)
                    # a replicated placement: a copy of the pieces on each device
                    values[p.leaf.path] = (
                        kept if leaf_sharding is None else jax.device_put(kept, _replicated(leaf_sharding))
                    )
                    dense += values[p.leaf.path].nbytes
                elif route == "sharded":
                    values[p.leaf.path] = load_sharded_leaf(
                        ckpt,
                        entry,
                        p.rule,
                        leaf_sharding,
                        functools.partial(_convert, cast=cast),
                        turn=i,
                        into=into,
                    )
                    dense += values[p.leaf.path].nbytes
                elif route == "host":  # read in the plan's order; put with the others at the end
                    values[p.leaf.path] = None  # keeps the plan's order
                    hosted.append((p.leaf.path, host_bytes(ckpt, entry, p.rule)))
                    dense += entry.dense_bytes
                elif groups is not None and route is not None:  # an FP8 group's kind
                    values[p.leaf.path] = None  # keeps the plan's order; set when its group is decoded
                    place = None
                    if leaf_sharding is not None:  # its shards cut from its group's result
                        place = _placer(ckpt, entry, p.rule, leaf_sharding, cast, into)
                    groups.add(route, p.leaf.path, entry, place)
                    dense += entry.dense_bytes
                else:
                    # a 4-bit weight whose kernel writes its Flax layout, uncast, on a GPU: decoded straight into
                    # an array XLA allocated (no torch result, no copy of it)
                    direct = (
                        tdev.type == "cuda"
                        and jdev.platform == "gpu"
                        and _loaded_dtype(entry, cast) == entry.dtype
                        and written_by_kernel(entry, p.rule) == tuple(p.leaf.shape)
                    )
                    got = into.take(p.leaf.shape, entry.dtype, jdev, tdev) if direct else None
                    if got is not None:
                        materialize(ckpt, entry, tdev, p.rule, out=got[1])
                        values[p.leaf.path] = got[0]
                        dense += got[0].nbytes
                    else:  # (an array asked of into and not given: its shape's arrays are not ready; XLA copies)
                        tensor = _convert(materialize(ckpt, entry, tdev, p.rule), cast)
                        values[p.leaf.path] = hand_over(tensor, jdev, None if direct else into)
                        dense += tensor.numel() * tensor.element_size()
                        del tensor
                if bar is not None:
                    bar.update(entry.stored_bytes)
                    bar.set_postfix(tensors=f"{i + 1}/{len(plan)}", refresh=False)  # drawn at update's pace
            if groups is not None:
                groups.flush_all()
            if hosted:
                put = put_from_host([host for _, host in hosted], jdev)
                values.update((path, array) for (path, _), array in zip(hosted, put, strict=True))
        finally:
            if groups is not None:
                groups.close()  # reads ahead that no group took (a failed load) finish before the files close
            into.settle()  # torch's writes have landed: the arrays may be read (or, on an error, freed)
            if bar is not None:
                bar.close()
        result = (
            jax_side.rebuild_target(t, values) if t is not None else {"params": {}, **jax_side.nest(values)}
        )
        classification = ckpt.classify()
        guessed, classified_by = list(classification.guessed), classification.source
        if t is not None:  # the target's module types, then kinds=, decide before a name rule's guess
            guessed = _guesses_that_decided(plan, names, set(guessed), kinds)
            typed = sum(p.leaf.module_type is not None for p in plan)
            if typed:
                classified_by += f"; the target's module types laid out {typed} of {len(plan)} leaves"
        elif kinds:  # kinds= searches the module path (the Flax name without its leaf) before a guess
            decided = {p.key for p, name in zip(plan, names) if kind_override(name.rpartition(".")[0], kinds)}
            guessed = [key for key in guessed if key not in decided]
        # the devices the arrays span where any leaf was placed by a sharding (sharding= or the target's own)
        where = _where(values, jdev) if any(r[1] is not None for r in routes) else str(jdev)
        report = LoadReport(ckpt.format, len(values), sorted(skipped), match, stored, dense, time.perf_counter() - start,
                            where, skipped, guessed, classified_by, read_bytes=ckpt.bytes_read)  # fmt: skip
    if skipped:
        log.info(
            "load_checkpoint skipped %s (not parameters)", ", ".join(f"{k} ({r})" for k, r in skipped.items())
        )
    log.debug("%s", report)
    return (result, report) if return_report else result


def dequantized_state(path: str | os.PathLike[str], *, device: Any = "cpu") -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint dequantized in torch layout, as ``{torch name: tensor}`` (for
    inspection and parity tests): the state dict of the model without its quantization. Loads everything at
    once: meant for small checkpoints. The ``weight_format`` tags of bitsandbytes 8-bit weights are left out
    (they describe the stored int8 layout, which the dequantized weight no longer has; an unquantized model
    has no such entry)."""
    _, tdev = resolve_device(device)
    identity = jax_side.rule_for("param", "weight")
    with open_checkpoint(path) as ckpt:
        ckpt.refuse_unreadable()
        tags = {
            f"{e.keys['weight'].rpartition('.')[0]}.weight_format"
            for e in ckpt.entries.values()
            if e.kind == "bnb8"
        }
        return {
            name: materialize(ckpt, e, tdev, identity, stored=True)
            for name, e in ckpt.entries.items()
            if name not in tags
        }
