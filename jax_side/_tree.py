"""Flax parameter trees from flat torch state dicts: by name inference, or matched to a target tree."""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._layout import (
    KINDS,
    TORCH_NAME,
    LeafRule,
    apply_rule,
    buffer_reason,
    flax_shape,
    kind_of_flax_leaf,
    rule_for,
    rule_for_flax_leaf,
)

Path = tuple[Any, ...]

EMBEDDING_NAMES = re.compile(
    r"(^|_)(embed|embeds|embedding|embeddings|embed_tokens|wte|wpe|word_embeddings|position_embeddings|"
    r"token_type_embeddings|shared|tok_embeddings)$"
)
NORM_NAMES = re.compile(r"(norm|ln|layernorm|layer_norm|ln_\d+|ln_f)", re.IGNORECASE)
_NUMBERED = re.compile(r"^(.*)_(\d+)$")
# stored pieces of bitsandbytes 4-bit and 8-bit weights and of FP8 weights (qbridge's checkpoint formats)
_QUANTIZED_PIECE = re.compile(
    r"\.(absmax|quant_map|nested_absmax|nested_quant_map|SCB|weight_scale_inv|weight_scale)$|\.quant_state\."
)


class MatchError(ValueError):
    """A checkpoint that does not fit its target: every problem is listed in ``report`` (``message``, when
    given, says what could not be done with it)."""

    def __init__(self, report: MatchReport, message: str | None = None):
        super().__init__(message or str(report))
        self.report = report


# after a hint to build the target from the checkpoint's config.json: where it was, that file is the cause
_OWN_CONFIG = (
    " (if the target was built from it, the config.json does not describe these files: qbridge's "
    "inspect_checkpoint compares them)"
)


