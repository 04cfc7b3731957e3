"""Targets to match a checkpoint against: linen variable dicts, nnx modules and nnx states."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from ._layout import known_module_type, refuse_torch
from ._quantized import is_quantized
from ._tree import (
    MatchError,
    MatchReport,
    Path,
    PlannedLeaf,
    TargetLeaf,
    dotted,
    fill,
    plan_match,
    warn_at_caller,
)

COLLECTIONS = ("params", "batch_stats")


@dataclasses.dataclass
class Target:
    """A target tree seen as leaves, and how to put filled leaves back into its structure.

    ``prefix_len`` leading path entries (a linen collection name such as ``"params"``) are not part of
    the torch name.
    """

    leaves: list[TargetLeaf]
    rebuild: Callable[[dict[Path, Any]], Any]
    prefix_len: int = 0


def _is_nnx_module(obj: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:
        return False
    return isinstance(obj, nnx.Module)


def _is_nnx_state(obj: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:
        return False
    return isinstance(obj, nnx.State)


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], Any]:
    return tuple(np.shape(x)), getattr(x, "dtype", None)


def _sharding(x: Any) -> Any:
    """The sharding a target array (or ``jax.ShapeDtypeStruct``) carries, if any."""
    return getattr(x, "sharding", None)


def _abstract(x: Any) -> bool:
    """Whether a target leaf holds only a shape and dtype (``jax.eval_shape``/``nnx.eval_shape`` targets)."""
    return isinstance(x, jax.ShapeDtypeStruct)


def _value(var: Any) -> Any:
    return var.get_value() if hasattr(var, "get_value") else var.value


def _from_dict(tree: Mapping[str, Any]) -> Target:
    _refuse_kept(kept_in(tree))
    collections = set(tree) & set(COLLECTIONS)
    prefix_len = 1 if "params" in collections else 0
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path) for path, _ in flat]
    leaves = [
        TargetLeaf(p, *_shape_dtype(v), sharding=_sharding(v), abstract=_abstract(v))
        for p, (_, v) in zip(paths, flat)
    ]
    originals = [v for _, v in flat]

    def rebuild(values: dict[Path, Any]) -> Any:
        return jax.tree_util.tree_unflatten(treedef, [values.get(p, o) for p, o in zip(paths, originals)])

    return Target(leaves, rebuild, prefix_len)


def kept_in(target: Any) -> list[tuple[str, str]]:
    """The weights kept quantized in a target, ``(dotted path, type name)`` each: an nnx model's
    ``QuantLinear``/``QuantEmbed`` layers, an ``nnx.State``'s quantized variables, a tree's
    :class:`NF4Weight`/:class:`FP8Weight` leaves (what ``load_quantized_into_nnx`` and ``keep_quantized=True``
    give)."""
    if _is_nnx_module(target):
        from flax import nnx

        return [
            (".".join(map(str, path)), type(node).__name__)
            for path, node in nnx.iter_graph(target)
            if type(node).__name__ in ("QuantLinear", "QuantEmbed")
            and type(node).__module__.startswith("jax_side")
        ]
    if _is_nnx_state(target):
        from flax import nnx

        return [
            (".".join(map(str, path)), type(var).__name__)
            for path, var in nnx.to_flat_state(target)
            if type(var).__name__ == "QuantizedVariable" and type(var).__module__.startswith("jax_side")
        ]
    flat = jax.tree_util.tree_flatten_with_path(target, is_leaf=is_quantized)[0]
    return [
        (dotted(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)), type(leaf).__name__)
        for path, leaf in flat
        if is_quantized(leaf)
    ]


def kept_said(kept: list[tuple[str, str]]) -> str:
    """:func:`kept_in`'s finding in words: ``"<path> (<type>) and N more are kept quantized"``."""
    more = f" and {len(kept) - 1} more are" if len(kept) > 1 else " is"
    return f"{kept[0][0]} ({kept[0][1]}){more} kept quantized"


def _refuse_kept(kept: list[tuple[str, str]]) -> None:
    """Raises the TypeError for a target holding kept-quantized layers: ``(dotted path, type name)`` each."""
    if kept:
        raise TypeError(
            f"target: {kept_said(kept)} (keep_quantized=True, jax_side.load_quantized_into_nnx); a target "
            "describes the model's dense layout (Linear kernels, Embed tables): pass a model built afresh (or "
            "its state), or its abstract form (jax_side.abstract_llama(config) for the built-in Llama), and put "
            "the result into a fresh model"
        )


