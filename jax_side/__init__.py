"""jax_side: Flax layouts, parameter trees and JAX-native dequantization (never imports torch).

Torch -> Flax layout rules for each module kind, Flax parameter trees built from flat torch-named
mappings (by name, or matched to a linen/nnx target), and NF4/FP4/FP8 dequantization written for JAX
that gives the same bits as ``torch_side``.
"""

from jax_side._codes import FP4_CODE
from jax_side._codes import NF4_CODE
from jax_side._codes import standard_code
from jax_side._fp8 import ScaleLayout
from jax_side._fp8 import dequantize_fp8
from jax_side._fp8 import fp8_scale_layout
from jax_side._layout import KINDS
from jax_side._layout import RULES
from jax_side._layout import LeafRule
from jax_side._layout import apply_rule
from jax_side._layout import buffer_reason
from jax_side._layout import flax_shape
from jax_side._layout import kind_of_flax_leaf
from jax_side._layout import permutation
from jax_side._layout import rule_for
from jax_side._layout import rule_for_flax_leaf
from jax_side._llama import LlamaConfig
from jax_side._lora import LoraConfig
from jax_side._lora import add_lora
from jax_side._lora import lora_layers
from jax_side._lora import lora_targets
from jax_side._lora import remove_lora
from jax_side._llama import abstract_llama
from jax_side._llama import llama_for_causal_lm
from jax_side._nf4 import decode_nested_absmax
from jax_side._qlayers import load_quantized_into_nnx
from jax_side._quantized import FP8Weight
from jax_side._quantized import NF4Weight
from jax_side._quantized import is_quantized
from jax_side._quantized import quantized_nbytes
from jax_side._nf4 import dequantize_nf4
from jax_side._target import Target
from jax_side._target import as_target
from jax_side._target import load_into_nnx
from jax_side._target import match_to_target
from jax_side._target import plan_for_target
from jax_side._target import rebuild_target
from jax_side._tree import MatchError
from jax_side._tree import MatchReport
from jax_side._tree import dotted
from jax_side._tree import PlannedLeaf
from jax_side._tree import TargetLeaf
from jax_side._tree import infer_kind
from jax_side._tree import leaf_dtype
from jax_side._tree import nest
from jax_side._tree import not_parameter
from jax_side._tree import plan_by_name
from jax_side._tree import plan_match
from jax_side._tree import to_flax_variables
from jax_side._tree import torch_key_candidates

__all__ = [
    "FP4_CODE",
    "FP8Weight",
    "KINDS",
    "LeafRule",
    "LlamaConfig",
    "LoraConfig",
    "MatchError",
    "MatchReport",
    "NF4Weight",
    "NF4_CODE",
    "PlannedLeaf",
    "QuantDense",
    "QuantEmbed",
    "QuantEmbedLinen",
    "QuantLinear",
    "QuantizedVariable",
    "RULES",
    "ScaleLayout",
    "Target",
    "TargetLeaf",
    "abstract_llama",
    "add_lora",
    "apply_rule",
    "as_target",
    "buffer_reason",
    "decode_nested_absmax",
    "dequantize_fp8",
    "dequantize_nf4",
    "dotted",
    "flax_shape",
    "fp8_scale_layout",
    "infer_kind",
    "is_quantized",
    "kind_of_flax_leaf",
    "leaf_dtype",
    "llama_for_causal_lm",
    "load_into_nnx",
    "load_quantized_into_nnx",
    "lora_layers",
    "lora_targets",
    "match_to_target",
    "nest",
    "not_parameter",
    "permutation",
    "plan_by_name",
    "plan_for_target",
    "plan_match",
    "quantized_nbytes",
    "rebuild_target",
    "remove_lora",
    "rule_for",
    "rule_for_flax_leaf",
    "standard_code",
    "to_flax_variables",
    "torch_key_candidates",
]


def __getattr__(name: str):  # the Flax layer classes are built on first use (flax is optional)
    if name in ("QuantDense", "QuantEmbed", "QuantEmbedLinen", "QuantLinear", "QuantizedVariable"):
        from jax_side import _qlayers

        return getattr(_qlayers, name)
    raise AttributeError(f"module 'jax_side' has no attribute {name!r}")