@dataclasses.dataclass
class MatchReport:
    """What matching a checkpoint to a target found.

    Attributes:
        missing: target leaves (dotted Flax paths) that no checkpoint tensor fills, with the keys tried.
        unused: checkpoint keys no target leaf took.
        shape_mismatches: ``(leaf, key, target shape, checkpoint shape in Flax layout)``.
        dtype_mismatches: ``(leaf, key, target dtype, checkpoint dtype)``.
        skipped: checkpoint keys that are not parameters (e.g. ``num_batches_tracked``) and were left out;
            ``skip_reasons`` says why for each.
        matched: ``leaf -> key`` for every filled leaf.
        casts: ``(leaf, key, checkpoint dtype, result dtype)`` for every floating leaf whose dtype changes.
        hints: ``leaf -> why its shape may differ``, for shape mismatches whose cause the layout suggests.
    """

    missing: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)
    unused: list[str] = dataclasses.field(default_factory=list)
    shape_mismatches: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
        default_factory=list
    )
    dtype_mismatches: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    skip_reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    matched: dict[str, str] = dataclasses.field(default_factory=dict)
    casts: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    hints: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing is missing, unused or mismatched in shape or dtype."""
        return not (self.missing or self.unused or self.shape_mismatches or self.dtype_mismatches)

    def cast_summary(self) -> list[str]:
        """One line per (checkpoint dtype, result dtype) pair: how many leaves, and the first names."""
        groups: dict[tuple[str, str], list[str]] = {}
        for leaf, _, src, dst in self.casts:
            groups.setdefault((src, dst), []).append(leaf)
        return [
            f"cast {len(leaves)} leaves {src} -> {dst}: {', '.join(leaves[:4])}{', ...' if len(leaves) > 4 else ''}"
            for (src, dst), leaves in groups.items()
        ]

    def config_hints(self) -> list[str]:
        """What suggests the target was built from another configuration than the checkpoint's, in words: numbered
        blocks (``layers.5``, ``h.11``) on one side only, or sizes that differ in several leaves. Transposed
        kernels and rename rules have hints of their own and are not counted here."""
        hints = []
        top = max((_block(key) for key in self.matched.values()), default=-1)
        extra = sorted({_block(key) for key in self.unused} - set(range(-1, top + 1)))
        if extra and top >= 0:
            hints.append(
                f"the checkpoint has blocks numbered up to {extra[-1]} and the target up to {top}: the target has fewer "
                f"layers than the checkpoint; build it from the checkpoint's own config.json{_OWN_CONFIG}"
            )
        lacking = sorted({_block(leaf) for leaf, _ in self.missing} - set(range(-1, top + 1)))
        if lacking and top >= 0:
            hints.append(
                f"the target has blocks numbered up to {lacking[-1]} and the checkpoint up to {top}: the target has more "
                f"layers than the checkpoint; build it from the checkpoint's own config.json{_OWN_CONFIG}"
            )
        plain = [leaf for leaf, *_ in self.shape_mismatches if not self.hints.get(leaf)]
        if len(plain) >= 2:
            hints.append(
                f"{len(plain)} leaves differ in shape, so the target's sizes (hidden size, intermediate size, heads, vocabulary ...) are not "
                f"the checkpoint's; build it from the checkpoint's own config.json{_OWN_CONFIG}"
            )
        return hints

    def rename_hint(self) -> str | None:
        """Where unused checkpoint keys are missing leaves' keys with a prefix added (or dropped), the
        ``rename`` rule that would match them, in words; else None."""
        prefixes: dict[str, list[str]] = {}  # a dotted suffix of an unused key -> the prefixes before it
        for key in self.unused:
            parts = key.split(".")
            for i in range(1, len(parts)):
                prefixes.setdefault(".".join(parts[i:]), []).append(".".join(parts[:i]) + ".")
        unused = set(self.unused)
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for _, tried in self.missing:
            for candidate in tried:
                counts.update((prefix, "") for prefix in prefixes.get(candidate, ()))
                parts = candidate.split(".")
                counts.update(
                    ("", ".".join(parts[:i]) + ".")
                    for i in range(1, len(parts))
                    if ".".join(parts[i:]) in unused
                )
        if not counts:
            return None
        (old, new), n = counts.most_common(1)[0]
        rule = f"rename={{{'^' + re.escape(old)!r}: {new!r}}}"
        if old:
            return f"{n} unused tensors are missing leaves' keys with {old!r} in front: {rule} drops it"
        return f"{n} missing leaves' keys are unused tensors' with {new!r} in front: {rule} adds it"

    def __str__(self) -> str:
        if self.ok:
            head = f"checkpoint matches its target: {len(self.matched)} leaves, {len(self.skipped)} tensors skipped (not parameters)"
            return "; ".join([head, *self.cast_summary()])
        counts = [
            f"{len(items)} {one if len(items) == 1 else many}"
            for items, one, many in (
                (self.missing, "target leaf missing", "target leaves missing"),
                (self.unused, "checkpoint tensor unused", "checkpoint tensors unused"),
                (self.shape_mismatches, "shape differs", "shapes differ"),
                (self.dtype_mismatches, "dtype differs", "dtypes differ"),
            )
            if items
        ]
        lines = [f"checkpoint does not match its target ({', '.join(counts)}):"]
        quantized = [key for key in self.unused if _QUANTIZED_PIECE.search(key)]
        if quantized:
            lines.append(
                f"  ({len(quantized)} unused tensors are quantized pieces, such as {quantized[0]!r}: a quantized "
                "checkpoint loads with qbridge.load_checkpoint(path, target=...), which decodes them)"
            )
        hint = self.rename_hint()
        if hint:
            lines.append(f"  ({hint})")
        lines += [f"  ({hint})" for hint in self.config_hints()]
        for leaf, tried in self.missing:
            lines.append(
                f"  missing: target leaf {leaf!r} has no checkpoint tensor (looked for {', '.join(tried)})"
            )
        for key in self.unused:
            lines.append(f"  unused: checkpoint tensor {key!r} fills no target leaf")
        transposed = []  # Conv1D modules whose kernels are their targets' transposes
        for leaf, key, want, got in self.shape_mismatches:
            hint = self.hints.get(leaf, "")
            if hint == _TRANSPOSED:
                transposed.append(leaf.removesuffix(".kernel").rpartition(".")[2])
            lines.append(
                f"  shape: {leaf!r} expects {want}, checkpoint {key!r} gives {got} in Flax layout{hint}"
            )
        if transposed:
            lines.append(_transposed_hint(sorted(set(transposed))))
        for leaf, key, want_dtype, got_dtype in self.dtype_mismatches:
            kinds = [jnp.issubdtype(np.dtype(d), jnp.floating) for d in (want_dtype, got_dtype)]
            if all(kinds):  # refused only under dtype="checkpoint"
                why = "leave dtype=None to cast floating leaves to the target's dtypes"
            elif any(kinds):
                why = "only floating tensors are cast, to floating leaves: is the target's leaf the one this tensor belongs in?"
            else:
                why = (
                    "integer and bool tensors are not cast: the target's leaf must have the tensor's dtype (an int64 "
                    "one with JAX's x64 on: jax.config.update('jax_enable_x64', True))"
                )
            lines.append(f"  dtype: {leaf!r} is {want_dtype}, checkpoint {key!r} is {got_dtype} ({why})")
        return "\n".join(lines)


_BLOCK = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")  # a numbered block in a dotted name: layers.5.mlp, h.11


def _block(name: str) -> int:
    """The number of the outermost numbered block ``name`` is in (``model.layers.5.mlp.experts.2.w1``: 5), or -1."""
    found = _BLOCK.search(name)
    return int(found.group(1)) if found else -1


_TRANSPOSED = " (its transpose)"  # the hint of a Conv1D kernel laid out as its target's transpose


def _shape_hint(kind: str, leaf: str, want: tuple[int, ...], got: tuple[int, ...]) -> str:
    """Why a leaf laid out by a module ``kind`` may have come out in ``got`` where its target has ``want``."""
    if kind == "hf_conv1d" and len(want) == 2 and got == want[::-1] != want and leaf.endswith(".kernel"):
        return _TRANSPOSED
    if kind.startswith("conv_transpose"):
        return _grouped_transpose_hint(want, got)
    return ""


def _transposed_hint(modules: list[str]) -> str:
    """For kernels laid out as their targets' transposes (a transformers ``Conv1D`` read for a Dense, whose
    kind a target without module types cannot tell): the ``kinds=`` rule for all modules of those names."""
    names = "|".join(re.escape(m) for m in modules)
    return (
        "  (kernels laid out as their targets' transposes: the layout follows the torch module's kind, and "
        "every module of that kind is laid out so, square ones too, whose shapes match; name the kind your Flax "
        f"modules have, e.g. kinds={{r'({names})(\\.|$)': 'linear'}} for Dense kernels [in, out]; "
        "transformers' Conv1D weights are otherwise laid out [out, in], as its FlaxGPT2 held them)"
    )


def _grouped_transpose_hint(want: tuple[int, ...], got: tuple[int, ...]) -> str:
    """For a convolution kernel whose output features are ``groups`` times fewer than the target's: torch's
    grouped ConvTranspose stores ``[in, out / groups, k...]``, and Flax's ConvTranspose has no groups."""
    if not 3 <= len(want) == len(got) <= 5 or want[:-1] != got[:-1] or not got[-1]:
        return ""
    groups, rest = divmod(want[-1], got[-1])
    if groups < 2 or rest:
        return ""
    return (
        f" (if the torch layer is a ConvTranspose with groups={groups}: its weight holds out/groups output "
        "features, and Flax's ConvTranspose has no feature groups; such a layer needs a module of your own, "
        "e.g. jax.lax.conv_general_dilated with lhs_dilation and feature_group_count)"
    )


