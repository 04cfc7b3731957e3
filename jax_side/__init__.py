"""jax_side: Flax layouts, parameter trees and JAX-native dequantization (never imports torch).

Torch -> Flax layout rules for each module kind, Flax parameter trees built from flat torch-named
mappings (by name, or matched to a linen/nnx target), and NF4/FP4/FP8 dequantization written for JAX
that gives the same bits as ``torch_side``.
"""

from jax_side._adapters import add_lora, lora_layers, lora_targets, remove_lora
from jax_side._codes import FP4_CODE, NF4_CODE, standard_code
from jax_side._cpu_kernel import wait_for_kernels
from jax_side._fp8 import ScaleLayout, dequantize_fp8, fp8_scale_layout
from jax_side._fused import (
    fits_kernel,
    get_matmul_path,
    matmul_path,
    quantized_matmul,
    quantized_matmuls,
    set_matmul_path,
)
from jax_side._layout import (
    KINDS,
    RULES,
    LeafRule,
    apply_rule,
    buffer_reason,
    flax_shape,
    kind_of_flax_leaf,
    permutation,
    rule_for,
    rule_for_flax_leaf,
)
from jax_side._llama import LlamaConfig, abstract_llama, llama_for_causal_lm
from jax_side._lora import LoraConfig
from jax_side._nf4 import decode_nested_absmax, dequantize_nf4
from jax_side._qlayers import fused_linears, load_quantized_into_nnx
from jax_side._quantized import FP8Weight, NF4Weight, is_quantized, quantized_nbytes
from jax_side._target import (
    Target,
    as_target,
    load_into_nnx,
    match_to_target,
    plan_for_target,
    rebuild_target,
)
from jax_side._tree import (
    MatchError,
    MatchReport,
    PlannedLeaf,
    TargetLeaf,
    dotted,
    infer_kind,
    leaf_dtype,
    nest,
    not_parameter,
    plan_by_name,
    plan_match,
    to_flax_variables,
    torch_key_candidates,
)

__all__ = [
    "FP4_CODE",
    "KINDS",
    "NF4_CODE",
    "RULES",
    "FP8Weight",
    "LeafRule",
    "LlamaConfig",
    "LoraConfig",
    "MatchError",
    "MatchReport",
    "NF4Weight",
    "PlannedLeaf",
    "QuantDense",
    "QuantEmbed",
    "QuantEmbedLinen",
    "QuantLinear",
    "QuantizedVariable",
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
    "fits_kernel",
    "flax_shape",
    "fp8_scale_layout",
    "fused_linears",
    "get_matmul_path",
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
    "matmul_path",
    "nest",
    "not_parameter",
    "permutation",
    "plan_by_name",
    "plan_for_target",
    "plan_match",
    "quantized_matmul",
    "quantized_matmuls",
    "quantized_nbytes",
    "rebuild_target",
    "remove_lora",
    "rule_for",
    "rule_for_flax_leaf",
    "set_matmul_path",
    "standard_code",
    "to_flax_variables",
    "torch_key_candidates",
    "wait_for_kernels",
]


# Public classes name the package they are used from (in reprs, tracebacks and the API reference).
for _name in __all__:
    _obj = globals().get(_name)
    if isinstance(_obj, type) and _obj.__module__.startswith(__name__ + "._"):
        _obj.__module__ = __name__
del _name, _obj


def __getattr__(name: str):  # the Flax layer classes are built on first use (flax is optional)
    if name in ("QuantDense", "QuantEmbed", "QuantEmbedLinen", "QuantLinear", "QuantizedVariable"):
        from jax_side import _qlayers

        return getattr(_qlayers, name)
    raise AttributeError(f"module 'jax_side' has no attribute {name!r}")