def _from_nnx_state(state: Any, module_types: Mapping[Path, str] | None = None) -> Target:
    from flax import nnx

    _refuse_kept(kept_in(state))
    flat = list(nnx.to_flat_state(state))
    leaves = []
    for path, var in flat:
        if not isinstance(var, (nnx.Param, nnx.BatchStat)):
            continue
        value = _value(var)
        shape, dtype = _shape_dtype(value)
        leaves.append(TargetLeaf(tuple(path), shape, dtype, (module_types or {}).get(tuple(path[:-1])), _sharding(value),
                                 _abstract(value)))  # fmt: skip
    originals = {tuple(path): _value(var) for path, var in flat}
    wanted = {leaf.path for leaf in leaves}

    def rebuild(values: dict[Path, Any]) -> dict[Any, Any]:
        pure: dict[Any, Any] = {}
        for path in wanted:
            node = pure
            for seg in path[:-1]:
                node = node.setdefault(seg, {})
            node[path[-1]] = values.get(path, originals[path])
        return pure

    return Target(leaves, rebuild)


def _module_type(node: Any) -> str:
    """The layer type of an nnx module: its class's name, or for a subclass of a Flax layer (``class
    Upsample(nnx.ConvTranspose)``) that layer's, whose parameter layout it inherits."""
    for cls in type(node).__mro__:
        if cls.__module__.startswith("flax.") and known_module_type(cls.__name__):
            return cls.__name__
    return type(node).__name__


def _from_nnx_module(module: Any) -> Target:
    from flax import nnx

    _refuse_kept(kept_in(module))
    types = {
        tuple(path): _module_type(node)
        for path, node in nnx.iter_graph(module)
        if isinstance(node, nnx.Module)
    }
    return _from_nnx_state(nnx.state(module), types)


def as_target(target: Any) -> Target:
    """Reads a linen params or variables dict (arrays or ``jax.ShapeDtypeStruct``), an ``nnx.Module`` or an
    ``nnx.State``.

    Raises:
        TypeError: ``target`` is none of these, or an ``nnx.Module`` or ``nnx.State`` holding kept-quantized
            layers (``QuantLinear``/``QuantEmbed``, put in by ``load_quantized_into_nnx``): a target gives the
            dense layout.
    """
    if isinstance(target, Target):
        return target
    if _is_nnx_module(target):
        return _from_nnx_module(target)
    if _is_nnx_state(target):
        return _from_nnx_state(target)
    if isinstance(target, Mapping):
        return _from_dict(target)
    raise TypeError(
        f"target must be a linen params dict, an nnx.Module or an nnx.State, got {type(target).__name__}"
    )


def _strip(target: Target) -> list[TargetLeaf]:
    if not target.prefix_len:
        return target.leaves
    return [dataclasses.replace(leaf, path=leaf.path[target.prefix_len :]) for leaf in target.leaves]


def plan_for_target(
    checkpoint: Mapping[str, tuple[tuple[int, ...], Any]],
    target: Any,
    *,
    dtype: Any = None,
    kinds: Mapping[str, str] | None = None,
    rename: Mapping[str, str] | None = None,
    strict: bool = True,
    torch_kinds: Mapping[str, str] | None = None,
    optional: Mapping[str, str] | None = None,
) -> tuple[Target, list[PlannedLeaf], MatchReport]:
    """Plans a match from shapes alone (see :func:`jax_side.plan_match`), before any tensor is read.

    Raises:
        MatchError: ``strict`` and anything is off; or, with ``strict=False``, a target leaf that nothing
            fills holds only a shape (a ``jax.ShapeDtypeStruct``), so there is no value to keep for it.
    """
    t = as_target(target)
    leaves = _strip(t)
    plan, report = plan_match(
        checkpoint,
        leaves,
        dtype=dtype,
        kinds=kinds,
        rename=rename,
        torch_kinds=torch_kinds,
        optional=optional,
    )
    if strict and not report.ok:
        raise MatchError(report)
    filled = {p.leaf.path for p in plan}
    empty = [dotted(leaf.path) for leaf in leaves if leaf.abstract and leaf.path not in filled]
    if empty:
        leaves_are = "target leaf is" if len(empty) == 1 else "target leaves are"
        raise MatchError(report, (
            f"strict=False, but {len(empty)} {leaves_are} filled by no checkpoint tensor and the target holds "
            f"only their shapes (jax.ShapeDtypeStruct), so they would have no value: {', '.join(empty)}. Pass a "
            "concrete target (the initialized model, nnx.state(model) or a params dict of arrays) to keep its "
            f"values there, or fix the match:\n{report}"
        ))  # fmt: skip
    return t, plan, report