@dataclasses.dataclass(frozen=True)
class TargetLeaf:
    """One leaf of a target tree: where it is, what it must look like, and which torch module kind fills it
    (``sharding``: the ``jax.sharding.Sharding`` the target's array already has, if any; ``abstract``: the
    target holds only its shape and dtype, a ``jax.ShapeDtypeStruct``, and no value to keep)."""

    path: Path
    shape: tuple[int, ...]
    dtype: Any
    module_type: str | None = None
    sharding: Any = None
    abstract: bool = False


@dataclasses.dataclass(frozen=True)
class PlannedLeaf:
    """One target leaf, the checkpoint key that fills it, and the rule that lays it out."""

    leaf: TargetLeaf
    key: str
    rule: LeafRule


def dotted(path: Path) -> str:
    """A tree path as one dotted name: ``("params", "layers", 0, "kernel")`` -> ``"params.layers.0.kernel"``."""
    return ".".join(map(str, path))


# --- flat state dict -> Flax variables by name --------------------------------------------------------


def kind_override(name: str, overrides: Mapping[str, str] | None) -> str | None:
    """The kind of the first ``overrides`` pattern (a regular expression) found in ``name``, or None."""
    if not overrides:
        return None
    return next((kind for pattern, kind in overrides.items() if re.search(pattern, name)), None)


