"""Torch -> Flax layout rules, as data plus small functions.

A torch module's parameter becomes a Flax leaf with another name and, for some kinds, another axis
order. Each rule says how: ``flax = flip(transpose(torch, perm), flip_axes)``.

| torch module             | torch name     | torch layout        | Flax leaf    | Flax layout          |
| ------------------------ | -------------- | ------------------- | ------------ | -------------------- |
| Linear                   | weight         | [out, in]           | kernel       | [in, out]            |
| Conv1d/2d/3d             | weight         | [O, I/g, *K]        | kernel       | [*K, I/g, O]         |
| ConvTranspose1d/2d/3d    | weight         | [I, O/g, *K]        | kernel       | flip_K [*K, I, O/g]  |
| Embedding                | weight         | [num, dim]          | embedding    | [num, dim]           |
| LayerNorm/RMSNorm/Group  | weight         | [C]                 | scale        | [C]                  |
| BatchNorm                | running_mean   | [C]                 | mean         | [C] (batch stats)    |
| BatchNorm                | running_var    | [C]                 | var          | [C] (batch stats)    |
| any                      | bias           | [C]                 | bias         | [C]                  |
| transformers Conv1D      | weight         | [out, in] (logical) | kernel       | [out, in]            |
| stacked experts          | weight         | [E, out, in]        | kernel       | [E, in, out]         |

transformers' ``Conv1D`` (GPT-2 and its family) stores ``[in, out]``, and ``[out, in]`` once bitsandbytes has
quantized it (transformers lays the weight out as a Linear's first); the loader reads either as the
logical Linear order ``[out, in]``, which the table starts from. Its Flax kernel is that ``[out, in]``
array, as transformers' Flax GPT-2 (``FlaxConv1D``) holds it; a Flax ``Dense`` target module takes the
transpose instead (the target's module type decides).

ConvTranspose maps to Flax's ``ConvTranspose`` with its default ``transpose_kernel=False``; PyTorch's
``padding=p`` corresponds to Flax ``padding=dilation * (k - 1) - p`` on each side.

Transposes are materialized here (``jnp.transpose`` makes a new array). Where a weight comes from torch,
``qbridge`` can apply the same permutation as a zero-copy view on the torch side instead; see
:func:`permutation` and ``qbridge.to_jax``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

KINDS = (
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "embedding", "layernorm", "rmsnorm", "groupnorm", "batchnorm", "hf_conv1d", "stacked_linear", "param",
)  # fmt: skip

# Flax leaf name -> torch parameter name
TORCH_NAME = {
    "kernel": "weight",
    "embedding": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
# torch buffers that are not parameters of any Flax module, by the last name component, and why
BUFFERS = {
    "num_batches_tracked": "BatchNorm's update counter (Flax keeps none)",
    "position_ids": "position-id buffer",
    "token_type_ids": "token-type-id buffer",
    "inv_freq": "rotary-embedding cache",
    "original_inv_freq": "rotary-embedding cache",
    "cos_cached": "rotary-embedding cache",
    "sin_cached": "rotary-embedding cache",
    "_cos_cached": "rotary-embedding cache",
    "_sin_cached": "rotary-embedding cache",
    "masked_bias": "attention-mask constant",
}
SKIPPED_BUFFERS = tuple(BUFFERS)


def buffer_reason(key: str, ndim: int) -> str | None:
    """Why torch tensor ``key`` of rank ``ndim`` is a buffer and no parameter, by name rules; None if it
    may be a parameter. Besides the known buffer names (``num_batches_tracked``, ``position_ids``, rotary caches, ...): a 4-D ``bias`` of an attention module is the causal mask
    older transformers saved (GPT-2's ``attn.bias``)."""
    module, _, leaf = key.rpartition(".")
    if leaf in BUFFERS:
        return BUFFERS[leaf]
    if leaf == "bias" and ndim == 4 and module.rpartition(".")[2] in ("attn", "attention", "self_attn"):
        return "causal-mask buffer"
    return None


@dataclasses.dataclass(frozen=True)
class LeafRule:
    """How one torch parameter becomes one Flax leaf."""

    torch_name: str
    flax_name: str
    perm: tuple[int, ...] | None = None  # axes of the torch array, in Flax order; None = unchanged
    flip: tuple[int, ...] = ()  # Flax axes reversed after the permutation
    collection: str = "params"  # "batch_stats" for running statistics


def _conv_perm(nd: int) -> tuple[int, ...]:
    return (*range(2, 2 + nd), 1, 0)


def _conv_transpose_perm(nd: int) -> tuple[int, ...]:
    return (*range(2, 2 + nd), 0, 1)


def _rules() -> dict[str, dict[str, LeafRule]]:
    bias = LeafRule("bias", "bias")
    norm = {"weight": LeafRule("weight", "scale"), "bias": bias}
    rules: dict[str, dict[str, LeafRule]] = {
        "linear": {"weight": LeafRule("weight", "kernel", (1, 0)), "bias": bias},
        "embedding": {"weight": LeafRule("weight", "embedding")},
        "layernorm": norm,
        "rmsnorm": {"weight": LeafRule("weight", "scale")},
        "groupnorm": norm,
        "batchnorm": {
            **norm,
            "running_mean": LeafRule("running_mean", "mean", collection="batch_stats"),
            "running_var": LeafRule("running_var", "var", collection="batch_stats"),
        },
        "hf_conv1d": {"weight": LeafRule("weight", "kernel"), "bias": bias},
        "stacked_linear": {"weight": LeafRule("weight", "kernel", (0, 2, 1))},
        "param": {},
    }
    for nd in (1, 2, 3):
        rules[f"conv{nd}d"] = {"weight": LeafRule("weight", "kernel", _conv_perm(nd)), "bias": bias}
        rules[f"conv_transpose{nd}d"] = {
            "weight": LeafRule("weight", "kernel", _conv_transpose_perm(nd), flip=tuple(range(nd))),
            "bias": bias,
        }
    return rules


RULES = _rules()


def rule_for(kind: str, torch_name: str) -> LeafRule:
    """The rule for parameter ``torch_name`` of a torch module of ``kind`` (see :data:`jax_side.KINDS`).

    Unknown names of a known kind, and every name of kind ``"param"``, keep their name and layout.
    """
    if kind not in RULES:
        raise ValueError(f"unknown module kind {kind!r}; known: {', '.join(KINDS)}")
    if (
        kind == "stacked_linear" and torch_name != "weight"
    ):  # fused experts name their tensors (gate_up_proj ...)
        return LeafRule(torch_name, torch_name, (0, 2, 1))
    rule = RULES[kind].get(torch_name)
    return LeafRule(torch_name, torch_name) if rule is None else rule


_LINEAR_TYPES = ("linear", "dense", "densegeneral", "lineargeneral")
_NORM_TYPES = ("layernorm", "rmsnorm", "groupnorm", "batchnorm")


def known_module_type(module_type: str) -> bool:
    """Whether :func:`kind_of_flax_leaf` lays a leaf out by this Flax module type (a layer's class name)."""
    t = module_type.lower()
    return t in _LINEAR_TYPES or t == "embed" or t.startswith("conv") or t in _NORM_TYPES


def kind_of_flax_leaf(flax_name: str, ndim: int, module_type: str | None = None) -> str:
    """The torch module kind a Flax leaf comes from, by its Flax module type when known, else by its name
    and rank. A ``kernel`` of rank 3-5 is read as a (non-transposed) convolution unless ``module_type``
    says ConvTranspose: shapes alone cannot tell them apart."""
    if module_type is not None:
        t = module_type.lower()
        if t in _LINEAR_TYPES:
            return "linear"
        if t == "embed":
            return "embedding"
        if t.startswith("conv"):
            if flax_name != "kernel" or not 3 <= ndim <= 5:
                return "param"  # a bias keeps its layout
            return f"conv_transpose{ndim - 2}d" if t.startswith("convtranspose") else f"conv{ndim - 2}d"
        if t in _NORM_TYPES:
            return t
    if flax_name == "kernel":
        return "linear" if ndim == 2 else f"conv{ndim - 2}d" if 3 <= ndim <= 5 else "param"
    if flax_name == "embedding":
        return "embedding"
    if flax_name in ("mean", "var"):
        return "batchnorm"
    if flax_name == "scale":
        return "layernorm"
    return "param"


def rule_for_flax_leaf(
    flax_name: str, ndim: int, *, module_type: str | None = None, kind: str | None = None
) -> LeafRule:
    """The rule that produces Flax leaf ``flax_name`` (of rank ``ndim``), for matching against a target.

    ``kind`` (a torch module kind) decides when given; else the Flax ``module_type``; else name and rank.
    """
    kind = kind or kind_of_flax_leaf(flax_name, ndim, module_type)
    torch_name = TORCH_NAME.get(flax_name, flax_name)
    rule = rule_for(kind, torch_name)
    if rule.flax_name != flax_name:  # e.g. a plain parameter called "scale"
        return LeafRule(flax_name, flax_name)
    return rule


def permutation(rule: LeafRule, ndim: int) -> tuple[int, ...] | None:
    """The axis permutation of ``rule`` for an array of rank ``ndim`` (None when it keeps the order)."""
    if rule.perm is None or len(rule.perm) != ndim:
        return None
    return rule.perm


def _check_rank(rule: LeafRule, ndim: int) -> None:
    """Raises ValueError when ``rule`` permutes the axes of arrays of another rank than ``ndim``."""
    if rule.perm is not None and len(rule.perm) != ndim:
        raise ValueError(
            f"the layout rule for {rule.flax_name!r} lays out arrays of rank {len(rule.perm)}, got rank {ndim}: "
            "the rule of another module kind (rule_for(kind, name) picks it)"
        )


def flax_shape(rule: LeafRule, torch_shape: Sequence[int]) -> tuple[int, ...]:
    """The Flax shape of a torch array of ``torch_shape`` under ``rule``.

    Raises:
        ValueError: ``rule`` lays out arrays of another rank.
    """
    perm = rule.perm
    if perm is None:
        return tuple(torch_shape)
    if len(perm) != len(torch_shape):
        _check_rank(rule, len(torch_shape))
    return tuple([torch_shape[a] for a in perm])


def refuse_torch(value: Any, what: str) -> None:
    """Raises TypeError when ``value`` is a torch tensor: jax_side takes JAX or numpy arrays."""
    if type(value).__module__.split(".")[0] == "torch" and hasattr(value, "data_ptr"):  # a tensor, not a Size
        raise TypeError(
            f"{what} is a torch tensor; jax_side takes JAX or numpy arrays: hand it over with qbridge.to_jax(t) "
            "(a checkpoint loads with qbridge.load_checkpoint)"
        )


def out_dtype(dtype: Any, allowed: Any, error: type[Exception]) -> Any:
    """``dtype`` as a numpy dtype, one of ``allowed``; else ``error`` (TypeError for a torch dtype) naming it.
    (``jnp.dtype(None)`` is float64, and a torch dtype gave numpy's "Cannot interpret" message.)"""
    names = "float16, bfloat16 or float32"
    if type(dtype).__module__.split(".")[0] == "torch":
        raise TypeError(
            f"dtype is a torch dtype ({dtype}); jax_side takes JAX or numpy dtypes, such as "
            f"jnp.{str(dtype).removeprefix('torch.')}"
        )
    try:
        d = jnp.dtype(dtype) if dtype is not None else None
    except TypeError:
        d = None
    if d is None or d not in allowed:
        raise error(f"output dtype must be {names}, got {d if d is not None else dtype!r}")
    return d


def apply_rule(x: Any, rule: LeafRule, *, dtype: Any = None, transposed: bool = False) -> Any:
    """Lays out one torch-layout array ``x`` for Flax under ``rule`` and casts it to ``dtype`` if given.

    Args:
        x: an array in torch layout (a ``jax.Array`` or anything ``jnp.asarray`` takes).
        rule: from :func:`rule_for` or :func:`rule_for_flax_leaf`.
        dtype: the Flax dtype; None keeps ``x``'s dtype.
        transposed: ``x`` already has the rule's permutation applied (as a zero-copy view from torch);
            only the flip and the cast remain.

    Returns:
        A new array when a transpose, flip or cast is needed, else ``x`` itself.

    Raises:
        TypeError: ``x`` is a torch tensor (``qbridge.to_jax`` hands it over).
        ValueError: ``rule`` lays out arrays of another rank.
    """
    refuse_torch(x, "x")
    x = jnp.asarray(x)
    _check_rank(rule, x.ndim)
    perm = None if transposed else permutation(rule, x.ndim)
    if perm is not None:
        x = jnp.transpose(x, perm)
    if rule.flip and x.ndim == len(rule.perm or ()):
        x = jnp.flip(x, axis=rule.flip)
    if dtype is not None and x.dtype != jnp.dtype(dtype):
        x = x.astype(dtype)
    return x