def warn_misfit(report: MatchReport) -> None:
    """With ``strict=False``: a UserWarning at the caller's line listing what does not fit (nothing when the
    checkpoint fits), so that target values kept in place are not kept without a word."""
    if not report.ok:
        warn_at_caller(
            "strict=False: the checkpoint does not fit the target; the leaves it fills are loaded, the others "
            f"keep the target's values:\n{report}"
        )


def rebuild_target(t: Target, values: dict[Path, Any]) -> Any:
    """Puts leaf values (keyed by torch-name path, without the collection prefix) back into ``t``'s structure."""
    if not t.prefix_len:
        return t.rebuild(values)
    by_full = {}
    stripped = {leaf.path[t.prefix_len :]: leaf.path for leaf in t.leaves}
    for path, value in values.items():
        by_full[stripped[path]] = value
    return t.rebuild(by_full)


def match_to_target(
    checkpoint: Mapping[str, Any],
    target: Any,
    *,
    strict: bool = True,
    dtype: Any = None,
    kinds: Mapping[str, str] | None = None,
    rename: Mapping[str, str] | None = None,
) -> tuple[Any, MatchReport]:
    """Lays out a flat torch-named checkpoint in the structure of a Flax target.

    Every target leaf is matched to its checkpoint tensor by path (``layers.0.mlp.down_proj.kernel`` <-
    ``layers.0.mlp.down_proj.weight``; linen's ``layers_0`` <- ``layers.0``) and laid out by its kind: a
    Dense/Linear ``kernel`` is always the transpose of torch's ``weight``, whatever the shapes (a square
    weight fits either way, so shapes confirm a layout but never choose it); for an nnx module the Flax
    module type decides (so ConvTranspose is told from Conv), for a dict the leaf's name and rank do.

    Args:
        checkpoint: ``torch key -> array`` in torch layout (jax, numpy, or anything ``jnp.asarray`` reads;
            not torch tensors: ``qbridge.to_jax`` hands them over).
        target: a linen ``params`` dict or ``{"params": ..., "batch_stats": ...}`` dict (its leaves may be
            ``jax.ShapeDtypeStruct``), an ``nnx.Module`` or an ``nnx.State``.
        strict: raise :class:`MatchError` listing every missing leaf, unused tensor and shape or dtype
            mismatch; with False, problems are reported (in the report and a UserWarning) and unfilled
            leaves keep the target's values
            (a target that holds only shapes there raises instead: there is no value to keep).
        dtype: None (or ``"target"``) casts each floating leaf to the target leaf's dtype, as torch's
            ``load_state_dict`` does, listing each cast in ``report.casts``; ``"checkpoint"`` keeps the
            checkpoint's dtypes, a difference from the target being a mismatch; a dtype casts every
            floating leaf to it.
        kinds: dotted-Flax-path regex -> torch module kind, for what names cannot tell (``conv_transpose2d``).
        rename: regex -> replacement applied to checkpoint keys before matching (``{"^model\\.": ""}``).

    Returns:
        ``(tree, report)``: the tree has the target's structure (a dict for linen; a pure nested dict for
        nnx, ready for ``nnx.update``); the report says what matched and what did not.

    Raises:
        MatchError: ``strict`` and the checkpoint does not fit; the message lists every problem by name.
        TypeError: a torch tensor among the checkpoint's values (named).
    """
    for k, v in checkpoint.items():
        refuse_torch(v, f"checkpoint[{k!r}]")
    shapes = {
        k: (tuple(np.shape(v)), getattr(v, "dtype", np.asarray(v).dtype)) for k, v in checkpoint.items()
    }
    t, plan, report = plan_for_target(shapes, target, dtype=dtype, kinds=kinds, rename=rename, strict=strict)
    warn_misfit(report)
    values = fill(plan, lambda p: checkpoint[p.key], dtype=dtype)
    return rebuild_target(t, values), report


def load_into_nnx(module: Any, checkpoint: Mapping[str, Any], **kwargs: Any) -> MatchReport:
    """Matches ``checkpoint`` to ``module`` (see :func:`match_to_target`) and writes it in with ``nnx.update``.

    Nothing is written when matching fails under ``strict``.
    """
    from flax import nnx

    tree, report = match_to_target(checkpoint, module, **kwargs)
    nnx.update(module, tree)
    return report