def check_rank(rule: LeafRule, shape: tuple[int, ...], key: str, kind: str) -> None:
    """Raises ValueError where a ``kinds`` pattern gave ``key`` a module kind whose layout for this tensor
    is of another rank (``stacked_linear`` on a 2-D weight, ``conv2d`` on a matrix): it would keep torch's
    layout under a Flax name that promises another."""
    if rule.perm is not None and len(rule.perm) != len(shape):
        raise ValueError(
            f"{key}: kinds= names its module {kind!r}, whose {rule.torch_name!r} is a rank-{len(rule.perm)} "
            f"tensor, but this one is rank {len(shape)} {tuple(shape)}. Make the pattern match only modules of "
            "that kind (anchor it, e.g. r'experts$' instead of 'experts'), or name this module's kind"
        )


def infer_kind(
    key: str,
    ndim: int,
    overrides: Mapping[str, str] | None = None,
    torch_kinds: Mapping[str, str] | None = None,
) -> str:
    """The torch module kind of parameter ``key`` (a dotted torch name) of rank ``ndim``.

    ``overrides`` maps regular expressions over the module's dotted name to a kind; the first match wins.
    Then ``torch_kinds`` (``key -> kind``, known from the torch module that owns the tensor). Otherwise,
    by name and rank (a guess): running statistics -> batchnorm; a 1-D ``weight`` -> a norm; a 2-D
    ``weight`` -> an embedding when the module's name says so (``embed_tokens``, ``wte``,
    ``word_embeddings`` ...), else linear; a 3-5-D ``weight`` -> convolution. ConvTranspose cannot be told
    from Conv by name and rank: name it in ``overrides`` (or match to a target, where the module type
    decides).
    """
    module, _, leaf = key.rpartition(".")
    overridden = kind_override(module, overrides)
    if overridden is not None:
        return overridden
    if torch_kinds and key in torch_kinds:
        return torch_kinds[key]
    if leaf in ("running_mean", "running_var"):
        return "batchnorm"
    if leaf != "weight":
        return "param"
    last = module.rpartition(".")[2]
    if ndim == 1:
        return "layernorm"
    if ndim == 2:
        return "embedding" if EMBEDDING_NAMES.search(last) else "linear"
    if 3 <= ndim <= 5:
        return f"conv{ndim - 2}d"
    return "param"


def _segments(module: str, numbered: str) -> list[Any]:
    if numbered == "keep" or not module:  # digits stay names: the dotted parts as they are
        return module.split(".") if module else []
    out: list[Any] = []
    for seg in module.split("."):
        if seg.isdigit():
            if numbered == "int":
                out.append(int(seg))
            elif out:  # "underscore": linen's auto names, layers_0
                out[-1] = f"{out[-1]}_{seg}"
            else:  # a leading number (an nn.Sequential's "0.weight"): the name as it is
                out.append(seg)
            continue
        out.append(seg)
    return out


def not_parameter(key: str, ndim: int, optional: Mapping[str, str] | None = None) -> str | None:
    """Why checkpoint tensor ``key`` is no parameter (``optional``'s reason, else the buffer name rules of
    :func:`jax_side.buffer_reason`), or None."""
    if optional and key in optional:
        return optional[key]
    return buffer_reason(key, ndim)


def warn_at_caller(message: str) -> None:
    """A UserWarning attributed to the first caller outside jax_side and qbridge (the user's line), so
    that it points there and Python shows it once per line, however deep the call inside and however
    often a load plans."""
    frame = sys._getframe(1)
    while frame.f_back is not None and str(frame.f_globals.get("__name__", "")).split(".")[0] in (
        "jax_side",
        "qbridge",
    ):
        frame = frame.f_back
    warnings.warn_explicit(
        message,
        UserWarning,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=str(frame.f_globals.get("__name__", "")),
        registry=frame.f_globals.setdefault("__warningregistry__", {}),
    )


def check_rules(what: str, rules: Mapping[str, str] | None) -> None:
    """Raises for a ``kinds`` or ``rename`` argument that is not a mapping of regular expressions to strings
    (module kinds of :data:`jax_side.KINDS` for ``kinds``), naming the rule.

    Raises:
        TypeError: not a mapping, or a pattern or value that is not a string.
        ValueError: a pattern that is no regular expression, or an unknown kind.
    """
    if rules is None:
        return
    if not isinstance(rules, Mapping):
        raise TypeError(
            f"{what} must be a mapping of regular expressions to strings, got {type(rules).__name__}"
        )
    for pattern, value in rules.items():
        if not isinstance(pattern, str) or not isinstance(value, str):
            raise TypeError(
                f"{what} rule {pattern!r}: {value!r}: the pattern and the "
                f"{'kind' if what == 'kinds' else 'replacement'} must be strings"
            )
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{what} rule {pattern!r} is no regular expression: {e}") from e
        if what == "kinds" and value not in KINDS:
            raise ValueError(
                f"kinds rule {pattern!r}: unknown module kind {value!r}; known: {', '.join(KINDS)}"
            )


def warn_unmatched(
    what: str,
    patterns: Iterable[str],
    names: Iterable[str],
    outcome: str = "matched no name; it changed nothing",
) -> None:
    """Warns about each ``what`` rule whose regex matches none of ``names`` (a rule that did nothing is
    most often a typo or a rule for another checkpoint)."""
    patterns = list(patterns)
    if not patterns:
        return
    names = list(names)
    for pattern in patterns:
        if not any(re.search(pattern, n) for n in names):
            warn_at_caller(f"the {what} rule {pattern!r} {outcome}")


def _renamed(keys: Iterable[str], rename: Mapping[str, str] | None) -> dict[str, str]:
    """``key -> key`` with every ``rename`` rule (regex -> replacement) applied in order; warns about rules
    that change no key."""
    check_rules("rename", rename)
    applied: set[str] = set()
    out: dict[str, str] = {}
    for key in keys:
        new = key
        if rename and not isinstance(key, str):
            raise _not_a_name(key)
        for pattern, repl in (rename or {}).items():
            new, count = re.subn(pattern, repl, new)
            if count:
                applied.add(pattern)
        out[key] = new
    for pattern in rename or {}:
        if pattern not in applied:
            warn_at_caller(
                f"the rename rule {pattern!r} matched no checkpoint key; it changed nothing (rules apply in "
                "order to each key; quantization pieces such as .absmax or .weight_scale_inv follow their "
                "weight and are not renamed)"
            )
    return out


def _not_a_name(key: Any) -> TypeError:
    return TypeError(
        f"checkpoint keys are torch state-dict names (strings), got {key!r} ({type(key).__name__})"
    )


def _dot_at_an_end(keys: Iterable[str]) -> bool:
    """Whether a key starts or ends with ``"."``, asked of the keys joined by NUL: a key holding NUL itself can
    only make the answer True (the slower exact naming then), never hide such a key.

    Raises:
        TypeError: a key is no string (naming it)."""
    try:
        joined = "\0".join(keys)
    except TypeError:
        raise _not_a_name(next(k for k in keys if not isinstance(k, str))) from None
    return joined.startswith(".") or joined.endswith(".") or "\0." in joined or ".\0" in joined


def plan_by_name(
    checkpoint: Mapping[str, tuple[tuple[int, ...], Any]],
    *,
    numbered: str = "keep",
    kinds: Mapping[str, str] | None = None,
    rename: Mapping[str, str] | None = None,
    torch_kinds: Mapping[str, str] | None = None,
    optional: Mapping[str, str] | None = None,
) -> tuple[list[PlannedLeaf], dict[str, str]]:
    """Decides, from names and shapes (and the torch kinds and reasons given), where each checkpoint tensor
    goes in Flax variables. Every tensor gets a leaf of its own: a quantized weight's pieces (an FP8 weight's
    ``weight_scale_inv``) are the loader's to group, not this function's.

    Args:
        checkpoint: ``torch key -> (torch-layout shape, dtype)``.
        numbered: see :func:`to_flax_variables`.
        kinds: module-name regex -> kind overrides (see :func:`infer_kind`), over the renamed names.
        rename: regex -> replacement applied to checkpoint keys first, in order (e.g. ``{"^model\\.": ""}``):
            the Flax module paths come from the renamed keys; a tensor's own name (``weight``, ``bias``)
            keeps deciding its layout and Flax leaf name.
        torch_kinds: ``key -> kind`` of the torch module that owns each tensor, where it is known.
        optional: ``key -> reason`` for tensors that are not parameters (tied copies, activation scales,
            buffers): left out.

    Returns:
        The plan (leaf paths start with the collection, ``"params"`` or ``"batch_stats"``) and the keys
        left out as no parameters, with the reason for each.

    Raises:
        ValueError: two tensors would land on the same leaf, ``numbered`` is unknown, a ``kinds`` or
            ``rename`` pattern is no regular expression, a kind is unknown, or a ``kinds`` pattern (or a
            ``torch_kinds`` entry) gives a tensor a kind whose layout is for another rank.
        TypeError: ``kinds`` or ``rename`` is not a mapping of strings to strings, or a checkpoint key is no
            string.
    """
    if numbered not in ("keep", "underscore", "int"):
        raise ValueError(f"numbered must be 'keep', 'underscore' or 'int', got {numbered!r}")
    check_rules("kinds", kinds)
    raw = _renamed(checkpoint, rename)
    # the module path follows the rename; the tensor's own name (weight, bias, ...) keeps deciding its layout
    plain = not rename and not _dot_at_an_end(raw)
    names = (
        raw  # each key's own name
        if plain
        else {k: ".".join(filter(None, (n.rpartition(".")[0], k.rpartition(".")[2]))) for k, n in raw.items()}
    )
    for key, new in raw.items() if rename else ():
        if new.rpartition(".")[2] != key.rpartition(".")[2]:
            warn_at_caller(
                f"rename turned {key!r} into {new!r}: without a target, renaming reaches the module path only; "
                f"the Flax leaf name follows the layout of {key.rpartition('.')[2]!r}"
            )
            break
    by_name = {names[k]: v for k, v in (torch_kinds or {}).items() if k in names}
    warn_unmatched("kinds", kinds or {}, (n.rpartition(".")[0] for n in names.values()))
    plan: list[PlannedLeaf] = []
    skipped: dict[str, str] = {}
    taken: dict[Path, str] = {}
    # without kinds= patterns or renaming, a tensor's buffer reason and rule follow from its own name, its
    # module's last name, its rank and its torch kind alone: decided once per such combination (a model repeats
    # a handful across its layers and experts)
    decided: dict[tuple[Any, ...], tuple[str | None, LeafRule | None]] = {}
    for key, (shape, dtype) in checkpoint.items():
        name = names[key]
        module, _, leaf = name.rpartition(".")
        if optional and key in optional:
            skipped[key] = optional[key]
            continue
        memo = (
            (module.rpartition(".")[2], leaf, len(shape), by_name.get(name))
            if not kinds and name == key
            else None
        )
        known = decided.get(memo) if memo is not None else None
        if known is not None:
            reason, rule = known
        else:
            reason = not_parameter(key, len(shape), optional)
            rule = None
            if reason is None:
                overridden = kind_override(module, kinds)  # kinds= decides first, as in infer_kind
                if overridden is None:
                    rule = rule_for(infer_kind(name, len(shape), None, by_name), leaf)
                else:
                    rule = rule_for(overridden, leaf)
                    check_rank(rule, shape, key, overridden)
            if memo is not None:
                decided[memo] = (reason, rule)
        if reason is not None:
            skipped[key] = reason
            continue
        assert rule is not None
        path = (rule.collection, *_segments(module, numbered), rule.flax_name)
        if path in taken:
            raise ValueError(f"{taken[path]!r} and {key!r} both map to the Flax leaf {dotted(path[1:])!r}")
        taken[path] = key
        plan.append(PlannedLeaf(TargetLeaf(path, flax_shape(rule, shape), dtype), key, rule))
    return plan, skipped


def nest(values: Mapping[Path, Any]) -> dict[Any, Any]:
    """``{("params", "a", "kernel"): x}`` -> ``{"params": {"a": {"kernel": x}}}``."""
    out: dict[Any, Any] = {}
    for path, value in values.items():
        node = out
        for seg in path[:-1]:
            node = node.setdefault(seg, {})
        node[path[-1]] = value
    return out


def to_flax_variables(
    state: Mapping[str, Any],
    *,
    dtype: Any = None,
    numbered: str = "keep",
    kinds: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Builds Flax variables from a flat torch-named mapping, inferring each module's kind by name and rank.

    Args:
        state: ``{"encoder.layer.0.attention.self.query.weight": array, ...}`` in torch layout.
        dtype: cast floating leaves to this dtype; None keeps each array's dtype.
        numbered: how numbered submodules are named: ``"keep"`` (``layers/0``, as transformers' Flax
            models do), ``"underscore"`` (``layers_0``, linen's automatic names) or ``"int"``
            (``layers/0`` with an int key, as ``nnx.List`` paths have).
        kinds: module-name regex -> kind overrides (see :func:`infer_kind`). ``"hf_conv1d"`` takes a
            transformers ``Conv1D`` weight in Linear order ``[out, in]`` (as bitsandbytes stores a quantized
            one); a plain one, stored ``[in, out]``, is given transposed (``w.T``), as
            ``qbridge.load_checkpoint`` reads it.

    Returns:
        ``{"params": nested dict}``, plus ``"batch_stats"`` when the state has running statistics. Leaves
        are new arrays where a transpose or cast was needed, else the arrays given. Buffers that are no
        parameters (``num_batches_tracked``, ``position_ids`` ...) are left out.
    """
    arrays = {k: jnp.asarray(v) for k, v in state.items()}
    plan, _ = plan_by_name(
        {k: (tuple(v.shape), v.dtype) for k, v in arrays.items()}, numbered=numbered, kinds=kinds
    )
    values = {
        p.leaf.path: apply_rule(arrays[p.key], p.rule, dtype=leaf_dtype(p, dtype, arrays[p.key].dtype))
        for p in plan
    }
    return {"params": {}, **nest(values)}


# --- matching to a target ------------------------------------------------------------------------------


def torch_key_candidates(path: Path) -> list[str]:
    """The torch names a Flax leaf at ``path`` may have in a checkpoint, most likely first.

    ``("model", "layers", 0, "mlp", "down_proj", "kernel")`` -> ``model.layers.0.mlp.down_proj.weight``;
    linen's ``layers_0`` is tried both as ``layers_0`` and as ``layers.0``.
    """
    *module, leaf = [str(p) for p in path]
    torch_leaf = TORCH_NAME.get(leaf, leaf)
    split = []
    for seg in module:
        m = _NUMBERED.match(seg)
        split.append(f"{m.group(1)}.{m.group(2)}" if m else seg)
    candidates = []
    for mod in (module, split):
        for name in (torch_leaf, leaf):
            key = ".".join([*mod, name])
            if key not in candidates:
                candidates.append(key)
    return candidates


def plan_match(
    checkpoint: Mapping[str, tuple[tuple[int, ...], Any]],
    leaves: Iterable[TargetLeaf],
    *,
    dtype: Any = None,
    kinds: Mapping[str, str] | None = None,
    rename: Mapping[str, str] | None = None,
    torch_kinds: Mapping[str, str] | None = None,
    optional: Mapping[str, str] | None = None,
) -> tuple[list[PlannedLeaf], MatchReport]:
    """Decides, from shapes and dtypes alone, which checkpoint tensor fills each target leaf and how.

    Args:
        checkpoint: ``torch key -> (torch-layout shape, dtype)`` (the dtype the dequantized tensor will have).
        leaves: the target's leaves.
        dtype: None (or ``"target"``) casts each floating leaf to its target leaf's dtype, as torch's
            ``load_state_dict`` casts into a module's dtypes (every cast is listed in ``report.casts``);
            ``"checkpoint"`` keeps the checkpoint's dtypes, and a difference from the target is a mismatch;
            a dtype casts every floating leaf to it.
        kinds: dotted-Flax-path regex -> module kind overrides (e.g. ``{"decoder\\.up": "conv_transpose2d"}``).
            ``"hf_conv1d"`` takes a transformers ``Conv1D`` weight in Linear order ``[out, in]`` (as
            bitsandbytes stores a quantized one); a plain one, stored ``[in, out]``, is given transposed
            (``w.T``), as ``qbridge.load_checkpoint`` reads it.
        rename: regex -> replacement applied to checkpoint keys first (e.g. ``{"^model\\.": ""}``).
        torch_kinds: ``key -> kind`` of the torch module that owns each tensor, where it is known; it lays
            out leaves whose Flax module type is unknown (dict targets) when ``kinds`` says nothing.
        optional: ``key -> reason`` for tensors that are not parameters (tied copies, activation scales,
            buffers): used if a target leaf asks for them, else skipped (never "unused").

    Returns:
        The plan (one entry per filled leaf) and the report of every problem found.
    """
    check_rules("kinds", kinds)
    renamed: dict[str, str] = {}
    for key, new in _renamed(checkpoint, rename).items():
        if new in renamed:
            raise ValueError(
                f"rename makes {renamed[new]!r} and {key!r} both {new!r}; which one is meant is not known"
            )
        renamed[new] = key
    leaves = list(leaves)
    warn_unmatched("kinds", kinds or {}, (dotted(leaf.path) for leaf in leaves))
    report = MatchReport()
    plan: list[PlannedLeaf] = []
    used: set[str] = set()
    for leaf in leaves:
        name = dotted(leaf.path)
        candidates = torch_key_candidates(leaf.path)
        found = next((c for c in candidates if c in renamed), None)
        if found is None:
            report.missing.append((name, candidates))
            continue
        original = renamed[found]
        used.add(original)
        shape, src_dtype = checkpoint[original]
        kind = overridden = kind_override(name, kinds)
        if kind is None and leaf.module_type is None and torch_kinds:
            kind = torch_kinds.get(original)
        # the kind the leaf is laid out by: the override's or the torch module's, else its Flax module type's
        kind = kind or kind_of_flax_leaf(str(leaf.path[-1]), len(shape), leaf.module_type)
        rule = rule_for_flax_leaf(str(leaf.path[-1]), len(shape), module_type=leaf.module_type, kind=kind)
        if overridden is not None:
            check_rank(rule, shape, original, overridden)
        got = flax_shape(rule, shape)
        if got != tuple(leaf.shape):
            report.shape_mismatches.append((name, original, tuple(leaf.shape), got))
            hint = _shape_hint(kind, name, tuple(leaf.shape), got)
            if hint:
                report.hints[name] = hint
            continue
        planned = PlannedLeaf(leaf, original, rule)
        src = np.dtype(src_dtype)
        if dtype in (None, "target", "checkpoint") and leaf.dtype is not None and np.dtype(leaf.dtype) != src:
            castable = (
                dtype != "checkpoint"
                and jnp.issubdtype(src, jnp.floating)
                and jnp.issubdtype(leaf.dtype, jnp.floating)
            )
            if not castable:
                report.dtype_mismatches.append((name, original, str(np.dtype(leaf.dtype)), str(src)))
                continue
        cast = leaf_dtype(planned, dtype, src)  # the same rule the loader casts by
        if cast is not None and np.dtype(cast) != src:
            report.casts.append((name, original, str(src), str(np.dtype(cast))))
        report.matched[name] = original
        plan.append(planned)
    for key, (shape, _) in checkpoint.items():
        if key in used:
            continue
        reason = not_parameter(key, len(shape), optional)
        if reason is not None:
            report.skipped.append(key)
            report.skip_reasons[key] = reason
        else:
            report.unused.append(key)
    return plan, report


@functools.lru_cache(maxsize=64)
def _floating(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))


def leaf_dtype(planned: PlannedLeaf, dtype: Any, src_dtype: Any) -> Any:
    """The dtype a planned leaf is cast to (None: keep), by the ``dtype`` rule of :func:`plan_match`."""
    try:
        floating = _floating(src_dtype)  # asked once per dtype: a load asks for every leaf
    except TypeError:  # unhashable
        floating = bool(jnp.issubdtype(src_dtype, jnp.floating))
    if not floating or dtype == "checkpoint":
        return None
    if dtype in (None, "target"):
        want = planned.leaf.dtype
        # the same dtype object (a plan without a target keeps each tensor's): no cast, without converting
        return None if want is None or want is src_dtype or np.dtype(want) == np.dtype(src_dtype) else want
    return dtype


def fill(
    plan: list[PlannedLeaf],
    fetch: Callable[[PlannedLeaf], Any],
    *,
    dtype: Any = None,
) -> dict[Path, Any]:
    """Produces the Flax array of every planned leaf: ``fetch`` gives the torch-layout array."""
    out = {}
    for p in plan:
        x = jnp.asarray(fetch(p))
        out[p.leaf.path] = apply_rule(x, p.rule, dtype=leaf_dtype(p, dtype, x.dtype))
    return out
